"""Curriculum: derived judge / choice questions (balanced, near misses, one or more right options), the
instruction lines, the rewards agreeing with every derived solution, stage files, the schedule and resume."""
import json
import random
from collections import Counter

import pytest

import curriculum
import data
import rewards
from curriculum import STAGES, Curriculum, StageSpec

POOL = data.make_rows("train", 240, seed=0, draw=False)  # open rows; the scene lives in meta
ROWS_PER_KIND = {}
for _row in POOL:
    ROWS_PER_KIND.setdefault(_row["meta"]["kind"], []).append(_row)


def test_iou_hand_values():
    """rewards.box_iou (the IoU the curriculum's distractors and the reward share) on hand-computed boxes."""
    a = [0, 0, 10, 10]
    cases = [(a, [5, 0, 15, 10], 1 / 3),     # overlap 5 x 10 = 50, union 100 + 100 - 50 = 150
             (a, a, 1.0),                     # a box with itself
             (a, [0, 0, 20, 20], 0.25),       # inside a box four times its area
             (a, [10, 0, 20, 10], 0.0),       # touching along an edge: no area in common
             (a, [10, 10, 20, 20], 0.0),      # touching at a corner
             (a, [20, 20, 30, 30], 0.0),      # disjoint along both axes (two negative overlaps must not multiply)
             (a, [0, 20, 10, 30], 0.0)]       # disjoint along one axis
    for x, y, expected in cases:
        assert rewards.box_iou(x, y)[0] == pytest.approx(expected), f"iou({x}, {y}) must be {expected}"
        assert rewards.box_iou(y, x)[0] == pytest.approx(expected), "IoU is symmetric"


def _grid_move(box, truth, cell):
    """Whether `box` is `truth` moved by whole grid cells (same shift on x1 and x2, and on y1 and y2)."""
    dx, dy = box[0] - truth[0], box[1] - truth[1]
    return box == [truth[0] + dx, truth[1] + dy, truth[2] + dx, truth[3] + dy] and dx % cell == 0 == dy % cell


def _is_wrong_box(box, m):
    """A documented wrong box: another object's box, or the true box moved along the grid; IoU < 0.5 with the
    truth (the reward's own IoU as the oracle) and inside the image."""
    truth = m["answer"]
    other = box in [o["box"] for o in m["objects"] if o["box"] != truth]
    return ((other or _grid_move(box, truth, m["cell"])) and rewards.box_iou(box, truth)[0] < 0.5
            and min(box) >= 0 and max(box) <= m["size"]), ("other" if other else "moved")


@pytest.mark.parametrize("tasks", [("math",), ("detection", "math"), ("detection", "classify", "math")])
def test_a_judge_stage_asks_each_task_true_and_false_claims_in_turn(tasks):
    pool = data.make_rows("train", 12 * len(tasks), draw=False, tasks=tasks)
    rows = Curriculum([StageSpec("judge", steps=10)], pool=pool).next_batch(len(pool))
    for t in tasks:
        truths = [r["meta"]["judge"]["truth"] for r in rows if r["task"] == t]
        assert truths == [truths[0], not truths[0]] * 6, \
            f"{len(tasks)} tasks: each task's claims true and false in turn, or the task gives the answer away"


def test_judge_is_balanced_and_false_claims_are_near_misses():
    rows = curriculum.stage_rows(POOL, "judge", seed=0)
    yes = sum(r["solution"] == "<answer>yes</answer>" for r in rows)
    assert yes == len(rows) // 2, "stage_rows alternates true and false claims: exactly half are yes"
    flips = [curriculum.make_stage_row(r, "judge", random.Random(i)) for i, r in enumerate(POOL)]
    assert 0.4 < sum(r["meta"]["judge"]["truth"] for r in flips) / len(flips) < 0.6, "a coin flip is about fair"
    moves = set()  # which documented near misses occur
    for r in rows:
        m, claim = r["meta"], r["meta"]["judge"]["claim"]
        assert r["problem"].startswith(f"{m['question']} Is it {data.format_value(claim)}?\n")
        if m["judge"]["truth"]:
            assert claim == m["answer"]
        elif r["task"] == "math":
            step = m["cell"] if m["kind"] in data.GEOMETRY else 1  # pixels move by grid cells
            assert abs(claim - m["answer"]) in (step, 2 * step) and claim >= 0, "off by one or two (cells)"
        elif r["task"] == "detection":
            ok, how = _is_wrong_box(claim, m)
            assert ok, f"a false box is another object's box or the true box moved along the grid, IoU < 0.5: {claim}"
            moves.add(f"box:{how}")
        else:
            palette = data.COLOURS if m["kind"] == "colours" else data.SHAPES
            assert claim and set(claim) <= set(palette), "a wrong but real label set"
            assert claim == [x for x in palette if x in claim], "labels listed in palette order"
            dropped, added = set(m["answer"]) - set(claim), set(claim) - set(m["answer"])
            how = {(1, 1): "swap", (0, 1): "add", (1, 0): "drop"}.get((len(dropped), len(added)))
            assert how, f"one label swapped for an absent one, one absent label added, or one dropped: " \
                        f"{m['answer']} -> {claim}"
            if m["kind"] == "shape_of":
                assert how == "swap" and len(claim) == 1, "'what shape' claims another single shape"
            moves.add(("shape_of:" if m["kind"] == "shape_of" else "") + how)
    assert moves == {"box:other", "box:moved", "swap", "add", "drop", "shape_of:swap"}, \
        f"every documented kind of near miss occurs: {moves}"


def test_choice_options():
    letters_seen = set()
    for r in curriculum.stage_rows(POOL, "choice", seed=0):
        m = r["meta"]
        options, letters = m["choice"]["options"], m["choice"]["letters"]
        assert len(options) == 4 and len({json.dumps(o) for o in options}) == 4, "four distinct options"
        assert r["solution"] == f"<answer>{', '.join(letters)}</answer>" and letters == sorted(letters)
        for letter, option in zip("ABCD", options):
            assert f"\n{letter}. {data.format_value(option)}\n" in r["problem"]
        right = [o for L, o in zip("ABCD", options) if L in letters]
        wrong = [o for L, o in zip("ABCD", options) if L not in letters]
        if m["kind"] in ("colours", "shapes"):
            assert 1 <= len(letters) <= 3, "multi-select: at least one right option and one distractor"
            assert all(o[0] in m["answer"] for o in right) and not any(o[0] in m["answer"] for o in wrong)
        else:
            assert len(letters) == 1 and right[0] == m["answer"], "single-select: exactly the answer is right"
            letters_seen.add(letters[0])
            assert all(o != m["answer"] for o in wrong), "distractors differ from the answer"
            if r["task"] == "detection":
                assert all(_is_wrong_box(o, m)[0] for o in wrong), \
                    f"distractor boxes: other objects' boxes or the true box moved along the grid, IoU < 0.5: {wrong}"
            elif r["task"] == "math":
                step = m["cell"] if m["kind"] in data.GEOMETRY else 1  # pixel answers move by grid cells
                assert all(0 < abs(o - m["answer"]) <= 3 * step and (o - m["answer"]) % step == 0 and o >= 0
                           for o in wrong), f"distractors are within 3 (cells) of {m['answer']}, never negative: {wrong}"
            else:
                assert all(len(o) == 1 and o[0] in data.SHAPES for o in wrong), "'what shape': other shapes"
    assert letters_seen == set("ABCD"), "option order is shuffled: the right letter takes every position"


def test_open_is_the_row_itself_and_every_prompt_ends_with_its_instruction():
    for stage in curriculum.STAGES:
        for r in curriculum.stage_rows(POOL[:30], stage):
            assert r["stage"] == stage and r["problem"].endswith("\n" + data.instruction(stage, r["task"]))
    opened = curriculum.make_stage_row(POOL[0], "open", random.Random(0))
    assert {k: v for k, v in opened.items() if k != "stage"} == {k: v for k, v in POOL[0].items() if k != "stage"}
    assert data.build_problem("Q?", "math", "open") == "Q?\n" + data.INSTRUCTIONS["open/math"]
    assert all(len(text) < 100 for text in data.INSTRUCTIONS.values()), "instructions stay short"


def _wrong_answer(r, stage):
    """An answer that must score accuracy 0 for row r in `stage`."""
    m = r["meta"]
    if stage == "judge":
        return "no" if m["judge"]["truth"] else "yes"
    if stage == "choice":
        return ", ".join(L for L in "ABCD" if L not in m["choice"]["letters"])
    if r["task"] == "detection":
        return data.format_value(curriculum.wrong_boxes(m, random.Random(0))[1][0])
    if r["task"] == "math":
        return str(m["answer"] + 1)
    palette = data.COLOURS if m["kind"] == "colours" else data.SHAPES
    return ", ".join(x for x in palette if x not in m["answer"])  # disjoint labels: Jaccard 0


def test_every_derived_solution_scores_right_through_rewards():
    rewards = pytest.importorskip("rewards")
    for stage in curriculum.STAGES:
        for kind, rows in ROWS_PER_KIND.items():
            for r in curriculum.stage_rows(rows[:8], stage):
                right = rewards.score(data.reference_completion(r), r["solution"], r["task"], stage)
                assert (right["accuracy"], right["format"]) == (1, 1), f"{stage}/{kind}: {r['solution']} -> {right}"
                wrong = rewards.score(f"<think>x</think><answer>{_wrong_answer(r, stage)}</answer>", r["solution"],
                                      r["task"], stage)
                assert wrong["accuracy"] == 0, f"{stage}/{kind}: a wrong answer must score 0: {wrong}"


# -----------------------------------------------------------------------------
# Stage files

def test_stage_files_pass_through_with_the_instruction_added_when_missing(tmp_path):
    path = tmp_path / "judge.jsonl"
    lines = [{"problem": "Is there a cat?", "solution": "<answer>yes</answer>", "task": "classify"},
             {"problem": "Is it 3? Put it in <answer> </answer>.", "solution": "B", "task": "math", "stage": "choice"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    mapping = curriculum.parse_stage_data(f"judge={path}:all")
    stages = curriculum.assign_stage_data([StageSpec("judge", steps=5)], mapping)
    rows = Curriculum(stages, seed=0).next_batch(2)
    rows.sort(key=lambda r: r["problem"])
    assert rows[0]["problem"] == "Is it 3? Put it in <answer> </answer>." and rows[0]["stage"] == "choice", \
        "left alone: its problem, and the stage it names (scored in that form)"
    assert rows[1]["problem"] == "Is there a cat?\n" + data.INSTRUCTIONS["judge"] and rows[1]["stage"] == "judge"
    with pytest.raises(ValueError, match="not in the schedule"):
        curriculum.assign_stage_data(stages, {"open": "x.jsonl"})


# -----------------------------------------------------------------------------
# The schedule

def test_each_stage_runs_its_steps():
    cur = Curriculum([StageSpec("judge", steps=3), StageSpec("choice", steps=2)], pool=POOL[:10], seed=0)
    ended = []
    for _ in range(5):
        stage = cur.current_stage().name
        ended.append((stage, cur.record()))
    assert ended == [("judge", False), ("judge", False), ("judge", True), ("choice", False), ("choice", True)]
    assert cur.done and cur.current_stage() is None
    with pytest.raises(RuntimeError):
        cur.next_batch(1)


def test_state_dict_resumes_the_exact_same_batches():
    stages = [StageSpec("judge", steps=3), StageSpec("choice", steps=3), StageSpec("open", steps=3)]
    a = Curriculum(stages, pool=POOL[:20], seed=7)
    for _ in range(2):
        a.next_batch(8)
        a.record()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON (or torch.save) round trip
    expected = []
    for _ in range(4):  # crosses from judge into choice, and an epoch boundary of the 20-row pool
        expected.append(a.next_batch(8))
        a.record()
    b = Curriculum(stages, pool=POOL[:20], seed=7)
    b.load_state_dict(state)
    for batch in expected:
        assert [(r["problem"], r["solution"], r["meta"]) for r in b.next_batch(8)] == \
               [(r["problem"], r["solution"], r["meta"]) for r in batch], "a resumed run draws the same rows"
        b.record()
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="does not match"):
        Curriculum(stages, pool=POOL[:20], seed=8).load_state_dict(state)


def test_batches_are_deterministic_and_judge_batches_balanced():
    make = lambda: Curriculum([StageSpec("judge", steps=5)], pool=POOL, seed=1)
    a, b = make().next_batch(16), make().next_batch(16)
    assert [r["problem"] for r in a] == [r["problem"] for r in b]
    assert sum(r["solution"] == "<answer>yes</answer>" for r in a) == 8
    other = Curriculum([StageSpec("judge", steps=5)], pool=POOL, seed=2).next_batch(16)
    assert [r["problem"] for r in a] != [r["problem"] for r in other], "the seed changes the order"


def test_derived_stage_needs_meta():
    real = [{"image": None, "problem": "q", "solution": "<answer>1</answer>", "task": "math"}]
    with pytest.raises(ValueError, match="meta"):
        Curriculum([StageSpec("judge", steps=1)], pool=real)
    assert Curriculum([StageSpec("open", steps=1)], pool=real).next_batch(1)[0]["problem"] == "q"


def test_geometry_numbers_step_by_one_cell():
    rows = [r for r in data.make_rows("train", 900, draw=False) if r["meta"]["kind"] in data.GEOMETRY]
    assert rows
    rng = random.Random(0)
    for row in rows:
        m = row["meta"]
        options, letters = curriculum.choice_options(m, "math", rng)
        assert len(set(options)) == 4 and [options[curriculum.LETTERS.index(x)] for x in letters] == [m["answer"]]
        assert all(v % 16 == 0 and 0 <= v <= 112 for v in options), options
        if m["kind"] == "width":
            assert min(options) >= 16, "no shape is 0 px wide"
        else:
            assert max(options) <= 96, "a left edge leaves room for a one-cell shape"
        claim = curriculum.near_miss(m, "math", rng)
        assert claim != m["answer"] and abs(claim - m["answer"]) <= 32 and claim % 16 == 0


def test_batches_interleave_the_tasks():
    rows = data.make_rows("train", 300, draw=False)
    order = curriculum.balanced_order(rows, random.Random(1))
    assert sorted(order) == list(range(300))
    for i in range(0, 300, 3):
        assert {rows[j]["task"] for j in order[i:i + 3]} == set(data.TASKS), "every 3 rows hold the 3 tasks"
    assert order != curriculum.balanced_order(rows, random.Random(2))


def test_replay_adds_open_questions_and_leaves_the_stage_rows_alone():
    plain = Curriculum([StageSpec("judge", steps=5), StageSpec("open", steps=1)], pool=POOL, seed=3)
    mixed = Curriculum([StageSpec("judge", steps=5, replay=0.25), StageSpec("open", steps=1)], pool=POOL, seed=3)
    a, b = plain.next_batch(32), mixed.next_batch(32)
    assert len(b) == 40 and [i for i, r in enumerate(b) if r.get("replay")] == list(range(4, 40, 5)), \
        "8 open questions spread among the 32 judge rows"
    replayed = [r for r in b if r.get("replay")]
    assert all(r["stage"] == "open" and {k: v for k, v in r.items() if k != "replay"} in POOL for r in replayed), \
        "a replayed row is the open row itself"
    assert [r["problem"] for r in b if not r.get("replay")] == [r["problem"] for r in a], \
        "the stage's own rows (and so the judge's balance) are those of a run without replay"
    assert {r["task"] for r in replayed[:3]} == set(data.TASKS), "replayed rows interleave the tasks too"
    assert [len(mixed.next_batch(6)) for _ in range(4)] == [7, 8, 7, 8], "1.5 per batch of 6: exact over time"
    assert curriculum.replay_count(3, 1 / 3) == 1 and curriculum.replay_count(300, 0.1) == 30
    with pytest.raises(ValueError, match="needs an open stage"):
        Curriculum([StageSpec("judge", steps=1, replay=0.5)], pool=POOL)
    with pytest.raises(ValueError, match="replay"):
        StageSpec("judge", steps=1, replay=-1.0)


def test_replay_resumes_exactly():
    stages = [StageSpec("judge", steps=2, replay=1 / 3), StageSpec("open", steps=1)]
    a = Curriculum(stages, pool=POOL, seed=0)
    a.next_batch(7)
    a.record()
    b = Curriculum(stages, pool=POOL, seed=0)
    b.load_state_dict(a.state_dict())
    assert [r["problem"] for r in a.next_batch(7)] == [r["problem"] for r in b.next_batch(7)]


def test_a_mixed_stage_asks_every_task_in_every_form_in_turn(tmp_path):
    """--stages mixed: every 9 data positions hold each task in each form once, judge claims alternate true and
    false per task, and with files each form's rows come from its own file."""
    cur = Curriculum([StageSpec("mixed", group_size=4, steps=2)], pool=POOL[:90], seed=0)
    rows = cur.next_batch(36)
    assert Counter((r["task"], r["stage"]) for r in rows) == {(t, f): 4 for t in data.TASKS for f in STAGES}
    for k in range(0, 36, 9):
        assert len({(r["task"], r["stage"]) for r in rows[k:k + 9]}) == 9
    judge = [r for r in rows if r["stage"] == "judge"]
    for task in data.TASKS:
        answers = [r["solution"] for r in judge if r["task"] == task]
        assert answers == ["<answer>yes</answer>", "<answer>no</answer>"] * 2, f"{task}: true and false in turn"
    for r in rows:  # every row's reference answer is right in its own form
        assert rewards.score(data.reference_completion(r) if r["stage"] == "open" else
                             "<think></think>" + r["solution"], r["solution"], r["task"], r["stage"])["accuracy"] == 1
    paths = {f: curriculum.write_split(str(tmp_path / f), "train", n=6, seed=1, size=56, stage=f)
             for f in ("judge", "open")}
    cur = Curriculum([StageSpec("mixed", steps=1, data=paths)])
    forms = [r["stage"] for r in cur.next_batch(12)]
    assert forms == ["judge"] * 3 + ["open"] * 3 + ["judge"] * 3 + ["open"] * 3
