"""Data: reading Curr-ReFT files (errors name file and line, skip mode counts), mixtures, and the synthetic
world (deterministic, splits disjoint, ood shifted as documented, boxes tight around the drawn pixels)."""
import json
import os
import re
import subprocess
import sys
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import curriculum
import data

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "fixtures", "real")
ROOT = os.path.dirname(HERE)


# -----------------------------------------------------------------------------
# Reading files

def test_bad_row_raises_with_file_and_line():
    with pytest.raises(data.DataError) as e:
        data.load_rows(os.path.join(REAL, "sample.jsonl"))
    message = str(e.value)
    assert "sample.jsonl:4" in message and "image not found" in message and "no_such_file.png" in message, \
        f"the first bad row is line 4 (a missing image) and the error must say so: {message}"


def test_skip_mode_counts_and_keeps_the_good_rows():
    rows = data.load_rows(os.path.join(REAL, "sample.jsonl"), on_error="skip")
    assert rows.skipped == 2 and len(rows) == 4, "lines 4 (missing image) and 5 (malformed) are skipped, 4 kept"
    assert any("sample.jsonl:4: image not found" in e for e in rows.errors)
    assert any("sample.jsonl:5: malformed JSON" in e for e in rows.errors)
    assert [r["problem"][:12] for r in rows] == ["How many cir", "Where is the", "What is 2 pl", "Which shapes"], \
        "good rows keep their file order; a bad row is never replaced by another"
    assert rows[0]["image"] == os.path.join(REAL, "images", "two_circles.png"), "relative to the file's folder"
    assert rows[2]["image"] is None and rows[2]["solution"] == "<answer>5</answer>", "text-only, bare int wrapped"
    assert rows[1]["solution"].startswith("<think>"), "an <answer> solution is kept as it is"
    assert rows[3]["solution"] == "<answer>square</answer>", "a label list becomes comma-separated labels"


def test_bare_int_solution_without_task_uses_default_task():
    path = os.path.join(REAL, "no_task.jsonl")
    rows = data.load_rows(path, default_task="math")
    expected = [("math", "<answer>2</answer>"), ("math", "<answer>1</answer>")]
    assert [(r["task"], r["solution"]) for r in rows] == expected, "bare ints wrapped, the task from default_task"
    with pytest.raises(data.DataError, match=r"no_task\.jsonl:1: missing field `task`"):
        data.load_rows(path)


def test_image_root_and_sft_messages(tmp_path):
    # A copy of the file away from its images: only image_root can find them.
    copy = tmp_path / "no_task.jsonl"
    shutil.copy(os.path.join(REAL, "no_task.jsonl"), copy)
    rows = data.load_rows(copy, image_root=REAL, default_task="math")
    assert [r["image"] for r in rows] == [os.path.join(REAL, "images", "two_circles.png"),
                                          os.path.join(REAL, "images", "blue_square.png")], \
        "relative image paths start from image_root, not from the data file's folder"
    with pytest.raises(data.DataError) as e:
        data.load_rows(copy, default_task="math")
    assert f"no_task.jsonl:1: image not found: {tmp_path / 'images' / 'two_circles.png'}" in str(e.value), \
        f"without image_root, images are looked up beside the file (here: none): {e.value}"
    sft = data.load_rows(os.path.join(REAL, "sft.jsonl"))
    assert sft[0]["problem"] == "Is there a red circle? Answer yes or no.", "the <image> placeholder is removed"
    assert sft[0]["solution"] == "<answer>yes</answer>"
    assert sft[0]["image"].endswith("two_circles.png")


@pytest.mark.parametrize("line, problem", [
    ({"problem": "q", "task": "math"}, "missing field `solution`"),
    ({"solution": "1", "task": "math"}, "missing field `problem`"),
    ({"problem": "q", "solution": "1", "task": "ocr"}, "unknown task 'ocr'"),
    ({"problem": "q", "solution": "1", "task": "math", "image": "bad.png"}, "unreadable image"),
    ({"problem": "q", "solution": "1", "task": "math", "image": "half.jpg"}, "unreadable image"),  # decoded at load
    ({"problem": "q", "solution": "1", "task": "math", "stage": "opn"}, "unknown stage 'opn'"),
    ({"problem": "q <|image_pad|>", "solution": "1", "task": "math"}, "`problem` holds a vision token"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                   {"role": "assistant", "content": "1"}], "task": "math"}, "a message part's `text` is not text"),
])
def test_each_kind_of_bad_row_is_named(tmp_path, line, problem):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    jpeg = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # its header whole, its scan cut short
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "ok", "solution": "1", "task": "math"}) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_rows(path)
    assert f"rows.jsonl:3: {problem}" in str(e.value), f"file, line (blank lines counted) and problem: {e.value}"


def test_an_empty_stage_is_no_stage(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"problem": "q", "solution": "B", "task": "math", "stage": s}) + "\n"
                            for s in (None, "", "choice")))
    rows = data.load_rows(path)
    assert ["stage" in r for r in rows] == [False, False, True], "null and \"\" mean no stage (the file's use)"
    assert [r["stage"] for r in curriculum.prepare_stage_rows(rows, "open")] == ["open", "open", "choice"]


@pytest.mark.parametrize("row, problem", [
    ({"solution": "<answer>[1, 2, 3]</answer>", "task": "detection", "stage": "open"},
     "`solution` '<answer>[1, 2, 3]</answer>': no open answer to a detection row can match it; give a box"),
    ({"solution": "<answer></answer>", "task": "math"}, "`solution` '<answer></answer>': no open answer"),
    ({"solution": "<answer>maybe</answer>", "task": "classify", "stage": "judge"},
     "`solution` '<answer>maybe</answer>': no judge answer to a classify row can match it; give yes or no"),
])
def test_a_question_no_answer_can_get_right_is_named(row, problem):
    """A stage's, the evaluation's or phase 2's row is checked in its own stage, else the stage of its use."""
    rows = [{"problem": "q", "solution": "<answer>B</answer>", "task": "math"}, {"problem": "Is it?", **row}]
    with pytest.raises(data.DataError) as e:
        curriculum.prepare_stage_rows(rows, "open")
    assert f"{row.get('stage', 'open')} row 2 ('Is it?'): {problem}" in str(e.value)


def test_a_row_without_a_stage_is_checked_in_the_stage_of_its_use():
    rows = [{"problem": "Is there a cat?", "solution": "<answer>maybe</answer>", "task": "classify"}]
    assert curriculum.prepare_stage_rows(rows, "open")[0]["stage"] == "open", "a label may be any name"
    with pytest.raises(data.DataError, match="judge row 1 .*no judge answer to a classify row can match it"):
        curriculum.prepare_stage_rows(rows, "judge")
    sft = [{"problem": "Is there a cat?", "solution": "<answer>a cat</answer>", "task": "classify", "stage": "judge"}]
    assert data.parse_row(sft[0], ".")["solution"] == "<answer>a cat</answer>", \
        "an SFT row's solution is the text to learn, read as it is"


def test_json_list_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"problem": "a", "solution": 1, "task": "math"}, {"problem": "b", "solution": 2}]))
    with pytest.raises(data.DataError, match=r"rows\.json: item 2: missing field `task`"):
        data.load_rows(path)
    rows = data.load_rows(path, default_task="math")
    assert [(r["problem"], r["solution"], r["task"], r["image"]) for r in rows] == \
           [("a", "<answer>1</answer>", "math", None), ("b", "<answer>2</answer>", "math", None)], \
        "a JSON list holds one row per item, in order, parsed like a JSONL line"


def test_open_image():
    rows = data.load_rows(os.path.join(REAL, "sample.jsonl"), on_error="skip")
    image = data.open_image(rows[0])
    assert image.mode == "RGB" and image.size == (28, 28)
    assert data.open_image(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(data.DataError, match="text-only"):
        data.open_image(rows[2])
    with pytest.raises(data.DataError, match="image not found: /no/such.png"):
        data.open_image("/no/such.png")


# -----------------------------------------------------------------------------
# Mixtures

def _numbered(tmp_path, name, n):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"problem": f"{name}{i}", "solution": i, "task": "math"}) + "\n"
                            for i in range(n)))
    return str(path)


def test_mixture_rules(tmp_path):
    a, b = _numbered(tmp_path, "a", 10), _numbered(tmp_path, "b", 10)
    problems = lambda spec, seed=0: [r["problem"] for r in data.load_mixture(spec, seed=seed)]
    assert problems(f"{a}:first:3,{b}:last:2") == ["a0", "a1", "a2", "b8", "b9"]
    assert problems(f"{a}:all,{b}") == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)], "all, in order"
    assert problems(f"{a}:first:50%") == ["a0", "a1", "a2", "a3", "a4"], "first:50% is the first half"
    assert problems(f"{a}:last:20%") == ["a8", "a9"], "last:20% is the last fifth"
    sampled = problems(f"{a}:30%")
    assert len(sampled) == len(set(sampled)) == 3 and set(sampled) <= {f"a{i}" for i in range(10)}, \
        "N% alone samples N% of the rows at random, without repeats"
    assert sampled == sorted(sampled, key=lambda p: int(p[1:])), "in file order"
    picked = problems(f"{a}:random:4", seed=1)
    assert picked == problems(f"{a}:random:4", seed=1), "random sampling is deterministic for a seed"
    assert picked == sorted(picked, key=lambda p: int(p[1:])) and len(set(picked)) == 4, "file order, no repeats"
    assert {tuple(problems(f"{a}:random:4", seed=s)) for s in range(5)} != {tuple(picked)}, "seeds differ"
    with pytest.raises(data.DataError, match="asks for 11 rows, the file has 10"):
        data.load_mixture(f"{a}:first:11")
    with pytest.raises(data.DataError, match="bad sampling rule"):
        data.load_mixture(f"{a}:some:3")


def test_mixture_json_file(tmp_path):
    _numbered(tmp_path, "a", 10)
    spec = tmp_path / "mix.json"
    spec.write_text(json.dumps([{"path": "a", "rule": "first:2"}, {"path": "a", "rule": "last:1", "task": "math"}]))
    assert [r["problem"] for r in data.load_mixture(str(spec))] == ["a0", "a1", "a9"], "paths relative to the spec"


@pytest.mark.parametrize("entry, problem", [({"path": None}, "a mixture entry needs a `path` (text)"),
                                             ({"path": "a", "rule": 1}, "`rule` must be text, got 1"),
                                             ({"path": "a", "task": ["math"]}, "`task` must be text")])
def test_a_bad_mixture_entry_is_named(tmp_path, entry, problem):
    _numbered(tmp_path, "a", 2)
    spec = tmp_path / "mix.json"
    spec.write_text(json.dumps([{"path": "a"}, entry]))
    with pytest.raises(data.DataError, match=re.escape(f"mix.json: item 2: {problem}")):
        data.load_mixture(str(spec))


def test_mixture_sums_skipped_rows():
    sample = os.path.join(REAL, "sample.jsonl")
    rows = data.load_mixture(f"{sample}:all,{sample}:first:1", on_error="skip")
    assert len(rows) == 5 and rows.skipped == 4


# -----------------------------------------------------------------------------
# The synthetic world

def _pixels(row):
    return np.asarray(data.open_image(row))


def test_make_split_is_deterministic_and_seeds_differ():
    a, b = data.make_split("train", 6, seed=3), data.make_split("train", 6, seed=3)
    assert [r["meta"] for r in a] == [r["meta"] for r in b] and all(
        np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b)), "same seed, same rows and pixels"
    c = data.make_split("train", 6, seed=4)
    assert [r["meta"]["objects"] for r in a] != [r["meta"]["objects"] for r in c]
    assert [r["task"] for r in a] == list(data.TASKS) * 2, "tasks cycle"


def test_splits_never_share_a_scene():
    layout = lambda rows: {json.dumps(r["meta"]["objects"]) for r in rows}
    train = layout(data.make_rows("train", 400, draw=False))
    held = layout(data.make_rows("test", 200, draw=False)) | layout(data.make_rows("ood", 200, draw=False))
    assert not train & held, "test and ood layouts are held out of train by the layout hash"


def test_scenes_follow_the_rules():
    for split in ("train", "ood", "ood_small"):
        for row in data.make_rows(split, 90, draw=False):
            objects, cell = row["meta"]["objects"], row["meta"]["cell"]
            assert 1 <= len(objects) <= 4 and cell == 16
            assert len({o["colour"] for o in objects}) == len(objects), "colours are unique within a scene"
            for i, o in enumerate(objects):
                assert all(v % cell == 0 and 0 <= v <= 112 for v in o["box"]), "boxes on the 16 px grid, inside"
                side = o["box"][2] - o["box"][0]
                assert side == o["box"][3] - o["box"][1] and side in ((16,) if split == "ood_small" else (16, 32, 48))
                for p in objects[i + 1:]:
                    a, b = o["box"], p["box"]  # disjoint: one box ends (in x or in y) where the other starts
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "objects never overlap"


def test_boxes_tightly_contain_the_drawn_shape():
    for row in data.make_split("train", 45) + data.make_split("ood", 15):
        pixels = _pixels(row)  # (H, W, 3)
        assert pixels.shape == (112, 112, 3)
        for o in row["meta"]["objects"]:
            mask = np.all(pixels == data.COLOURS[o["colour"]], axis=-1)
            ys, xs = np.nonzero(mask)
            drawn = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert drawn == o["box"], f"the {o['colour']} {o['shape']}'s pixels span {drawn}, box says {o['box']}"
        if row["task"] == "detection":
            assert row["solution"] == f"<answer>{data.format_value(row['meta']['answer'])}</answer>"


def test_ood_shifts_only_the_background():
    for split, background in (("test", "light_grey"), ("ood", "light_blue")):
        for row in data.make_split(split, 12):
            pixels = _pixels(row)
            covered = np.zeros((112, 112), bool)
            for o in row["meta"]["objects"]:
                x1, y1, x2, y2 = o["box"]
                covered[y1:y2, x1:x2] = True
            assert np.all(pixels[~covered] == data.BACKGROUNDS[background]), f"{split} background is {background}"
    sizes = lambda split: {o["box"][2] - o["box"][0]
                           for r in data.make_rows(split, 60, draw=False) for o in r["meta"]["objects"]}
    assert sizes("ood") == sizes("test") == {16, 32, 48}, "ood keeps the object sizes: only the background moves"


def test_answers_match_the_scene():
    for row in data.make_rows("test", 120, draw=False):
        m, objects = row["meta"], row["meta"]["objects"]
        count = lambda s: sum(o["shape"] == s for o in objects)
        expected = {
            "locate": lambda: next(o["box"] for o in objects if o["colour"] == m["target"]["colour"]),
            "colours": lambda: [c for c in data.COLOURS if c in {o["colour"] for o in objects}],
            "shapes": lambda: [s for s in data.SHAPES if count(s)],
            "shape_of": lambda: [next(o["shape"] for o in objects if o["colour"] == m["target"]["colour"])],
            "count_all": lambda: len(objects),
            "count_shape": lambda: count(m["target"]["shape"]),
            "sum_shapes": lambda: sum(count(s) for s in m["target"]["shapes"]),
            "width": lambda: next(o["box"][2] - o["box"][0] for o in objects if o["colour"] == m["target"]["colour"]),
            "left": lambda: next(o["box"][0] for o in objects if o["colour"] == m["target"]["colour"]),
        }[m["kind"]]()
        assert m["answer"] == expected, f"{m['question']} -> {m['answer']}, the scene says {expected}"
        assert row["problem"].startswith(m["question"] + "\n") and "<answer></answer>" in row["problem"]


def test_every_kind_is_asked_and_the_base_world_override():
    rows = data.make_rows("train", 600, draw=False)
    assert {r["meta"]["kind"] for r in rows} == {k for kinds in data.KINDS.values() for k in kinds}
    base = data.make_rows("train", 300, draw=False, cells=data.BASE_CELLS, kinds=data.BASE_KINDS)
    assert {r["meta"]["kind"] for r in base} == {k for kinds in data.BASE_KINDS.values() for k in kinds}
    assert {o["box"][2] - o["box"][0] for r in base for o in r["meta"]["objects"]} == {32, 48}
    assert all(r["meta"]["split"] == "train" and not data._layout_bucket(r["meta"]["objects"]) == 0 for r in base)


def test_size_must_be_a_multiple_of_28():
    with pytest.raises(ValueError, match="multiple of 28"):
        data.make_split("train", 1, size=100)
    row = data.make_split("train", 1, size=224)[0]
    assert data.open_image(row).size == (224, 224) and row["meta"]["cell"] == 32


def test_write_split_round_trips_through_load_rows(tmp_path):
    path = curriculum.write_split(str(tmp_path), "test", n=6, seed=2)
    loaded = data.load_rows(path)
    drawn = data.make_split("test", 6, seed=2)
    assert loaded.skipped == 0 and len(loaded) == 6
    for a, b in zip(loaded, drawn):
        fields = ("problem", "solution", "task", "meta", "stage")
        assert [a[k] for k in fields] == [b[k] for k in fields], "the JSONL holds the row as drawn"
        assert np.array_equal(_pixels(a), _pixels(b)), "the PNG holds exactly the drawn pixels"


def test_command_line_writes_stage_files(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "curriculum.py"), "--out", str(tmp_path), "--split", "ood",
                          "--n", "4", "--stage", "judge"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = data.load_rows(tmp_path / "ood_judge.jsonl")
    assert [r["solution"] for r in rows] == ["<answer>yes</answer>", "<answer>no</answer>"] * 2
    assert all(r["stage"] == "judge" and r["problem"].endswith(data.INSTRUCTIONS["judge"]) for r in rows)


def test_tokenizer_corpus_is_fast_and_covers_every_form():
    start = time.perf_counter()
    texts = curriculum.tokenizer_corpus()
    assert time.perf_counter() - start < 1.0, "the corpus must build in under a second"
    assert len(texts) == 1000 and texts == curriculum.tokenizer_corpus()
    joined = "\n".join(texts)
    for text in data.INSTRUCTIONS.values():
        assert text in joined, f"instruction missing from the corpus: {text}"
    assert all(t.count("<think>") == 2 and t.rstrip().endswith("</answer>") for t in texts), \
        "each text is a prompt (naming the tags) and a think + answer completion"
    for word in list(data.SHAPES) + list(data.COLOURS) + list(data.PLURALS.values()):
        assert word in joined
