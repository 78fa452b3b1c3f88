"""reject_sample.py: phase 2 (rejection sampling -> SFT file -> SFT) on scripted answers and on the tiny random
model, plus the SFT targets and the command line's errors."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
import model as M
import reject_sample as R
from data import samples_of

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-base")

GOOD = "<think>three circles</think><answer>3</answer>"  # right and well formed: accuracy 1, format 1


def scene(colour):
    return Image.new("RGB", (56, 56), colour)


def row(problem, solution, task="math", image=None, stage="open"):
    return {"image": image, "problem": problem, "solution": f"<answer>{solution}</answer>", "task": task,
            "stage": stage}


def scripted(answers_of):
    """A stand-in for rollout.generate that answers each problem with its listed answers, in order."""
    def generate(model, processor, samples, group_size=1, **kw):
        return SimpleNamespace(texts=[a for s in samples for a in answers_of[s["problem"]][:group_size]])
    return generate


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


POOL = [row("How many circles?", 3, image=scene("red")),
        row("How many squares?", 5, image=scene("blue")),
        row("Which colours?", "red, blue", task="classify")]           # text-only
ANSWERS = {
    "How many circles?": ["<answer>3</answer>",                          # right, no think block: total 1
                          "<think>x</think><answer>4</answer>",          # wrong, well formed: total 1
                          GOOD,                                          # total 2
                          "junk"],                                       # total 0
    "How many squares?": ["<think>a</think><answer>4</answer>", "<answer>5</answer>", "5", "<think></think>"],
    "Which colours?": ["<think>a</think><answer>red, blue</answer>", "<think>b</think><answer>blue, red</answer>",
                       "no", "no"],
}
LINEAR = torch.nn.Linear(1, 1)  # rejection_sample only asks the model for its device and mode


def test_filter_keeps_only_the_best_passing_answer(monkeypatch, capsys):
    monkeypatch.setattr(R, "generate", scripted(ANSWERS))
    kept, report = R.rejection_sample(LINEAR, None, POOL, n_samples=4)
    assert [k["answer"] for k in kept] == [GOOD, "<think>a</think><answer>red, blue</answer>"], \
        "default bar (accuracy == 1 and format == 1): the total-2 answer of prompt 1, none of prompt 2, " \
        "and the first of prompt 3's two equally good answers"
    assert [k["index"] for k in kept] == [0, 2] and kept[0]["score"] == 2.0
    assert report["per_task"] == {"classify": {"kept": 1, "total": 1}, "math": {"kept": 1, "total": 2}}
    assert "math      kept     1 / 2" in capsys.readouterr().out, "kept / total per task is printed"

    kept, _ = R.rejection_sample(LINEAR, None, POOL, n_samples=4, bar=1.0)
    assert [k["answer"] for k in kept][:2] == [GOOD, "<think>a</think><answer>4</answer>"], \
        "a lower bar keeps prompt 2's best (total 1), and prompt 1 still keeps its best, not its first"

    kept, report = R.rejection_sample(LINEAR, None, POOL, n_samples=4,
                                      scorer=lambda r, answers: [{"score": 0.0, "passed": False}] * len(answers))
    assert kept == [] and report["kept"] == 0, "a scorer that passes nothing keeps nothing"


def test_the_rule_scorer_scores_with_the_rl_runs_reward_options():
    row = {"solution": "<answer>[0, 0, 10, 10]</answer>", "task": "detection", "stage": "open"}
    box = "<think>a box</think><answer>[0, 0, 10, 6]</answer>"  # IoU 0.6: hard reward 1, IoU reward 0.6
    assert R.RuleScorer(2.0)(row, [box])[0]["passed"], "the default (hard) box reward: 1 + format 1"
    iou = R.RuleScorer(2.0, box_mode="iou")(row, [box])[0]
    assert iou["score"] == pytest.approx(1.6) and not iou["passed"], "--box-reward iou: 0.6 + 1, below the bar"
    assert str(R.RuleScorer(2.0, box_mode="iou")) == "rule rewards, box_mode iou, accuracy + format >= 2"


def test_duplicates_are_dropped(monkeypatch):
    answers = {"How many circles?": [GOOD, GOOD, "<think>c</think><answer>3</answer>", "junk"],
               "Which colours?": ANSWERS["Which colours?"]}
    monkeypatch.setattr(R, "generate", scripted(answers))
    pool = [POOL[0], {**POOL[0], "image": scene("red")},            # same problem, same pixels: one prompt
            {**POOL[0], "image": scene("green")},                   # same problem, another image: another prompt
            POOL[2], dict(POOL[2])]                                  # a text-only prompt twice
    kept, report = R.rejection_sample(LINEAR, None, pool, n_samples=4, per_prompt=2)
    assert report["pool_duplicates"] == 2 and report["total"] == 3, "a prompt (image, problem) is sampled once"
    answers_of = [(k["index"], k["answer"]) for k in kept]
    assert len(set(answers_of)) == len(answers_of), "no prompt + answer pair is kept twice"
    assert [a for i, a in answers_of if i == 0] == [GOOD, "<think>c</think><answer>3</answer>"], \
        "per_prompt=2 keeps the two best DISTINCT answers; the repeated GOOD counts once"
    assert report["duplicate_answers"] == 2, "one repeat of GOOD on each of the two circle prompts"


def test_shards_cover_the_pool_once(monkeypatch):
    monkeypatch.setattr(R, "generate", scripted(ANSWERS))
    whole, _ = R.rejection_sample(LINEAR, None, POOL, n_samples=4, bar=1.0)
    shards = [R.rejection_sample(LINEAR, None, POOL, n_samples=4, bar=1.0, rank=r, world=2)[0] for r in (0, 1)]
    assert sorted(k["index"] for s in shards for k in s) == [k["index"] for k in whole], \
        "rank r samples pool[r::W]: the shards together keep exactly what one process keeps"


def test_sft_file_round_trips_through_load_rows(monkeypatch, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "pool").mkdir()
    (out / "own").mkdir(parents=True)
    scene("yellow").save(tmp_path / "pool" / "a.png")   # an image outside the output folder
    scene("purple").save(out / "own" / "b.png")         # an image inside it
    pool = POOL + [row("Count them.", 3, image=str(tmp_path / "pool" / "a.png"), stage="judge"),
                   row("Count again.", 3, image=str(out / "own" / "b.png"))]
    answers = {**ANSWERS, "Count them.": [GOOD], "Count again.": ["<answer>3</answer>"]}
    monkeypatch.setattr(R, "generate", scripted(answers))
    kept, _ = R.rejection_sample(LINEAR, None, pool, n_samples=1, bar=0.0)
    path = R.write_sft_file(kept, str(out / "sft.jsonl"))

    lines = [json.loads(line) for line in open(path)]
    assert [m["role"] for m in lines[0]["messages"]] == ["user", "assistant"]
    assert lines[0]["image"].startswith("images/") and lines[0]["image"].endswith(".png"), \
        "an in-memory image is saved as a PNG under images/, named relative to the file"
    assert "image" not in lines[2], "a text-only row has no image"
    assert lines[3]["image"] == str(tmp_path / "pool" / "a.png") and lines[4]["image"] == "own/b.png"
    assert lines[3]["stage"] == "judge" and lines[2]["task"] == "classify"

    back = data.load_rows(path)
    assert len(back) == len(kept) == 5
    for k, b in zip(kept, back):
        assert (b["problem"], b["solution"], b["task"], b["stage"]) == (k["problem"], k["solution"], k["task"],
                                                                         k["stage"]), "the file holds what was kept"
        assert (b["image"] is None) == (k["image"] is None)
        if k["image"] is not None:
            assert data.open_image(b).tobytes() == data.open_image(k).tobytes(), "the same pixels"
    assert R.target_text(back[3]) == kept[3]["answer"] == GOOD, "an answer with reasoning is trained as sampled"
    assert R.target_text(back[4]) == "<think></think><answer>3</answer>", \
        "one without a think block is trained in target_text's normal form"


def test_sft_targets_end_with_im_end_and_mask_padding():
    _, processor = M.load("tiny")
    rows = [row("q", 3) | {"solution": GOOD}, row("q", "red, blue, green", task="classify")]
    ids, mask = R.sft_targets(processor, rows)
    for i, r in enumerate(rows):
        text_ids = processor.tokenizer(R.target_text(r), add_special_tokens=False)["input_ids"]
        n = int(mask[i].sum())
        assert n == len(text_ids) + 1, "the mask covers the target's tokens and one <|im_end|>"
        assert ids[i, :n].tolist() == text_ids + [processor.eos_token_id], "each target ends with <|im_end|>"
        assert mask[i, n:].sum() == 0 and (ids[i, n:] == processor.pad_token_id).all(), "padding is masked out"
    assert mask.shape == ids.shape and mask[:, 0].all()


def test_phase2_with_bar_zero_trains_on_what_it_kept(tmp_path):
    model, processor = M.load("tiny", seed=0)
    pool = data.make_split("train", 6, seed=0)
    pool[1]["image"] = None                               # a text-only prompt in the same batch
    before = params(model)
    report = R.phase2(model, processor, pool, str(tmp_path), n_samples=2, lr=1e-3, epochs=1, batch_size=4, bar=0.0,
                      max_new_tokens=8, seed=0)
    assert report["kept"] == 6 and report["sft"]["steps"] == 2, "bar 0 keeps every prompt's best; ceil(6 / 4) steps"
    assert changed(before, model), "the SFT steps must change the weights"
    back = data.load_rows(tmp_path / "sft.jsonl")
    assert len(back) == 6 and back[1]["image"] is None and back[0]["image"] is not None
    saved = json.load(open(tmp_path / "phase2_report.json"))
    assert saved["sft"]["loss_first"] is not None and saved["per_task"]["math"] == {"kept": 2, "total": 2}


def test_phase2_on_a_random_model_keeps_nothing_and_skips_sft(tmp_path, capsys):
    model, processor = M.load("tiny", seed=0)
    before = params(model)
    report = R.phase2(model, processor, data.make_split("train", 3, seed=1), str(tmp_path), n_samples=2,
                      max_new_tokens=8)
    assert report["kept"] == 0 and report["sft"]["skipped"], "a random model writes no right, well-formed answer"
    assert "SFT skipped" in capsys.readouterr().out, "the skip is said in one clear line"
    assert not changed(before, model), "with nothing kept the model is unchanged"
    assert open(tmp_path / "sft.jsonl").read() == ""


def test_sampling_is_seeded():
    model, processor = M.load("tiny", seed=0)
    pool = data.make_split("train", 3, seed=0)
    runs = [R.rejection_sample(model, processor, pool, n_samples=2, bar=0.0, max_new_tokens=6, seed=s)[0]
            for s in (0, 0, 1)]
    answers = [[k["answer"] for k in kept] for kept in runs]
    assert answers[0] == answers[1], "the same seed gives the same answers"
    assert answers[0] != answers[2], "another seed gives other answers"


def test_judge_grades_each_answer_against_the_reference_with_the_image(monkeypatch):
    assert R.parse_judge_score("90") == 90.0 and R.parse_judge_score("Score: 85/100") == 85.0
    assert R.parse_judge_score("no number") == 0.0 and R.parse_judge_score("150") == 0.0
    assert R.parse_judge_score(None) == 0.0 and R.parse_judge_score("<think>7</think>") == 0.0
    seen = []

    answers = [GOOD, "junk <|image_pad|>", "4"]

    def fake_generate(model, processor, samples, group_size=1, greedy=False, **kw):
        if not greedy:                                   # the policy samples the three answers above
            return SimpleNamespace(texts=answers * len(samples))
        seen.extend(samples)                             # the judge replies 90, then no grade, then 84.5
        return SimpleNamespace(texts=["90", "I cannot tell", "<think>close</think> 84.5"][:len(samples)])
    monkeypatch.setattr(R, "generate", fake_generate)
    judge = R.Judge(LINEAR, None)
    image = scene("red")
    verdicts = judge(row("How many circles?", 3, image=image), answers)
    assert [(v["score"], v["passed"]) for v in verdicts] == [(90.0, True), (0.0, False), (84.5, False)], \
        "the judge's number, 0 when it wrote none, passing at >= 85"
    assert all(s["image"] is image for s in seen), "the judge is shown the row's image"
    assert "Reference answer: 3\n" in seen[0]["problem"] and f"Candidate answer: {GOOD}\n" in seen[0]["problem"]
    assert "Candidate answer: junk\n" in seen[1]["problem"], "vision tokens are taken out of the answer"
    seen.clear()
    kept, _ = R.rejection_sample(LINEAR, None, [row("How many circles?", 3)], n_samples=3, scorer=judge)
    assert [k["answer"] for k in kept] == [GOOD] and kept[0]["score"] == 90.0, "the judge's best passing answer"


def test_sft_loss_is_the_token_mean_nll_of_the_targets_alone():
    """sft_loss against a plain forward of each (prompt, target): the prompt and the image are never in the loss,
    and micro-batches divided by the global token count add up to the whole batch's loss."""
    model, processor = M.load(BASE)
    rows = data.make_split("train", 3, seed=4)
    rows[1]["image"] = None
    ids, mask = targets = R.sft_targets(processor, rows)
    n_tok = mask.sum().item()
    loss = R.sft_loss(model, processor, rows, targets, n_tok, "cpu")
    hand = 0.0
    with torch.no_grad():
        for i, r in enumerate(rows):
            one = M.encode(processor, samples_of([r]))
            n = int(mask[i].sum())
            y = ids[i, :n]
            full = torch.cat([one["input_ids"], y[None]], dim=1)
            mm = torch.cat([one["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.int)], dim=1)
            kw = {k: one[k] for k in ("pixel_values", "image_grid_thw") if k in one}
            logits = model(input_ids=full, mm_token_type_ids=mm, attention_mask=torch.ones_like(full), **kw).logits
            hand -= logits[0, -n - 1:-1].log_softmax(-1).gather(1, y[:, None]).sum().item()
    assert loss.item() == pytest.approx(hand / n_tok, rel=1e-5), "- sum of target log-probs / target tokens"
    parts = sum(R.sft_loss(model, processor, rows[i:i + 1], R.sft_targets(processor, rows[i:i + 1]), n_tok, "cpu")
                for i in range(3))
    assert parts.item() == pytest.approx(loss.item(), rel=1e-6), "micro-batches sum to the whole batch's loss"

    finals, losses = [], []
    for micro_batch in (None, 1):
        copy, _ = M.load(BASE)
        trace = []
        R.sft(copy, processor, lambda step: rows, 2, lr=1e-3, warmup=0, micro_batch=micro_batch,
              callback=lambda step, value: trace.append(value))
        finals.append(list(copy.parameters()))
        losses.append(trace)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0][0] == pytest.approx(loss.item(), rel=1e-5)
    # Float rounding only: Adam steps of about lr = 1e-3 each, equal to 1% of one.
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*finals)), "the update does not depend on micro-batching"


def test_command_line_errors_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such folder"):
        R.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="data file not found"):
        R.main(["--model", "tiny", "--phase2-data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="empty.jsonl': no rows"):
        R.main(["--model", "tiny", "--phase2-data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--judge-threshold 500.0: the judge grades 0 to 100"):
        R.main(["--model", "tiny", "--judge-threshold", "500", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--phase2-prompts 9: more than the --pool-size 3 rows"):
        R.main(["--model", "tiny", "--phase2-prompts", "9", "--pool-size", "3", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--out"):
        R.main(["--model", "tiny"])
    out = tmp_path / "run"
    R.main(["--model", "tiny", "--pool-size", "3", "--phase2-prompts", "3", "--phase2-bar", "0", "--phase2-samples",
            "2", "--max-new-tokens", "6", "--phase2-epochs", "1", "--phase2-batch", "3", "--out", str(out)])
    report = json.load(open(out / "phase2_report.json"))
    assert report["kept"] == 3 and report["config"]["phase2"]["phase2_lr"] == 1e-4, \
        "the report records the resolved config"
    assert len(data.load_rows(out / "sft.jsonl")) == 3
    M.load(str(out / "model"))  # the fine-tuned model is a loadable checkpoint
