"""eval.py: pass@k against hand values, metrics that score the answer block strictly (a label superset is not
exact, a count in the reasoning is not an answer), sharded sums equal whole sums, every split x task cell
present with its n, one table row per model, and the command line end to end."""
import json
import math
import os
import re

import pytest

import torch

import curriculum
import data
import eval as E
import model as M
import rewards
from rollout import generate

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "fixtures", "real")


def think(answer, reasoning="let me look"):
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


# -----------------------------------------------------------------------------
# pass@k

def test_pass_at_k_hand_values():
    assert E.pass_at_k(5, 2, 1) == pytest.approx(0.4), "pass@1 is the fraction right: 2 of 5"
    assert E.pass_at_k(5, 2, 5) == 1.0 and E.pass_at_k(5, 1, 5) == 1.0, "k = n: any right sample passes"
    assert E.pass_at_k(5, 0, 1) == 0.0 and E.pass_at_k(5, 0, 5) == 0.0, "no right sample: pass@k is 0"
    for n, c, k in [(8, 3, 4), (10, 1, 2), (6, 4, 3)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert E.pass_at_k(n, c, k) == pytest.approx(exact), f"the product form equals 1 - C(n-c,k)/C(n,k) at {n, c, k}"
    with pytest.raises(ValueError):
        E.pass_at_k(4, 1, 5)  # k > n has no unbiased estimate


# -----------------------------------------------------------------------------
# Scores of one answer and their aggregation

def records(rows_and_texts, split="test"):
    return [{"split": split, **E.score_answer(text, row)} for row, text in rows_and_texts]


def test_label_superset_is_not_exact():
    row = {"solution": "<answer>red, blue</answer>", "task": "classify"}
    cell = E.metrics(records([(row, think("blue, red")), (row, think("red, blue, green"))]))["test"]["classify"]["open"]
    assert cell["n"] == 2
    assert cell["exact"] == 0.5 and cell["accuracy"] == 0.5, \
        "the superset {red, blue, green} is not the exact set (the release counted it right)"
    assert cell["f1"] == pytest.approx((1.0 + 0.8) / 2), "F1 of the superset is 2*2/(3+2) = 0.8"
    assert cell["exact_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 2)), "se of a rate is sqrt(p(1-p)/n)"


def test_count_in_reasoning_is_not_the_answer():
    row = {"solution": 3, "task": "math"}   # a bare integer, as some public test files store it
    texts = [think("4", "I count 3 circles"),       # the right count only in the reasoning: wrong
             "<think>there are 3</think>",          # no answer block at all: wrong
             "The answer is 3",                     # a number in the output, but no answer block: wrong
             think("3", "one, two, three")]          # right
    cell = E.metrics(records([(row, t) for t in texts]))["test"]["math"]["open"]
    assert cell["accuracy"] == 0.25, "only the answer block's final number counts (the release counted any number)"
    assert cell["format"] == 0.5, "format: think + answer blocks with a parsable answer, 2 of 4"


def test_detection_accuracy_is_iou_at_least_half():
    row = {"solution": "<answer>[0, 0, 10, 10]</answer>", "task": "detection"}
    texts = [think("[0, 0, 10, 5]"),                     # IoU exactly 0.5: a hit (>= 0.5)
             think("[0, 0, 10, 4]"),                     # IoU 0.4: a miss
             think("no idea", "[0, 0, 10, 10]")]         # the box only in the reasoning: IoU 0
    cell = E.metrics(records([(row, t) for t in texts]))["test"]["detection"]["open"]
    assert cell["acc@0.5"] == pytest.approx(1 / 3) and cell["accuracy"] == cell["acc@0.5"]
    assert cell["iou_mean"] == pytest.approx((0.5 + 0.4 + 0.0) / 3), "mean IoU counts an unparsed box as 0"


def test_sharded_sums_equal_the_whole():
    rows = [({"solution": "<answer>yes</answer>", "task": "math", "stage": "judge"}, think(a)) for a in
            ("yes", "no", "yes", "maybe", "yes")]
    recs = records(rows) + records(rows[:2], split="ood")
    cells = list(dict.fromkeys((r["split"], r["task"], r["stage"]) for r in recs))
    other = {}
    E.metrics(recs[1::2], cells, reduce=lambda t: other.setdefault("sums", t))   # "rank 1"
    merged = E.metrics(recs[0::2], cells, reduce=lambda t: t + other["sums"])   # rank 0 + all-reduce
    whole = E.metrics(recs, cells)
    for split, task, stage in cells:
        assert merged[split][task][stage] == pytest.approx(whole[split][task][stage]), \
            "rows split over ranks and all-reduced give the metrics of all rows"
    assert merged["test"]["math"]["judge"]["n"] == 5 and merged["ood"]["math"]["judge"]["n"] == 2


# -----------------------------------------------------------------------------
# Models: the shipped base, whose answers are right often enough that a mis-scored row shows

ROOT = os.path.dirname(HERE)
BASE = os.path.join(ROOT, "assets", "tiny-base")
# Lower bounds on the base's in-domain accuracy over 16 rows per cell (chance: judge 0.5, choice <= 0.25, open
# about 0.01 for a box and 0.2 for labels or a count); the base measured 0.81 / 0.62 / 0.31 (detection judge /
# choice / open), 0.81 / 0.25 / 0.75 (classification) and 0.88 / 0.75 / 0.81 (math) on these rows.
BOUNDS = {("detection", "judge"): 0.7, ("detection", "choice"): 0.45, ("detection", "open"): 0.2,
          ("classify", "judge"): 0.7, ("classify", "open"): 0.55,
          ("math", "judge"): 0.7, ("math", "choice"): 0.55, ("math", "open"): 0.6}


@pytest.fixture(scope="module")
def base():
    model, processor = M.load(BASE)
    return model.eval(), processor


@pytest.fixture(scope="module")
def tiny():
    model, processor = M.load("tiny")
    return model.eval(), processor


@pytest.fixture(scope="module")
def base_eval(base, tiny):
    sets = E.eval_sets_synthetic(n=48, seed=0, stages=("judge", "choice", "open"))   # 16 rows per task and form
    records = {}
    results = E.evaluate_models([("base", *base)], sets, max_new_tokens=64, samples=2, pass_k=(1, 2), seed=5,
                                records_out=records)
    results |= E.evaluate_models([("random", *tiny)], sets, max_new_tokens=8, samples=2, pass_k=(1, 2))  # never stops
    return sets, results, records


def test_the_base_scores_above_chance_on_every_task(base_eval):
    sets, results, _ = base_eval
    for (task, stage), bound in BOUNDS.items():
        cell = results["base"]["test"][task][stage]
        assert cell["n"] == 16, f"{task}/{stage}: n is the number of rows given"
        assert cell["accuracy"] >= bound, f"the base answers {task}/{stage} above chance: {cell['accuracy']} < {bound}"
    assert all(c["accuracy"] == 0.0 for t in results["random"]["test"].values() for c in t.values()), \
        "an untrained model answers nothing right"
    table = E.markdown_table(results).split("\n\n")[0].splitlines()
    det = results["base"]["test"]["detection"]["open"]
    assert table[2].startswith("| base |") and table[3].startswith("| random |"), "one row per model, in order"
    assert f"| {100 * det['acc@0.5']:.1f} ± {100 * det['acc@0.5_se']:.1f} |" in table[2], "the table shows the cell"


def test_each_answer_is_scored_against_its_own_row(base, base_eval):
    """Every record is the score of the row's own answer, generated here one row at a time: greedy, and the two
    samples from the row's own generator (seed * 1_000_003 + its index in the split)."""
    model, processor = base
    sets, _, records = base_eval
    split, rows = "test", sets["test"]
    mine = [r for r in records["base"] if r["split"] == split]
    assert len(mine) == len(rows)
    for i in range(0, len(rows), 7):      # every 7th row, so every task and form is met
        row, record = rows[i], mine[i]
        greedy = generate(model, processor, data.samples_of([row]), max_new_tokens=64, greedy=True).texts[0]
        assert record == {**record, **E.score_answer(greedy, row)}, f"row {i} is scored on its own greedy answer"
        sampled = generate(model, processor, data.samples_of([row]), group_size=2, max_new_tokens=64, temperature=1.0,
                           generator=[torch.Generator().manual_seed(5 * 1_000_003 + i)]).texts
        c = sum(E.score_answer(t, row)["accuracy"] == 1.0 for t in sampled)
        assert (record["pass@1"], record["pass@2"]) == (c / 2, float(c > 0)), f"row {i}: pass@k of its own samples"
    assert sum(r["accuracy"] for r in mine) > 0.5 * len(mine), "most of the base's answers are right"


def test_ranks_answer_their_share_of_the_rows_with_the_same_seeds(base, monkeypatch):
    """Under torchrun rank r answers rows[r::W], its samples seeded by each row's index in the whole split: the
    two ranks' records, interleaved, are one process's records."""
    sets = E.eval_sets_synthetic(n=6, seed=1)
    kw = dict(max_new_tokens=64, samples=2, pass_k=(1, 2), seed=3)
    whole = {}
    E.evaluate_models([("base", *base)], sets, records_out=whole, **kw)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(E, "_rank_world", lambda rank=rank: (rank, 2))
        records = {}
        E.evaluate_models([("base", *base)], sets, records_out=records, **kw)
        shards.append(records["base"])
    for split in sets:
        mine = [[r for r in shard if r["split"] == split] for shard in shards]
        merged = [r for pair in zip(*mine) for r in pair]
        assert merged == [r for r in whole["base"] if r["split"] == split], f"{split}: ranks split the rows exactly"
    assert 0 < sum(r["pass@2"] for r in whole["base"]) < len(whole["base"]), "the samples are not all right or wrong"


def test_forked_batches_give_the_answers_of_one_process(base):
    """answers(workers=2) deals its batches to two forked processes: the same answers, greedy and sampled, in order."""
    model, processor = base
    rows = data.make_split("test", 6)
    for kw in (dict(batch_size=4), dict(batch_size=4, samples=2, seed=1)):   # 2 and 3 batches
        one = E.answers(model, processor, rows, max_new_tokens=12, **kw)
        assert E.answers(model, processor, rows, max_new_tokens=12, workers=2, **kw) == one, kw
        assert len(set(map(str, one))) > 1, "the rows' answers differ, so an order mix-up shows"


def test_sampled_answers_do_not_depend_on_batching(base):
    model, processor = base
    rows = data.make_split("test", 3)
    whole = E.answers(model, processor, rows, batch_size=64, max_new_tokens=12, samples=2, seed=1)
    split = E.answers(model, processor, rows, batch_size=2, max_new_tokens=12, samples=2, seed=1)
    assert whole == split, "prompt i is sampled from its own seeded generator, whatever its batch-mates (or rank)"
    assert E.answers(model, processor, rows, max_new_tokens=12, samples=2, seed=2) != whole, "the seed matters"


def test_quick_evaluate_is_the_mean_training_reward(base):
    model, processor = base
    rows = curriculum.stage_rows(data.make_split("test", 12, seed=2), "choice")
    texts = [generate(model, processor, data.samples_of([r]), max_new_tokens=64, greedy=True).texts[0] for r in rows]
    right = [i for i, t in enumerate(texts) if rewards.score(t, rows[i]["solution"], rows[i]["task"], "choice")
             ["accuracy"] == 1.0]
    k = right[0]  # a right answer, made a proper subset of the right letters: partial credit
    rows[k] = {**rows[k], "solution": "<answer>A, B, C, D</answer>"}
    model.train()
    out = E.evaluate(model, processor, rows, max_new_tokens=64, reward_options={"choice_partial": 0.5})
    assert model.training, "the model is left in the mode it was in"
    model.eval()
    for task in data.TASKS:
        scores = [rewards.score(t, r["solution"], task, "choice", choice_partial=0.5)
                  for t, r in zip(texts, rows) if r["task"] == task]
        cell = out[(task, "choice")]
        assert cell["n"] == len(scores) == 4
        assert cell["accuracy"] == pytest.approx(sum(s["accuracy"] for s in scores) / 4), \
            f"{task}: the training reward's accuracy (partial credit included) of each row's own answer"
        assert cell["format"] == pytest.approx(sum(s["format"] for s in scores) / 4)
    assert rewards.score(texts[k], rows[k]["solution"], rows[k]["task"], "choice", choice_partial=0.5)["accuracy"] \
        == 0.5, "one right answer became a proper subset of four right letters: partial credit, used above"


# -----------------------------------------------------------------------------
# Data and the command line

def test_real_test_file_without_task_loads_with_default_task():
    sets = E.load_eval_sets(f"ood={os.path.join(REAL, 'no_task.jsonl')}", default_task="math")
    rows = sets["ood"]
    assert [r["task"] for r in rows] == ["math", "math"] and rows[0]["solution"] == "<answer>2</answer>"
    assert "<answer>" in rows[0]["problem"], "a problem without instructions gets the stage's instruction line"


def test_cli_end_to_end(base, tmp_path, capsys):
    out = tmp_path / "results.json"
    E.main(["--model", f"{BASE},tiny", "--n", "12", "--seed", "3", "--max-new-tokens", "64", "--out", str(out)])
    table = capsys.readouterr().out
    assert f"| {BASE} |" in table and "| tiny |" in table and f"Change from {BASE}" in table
    saved = json.loads(out.read_text())
    want = E.evaluate_models([(BASE, *base)], E.eval_sets_synthetic(n=12, seed=3), max_new_tokens=64)[BASE]
    assert saved["results"][BASE] == json.loads(json.dumps(want)), "the command line evaluates the rows its flags name"
    assert want["test"]["math"]["open"]["n"] == 4 and want["test"]["math"]["open"]["accuracy"] > 0
    change = saved["changes"][f"tiny − {BASE}"]["test"]["classify"]["open"]
    assert change["accuracy"] == pytest.approx(-want["test"]["classify"]["open"]["accuracy"]), \
        "the random model's change from the base is minus the base's accuracy (it answers nothing right)"


def test_bad_input_names_it(tmp_path):
    with pytest.raises(SystemExit, match="no_such_model"):
        E.main(["--model", str(tmp_path / "no_such_model")])
    with pytest.raises(SystemExit, match="missing.jsonl"):
        E.main(["--model", "tiny", "--data", f"test={tmp_path / 'missing.jsonl'}"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--cuda-graphs needs a GPU"):
            E.main(["--model", "tiny", "--n", "3", "--cuda-graphs", "--device", "cpu"])


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be >= 1"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"), (["--samples", "-1"], "--samples must be >= 0"),
    (["--threads", "-1"], "--threads must be >= 0"), (["--max-pixels", "0"], "--max-pixels must be >= 1"),
    (["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    (["--pass-k", "a", "--samples", "2"], "--pass-k 'a': give whole numbers"),
    (["--stages", "open,open"], "--stages 'open,open': expected some of judge, choice, open, each once"),
    (["--image-size", "100"], "--image-size must be a multiple of 28"),
    (["--model", "tiny,tiny"], "--model names 'tiny' twice"),
    (["--n", "2"], "--n must be >= 3 on the synthetic sets")])
def test_bad_numbers_and_devices_stop_before_any_model_is_loaded(monkeypatch, flags, message):
    monkeypatch.setattr(E, "evaluate_models", lambda *a, **k: pytest.fail("the evaluation ran"))
    with pytest.raises(SystemExit, match="error: " + re.escape(message)):
        E.main(["--model", "tiny"] + flags)


def test_a_bad_checkpoint_stops_before_any_model_is_evaluated(tmp_path, monkeypatch):
    """Every --model folder is read as far as its header before the first model's evaluation."""
    import shutil
    monkeypatch.setattr(E, "evaluate_models", lambda *a, **k: pytest.fail("the evaluation ran"))
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-base")
    other, cut, bare = (shutil.copytree(base, tmp_path / name) for name in ("llama", "cut", "bare"))
    config_file = other / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "llama"}))
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    os.remove(bare / "model.safetensors")
    for folder, message in ((other, "has model_type 'llama'"), (cut, "model.safetensors cannot be read"),
                            (bare, "it has no weights")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            E.main(["--model", f"{base},{folder}", "--n", "3"])


def test_the_synthetic_images_have_the_image_size(monkeypatch):
    seen = {}

    def evaluate_models(models, sets, *args, **kwargs):
        seen.update(sets)
        raise KeyboardInterrupt  # the sets are what this test needs
    monkeypatch.setattr(E, "evaluate_models", evaluate_models)
    with pytest.raises(KeyboardInterrupt):
        E.main(["--model", "tiny", "--n", "3", "--image-size", "56"])
    assert {data.open_image(r).size for rows in seen.values() for r in rows} == {(56, 56)}, \
        "train.py's --image-size, which ablate.py passes on"


def test_paired_differences_are_per_row_changes_with_a_paired_se():
    rows_a = [{"split": "test", "task": "math", "stage": "open", "accuracy": a, "format": 1.0} for a in (1, 0, 0, 1, 0)]
    rows_b = [{**r, "accuracy": b} for r, b in zip(rows_a, (1, 1, 0, 1, 1))]
    d = E.paired_differences(rows_a, rows_b, [("test", "math", "open")])["test"]["math"]["open"]
    changes = [0, 1, 0, 0, 1]
    mean = sum(changes) / 5
    assert d["n"] == 5 and abs(d["accuracy"] - mean) < 1e-12 and d["format"] == 0.0
    assert abs(d["accuracy_se"] - math.sqrt((sum(c * c for c in changes) / 5 - mean ** 2) / 5)) < 1e-12
    same = E.paired_differences(rows_a, rows_a, [("test", "math", "open")])["test"]["math"]["open"]
    assert same["accuracy"] == 0.0 and same["accuracy_se"] == 0.0, "a model against itself changes nothing"
    with pytest.raises(ValueError, match="same rows"):
        E.paired_differences(rows_a, rows_b[:4], [("test", "math", "open")])
    table = E.markdown_table({"b − a": E.paired_differences(rows_a, rows_b, [("test", "math", "open")])}, True)
    assert "+40.0 ± " in table and "format" not in table.split("\n")[0]
