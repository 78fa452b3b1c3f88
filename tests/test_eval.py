"""eval.py: pass@k against hand values, metrics that score the answer block strictly (a label superset is not
exact, a count in the reasoning is not an answer), sharded sums equal whole sums, every split x task cell
present with its n, one table row per model, and the command line end to end."""
import json
import math
import os

import pytest

import data
import eval as E
import model as M

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
# Models

@pytest.fixture(scope="module")
def tiny():
    model, processor = M.load("tiny")
    return model.eval(), processor


def test_evaluate_models_has_every_cell(tiny):
    model, processor = tiny
    sets = E.eval_sets_synthetic(n=3, seed=0, stages=("judge", "open"))   # 1 row per task and form, 6 a split
    results = E.evaluate_models([("a", model, processor), ("b", model, processor)], sets, max_new_tokens=4,
                                samples=2, pass_k=(1, 2))
    assert list(results) == ["a", "b"]
    for split, rows in sets.items():
        for task in data.TASKS:
            for stage in ("judge", "open"):
                cell = results["a"][split][task][stage]
                given = sum(r["task"] == task and r["stage"] == stage for r in rows)
                assert cell["n"] == given == 1, f"{split}/{task}/{stage}: n is the number of rows given"
                for name in E.metric_names(task, stage, (1, 2)):
                    assert 0.0 <= cell[name] <= 1.0 and cell[name + "_se"] >= 0.0, f"{name} is a rate with its se"
    assert results["a"] == results["b"], "the same model gives the same numbers (greedy, seeded samples)"
    table = E.markdown_table(results).split("\n\n")[0].splitlines()
    assert len(table) == 2 + 2, f"header, rule and one row per model:\n{table}"
    assert table[2].startswith("| a |") and " ± " in table[2] and "det acc@0.5 test" in table[0]


def test_sampled_answers_do_not_depend_on_batching(tiny):
    model, processor = tiny
    rows = data.make_split("test", 3)
    whole = E.answers(model, processor, rows, batch_size=64, max_new_tokens=4, samples=2, seed=1)
    split = E.answers(model, processor, rows, batch_size=2, max_new_tokens=4, samples=2, seed=1)
    assert whole == split, "prompt i is sampled from its own seeded generator, whatever its batch-mates (or rank)"


def test_quick_evaluate_keeps_its_keys(tiny):
    model, processor = tiny
    out = E.evaluate(model, processor, data.make_split("test", 3), max_new_tokens=4)
    assert set(out) == {(t, "open") for t in data.TASKS} and all(c["n"] == 1 for c in out.values())
    assert "iou" in out[("detection", "open")], "reject_sample.py and train.py read these keys"


# -----------------------------------------------------------------------------
# Data and the command line

def test_real_test_file_without_task_loads_with_default_task():
    sets = E.load_eval_sets(f"ood={os.path.join(REAL, 'no_task.jsonl')}", default_task="math")
    rows = sets["ood"]
    assert [r["task"] for r in rows] == ["math", "math"] and rows[0]["solution"] == "<answer>2</answer>"
    assert "<answer>" in rows[0]["problem"], "a problem without instructions gets the stage's instruction line"


def test_cli_end_to_end(tiny, tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    M.save(*tiny, path)   # the tiny random model, M.load("tiny")
    out = tmp_path / "results.json"
    E.main(["--model", path, "--n", "6", "--max-new-tokens", "4", "--out", str(out)])
    table = capsys.readouterr().out
    assert f"| {path} |" in table, "the table has the model's row"
    results = json.loads(out.read_text())["results"][path]
    assert {(s, t) for s in results for t in results[s]} == {(s, t) for s in ("test", "ood") for t in data.TASKS}
    assert all(results[s][t]["open"]["n"] == 2 for s in results for t in results[s]), "--n 6: 2 rows per task"


def test_bad_input_names_it(tmp_path):
    with pytest.raises(SystemExit, match="no_such_model"):
        E.main(["--model", str(tmp_path / "no_such_model")])
    with pytest.raises(SystemExit, match="missing.jsonl"):
        E.main(["--model", "tiny", "--data", f"test={tmp_path / 'missing.jsonl'}"])


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
