"""train.py: configuration errors, one process == two processes for a step, and kill + resume == uninterrupted.

The two multi-process tests launch real runs (torchrun with gloo, SIGKILL); they take about half a minute
each on a 2-core CPU and are marked slow: `python -m pytest -m slow tests/test_train.py` runs them.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import config
import reject_sample as R
import report
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny-base")
# One short choice-stage run from the shipped base (the form with the most reward variance, so a step moves
# the weights): 8 prompts x G=4 per step, small pool, no phase 2 or eval.
QUICK = ["--model", BASE, "--stages", "choice", "--group-size", "4", "--prompts-per-step", "8", "--micro-batch", "4",
         "--pool-size", "40", "--max-new-tokens", "24", "--no-phase2", "--eval-n", "0", "--threads", "1"]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def run(args, out, env=None, torchrun=0):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--master_port=29531"]
           if torchrun else [sys.executable]) + [os.path.join(ROOT, "train.py")] + args + ["--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "1"], "group-size must be >= 2"),
    (["--group-size", "4,2"], "one value or one per stage"),
    (["--stage-steps", "x"], "--stage-steps 'x': give whole numbers"),
    (["--stages", "judge,exam"], "--stages"),
    (["--eval-stages", "open,open"], "--eval-stages: unknown or repeated forms \\['open'\\]"),
    (["--lr", "-1"], "lr > 0"),
    (["--image-size", "100"], "multiple of 28"),
    (["--image-size", "0"], "multiple of 28"),
    (["--pool-size", "0"], "pool-size >= 1"),
    (["--eval-n", "-1"], "eval-n >= 0"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1"),
    (["--threads", "-1"], "threads >= 0"),
    (["--sample-every", "-1"], "sample-every >= 0"),
    (["--choice-partial", "2"], "--choice-partial must be between 0 and 1"),
    (["--phase2-bar", "3"], "--phase2-bar: at most 2"),
    (["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    (["--model", "/no/such/folder"], "neither 'tiny' nor a folder"),
    (["--attn", "flash_attention_2"], "needs the flash-attn package"),
    (["--cuda-graphs"], "needs a GPU"),    # this suite runs on a CPU
    # data errors are found before the first step, not after hours of training
    (["--eval-data", "test=/no/such.jsonl"], "data file not found: /no/such.jsonl"),
    (["--phase2-data", "/no/such.jsonl"], "data file not found: /no/such.jsonl"),
    (["--stage-data", "choice=/no/such.jsonl"], "data file not found: /no/such.jsonl"),
    (["--eval-data", "test=" + os.path.join(ROOT, "tests", "fixtures", "real", "sample.jsonl")],
     "--eval-data test=" + os.path.join(ROOT, "tests", "fixtures", "real", "sample.jsonl") + ": "),
    (["--eval-data", "test=" + os.path.join(ROOT, "tests", "fixtures", "real", "sample.jsonl")],
     "sample.jsonl:4: image not found"),
    (["--stages", "open", "--stage-data", "judge=/no/such.jsonl"], "stage data given for stages not in the schedule"),
    (["--lr", "inf"], "--lr inf: give a finite number"),
    (["--temperature", "inf", "--beta", "nan"], "--temperature inf, --beta nan: give a finite number"),
    (["--eval-n", "2"], "--eval-n 2: at least 3"),
    (["--phase2-prompts", "81", "--pool-size", "80"], "--phase2-prompts 81: more than the --pool-size 80 rows"),
    (["--phase2-data", os.path.join(ROOT, "tests", "fixtures", "empty.jsonl")], "empty.jsonl': no rows"),
])
def test_bad_config_is_a_clear_error(tmp_path, flags, message):
    with pytest.raises(SystemExit, match="error: .*" + message.replace("-", r"\-").replace("+", r"\+")):
        train.main(flags + ["--out", str(tmp_path / "out")])


def test_presets_and_flags():
    cfg = config.make_config(["--preset", "qwen2.5-vl-3b", "--model", ROOT, "--lr", "1e-5"])
    assert cfg.rl.lr == 1e-5, "a flag overrides the preset"
    assert cfg.rl.group_size == "4,2,4" and cfg.rl.beta == 0.04 and cfg.rl.max_new_tokens == 256
    assert cfg.rl.prompts_per_step == 8 and cfg.model.dtype == "bfloat16"
    assert config.make_config(["--no-phase2"]).phase2.phase2 is False, "boolean flags are real booleans"
    with pytest.raises(SystemExit):
        config.make_config(["--agg", "mean"])  # not a choice: argparse's error


def test_a_run_with_replay_reports_the_replayed_accuracy(tmp_path):
    r = run(QUICK[:2] + ["--stages", "choice,open", "--stage-steps", "1", "--replay", "0.5"] + QUICK[4:], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["stage"] == "choice" and "replay_accuracy" in first, "the choice stage logs its replayed questions"
    v = first["replay_accuracy"]
    assert f"replayed open questions | accuracy {v:.3f} -> {v:.3f}" in r.stdout, "the stage summary prints them"
    assert "replay_accuracy" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1]), \
        "the open stage replays nothing"


@pytest.mark.parametrize("steps, every, dumped", [(2, 1, [1, 2]), (3, 2, [1, 3])])
def test_sample_every_n_dumps_steps_1_then_every_nth(tmp_path, steps, every, dumped):
    import json
    r = run(QUICK + ["--stage-steps", str(steps), "--sample-every", str(every)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == dumped
    assert all(row["stage"] == "choice" and "answer" in row for row in rows), rows[0]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one = run(QUICK + ["--stage-steps", "1"], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(QUICK + ["--stage-steps", "1"], tmp_path / "two", torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one/stages/1_final"), weights(tmp_path / "two/stages/1_final")
    start = weights(tmp_path / "one/stages/0_choice_start")
    assert any(not torch.equal(a[k], start[k]) for k in a), "the step must change the weights"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), f"{k}: 2 processes must match 1 process"


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    args = QUICK + ["--stage-steps", "4", "--ckpt-every", "1"]
    full = run(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args + ["--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step_000002"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text() < "step_000004", "the run must be killed before it ends"
    resumed = run(args + ["--resume"], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "full/stages/1_final"), weights(out / "stages/1_final")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: kill + resume must end with the uninterrupted run's weights"


def test_reward_plot_and_stage_summary(tmp_path):
    from PIL import Image
    metrics = [{"stage": s, "reward_total": v, "reward_accuracy": v / 2, "seconds": 1.0}
               for s, vals in (("judge", [0.5] * 10 + [1.5] * 10), ("open", [1.0] * 20)) for v in vals]
    report.plot_rewards(metrics, tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size == (960, 360)
    text = report.stage_summary(metrics)
    import numpy as np
    ys = np.array([0.25] * 10 + [0.75] * 10)
    (slope, _), (res,), *_ = np.polyfit(np.arange(20), ys, 1, full=True)
    se = np.sqrt(res / 18 / ((np.arange(20) - 9.5) ** 2).sum()) * 19  # the fitted change's standard error
    assert (f"judge    20 steps | accuracy 0.250 -> 0.750 | change {slope * 19:+.3f} +- {se:.3f} | "
            f"reward 0.500 -> 1.500 | 20s") in text, text
    assert "replayed" not in text
    metrics[0]["replay_accuracy"], metrics[19]["replay_accuracy"] = 0.25, 0.75
    assert "replayed open questions | accuracy 0.250 -> 0.750" in report.stage_summary(metrics)
    assert "open     20 steps | accuracy 0.500 -> 0.500 | change +0.000 +- 0.000 |" in text, "flat: no change"
    assert "judge     2 steps | accuracy 0.250 -> 0.250 | change n/a (under 3 steps) |" in \
        report.stage_summary(metrics[:2]), "two steps: no line to fit"


def test_change_plot_of_wide_intervals(tmp_path):
    from PIL import Image
    cell = ("test", "math", "open")
    for half in (0.05, 4.7, 40.0):  # up to +-4,000 points: two seeds that disagree give t = 12.7
        report.plot_changes({"RL": {cell: {"mean": 0.4, "half": half}}, "B": {cell: {"mean": -0.1, "half": 0.0}}},
                            tmp_path / "c.png")
        assert Image.open(tmp_path / "c.png").size == (960, 400)


def test_per_stage_values_map_by_stage_name():
    assert config.per_stage("100,100,150", ["judge", "choice", "open"], "stage_steps") == [100, 100, 150]
    assert config.per_stage("100,100,150", ["open"], "stage_steps") == [150], "three values name the three stages"
    assert config.per_stage("4,2,4", ["choice", "open"], "group_size") == [2, 4]
    assert config.per_stage("100,100,150", ["open", "choice", "judge"], "stage_steps") == [150, 100, 100], \
        "all three stages in another order still take their own values"
    assert config.per_stage("7", ["open", "judge"], "stage_steps") == [7, 7]
    with pytest.raises(ValueError, match="one value or one per stage"):
        config.per_stage("1,2", ["open"], "stage_steps")


def test_replay_ratios(monkeypatch):
    rl = lambda text, **kw: config.RLConfig(replay=text, **kw)
    assert config.replay_ratios(rl("0.25"), ["judge", "choice", "open"]) == [0.25, 0.25, 0.0], "open asks open anyway"
    assert config.replay_ratios(rl("0.125,0.5,0"), ["judge", "choice", "open"]) == [0.125, 0.5, 0.0]
    assert config.replay_ratios(rl("0.3"), ["open"]) == [0.0]
    assert config.replay_ratios(rl("0.25"), ["judge"]) == [0.0], "one value: nothing to rehearse without open"
    with pytest.raises(ValueError, match="include open"):
        config.replay_ratios(rl("0.25,0"), ["judge", "choice"])
    with pytest.raises(ValueError, match="in \\[0, 4\\]"):
        config.replay_ratios(rl("5"), ["judge", "open"])
    with pytest.raises(ValueError, match="whole number"):
        config.replay_ratios(rl("0.1"), ["judge", "open"])  # 3.2 more prompts
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(ValueError, match="multiple of the 16 processes"):
        config.replay_ratios(rl("0.25"), ["judge", "open"])  # 40 prompts
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--prompts-per-step 3 must split evenly over 2 processes"):
        config.make_config(["--prompts-per-step", "3"])  # no replay: the prompts' flag is the one to fix


# -----------------------------------------------------------------------------
# Whole runs in this process: a resume past the first stage, phase 2

class Killed(Exception):
    """A stand-in for SIGKILL: raised from inside the run, after the step it names was logged."""


def kill_before_checkpoint(monkeypatch, at_step):
    """Make the run die just before it writes the checkpoint of global step `at_step` (that step is logged)."""
    save = train.save_checkpoint

    def dying(out, step, *args, **kwargs):
        if step == at_step:
            raise Killed(f"killed before the checkpoint of step {at_step}")
        return save(out, step, *args, **kwargs)
    monkeypatch.setattr(train, "save_checkpoint", dying)


# Three stages of 2 steps, a checkpoint every step, no phase 2, and 1 row per task and split evaluated.
STAGED = (QUICK[:2] + ["--stages", "judge,choice,open", "--stage-steps", "2,2,2", "--ckpt-every", "1", "--keep", "9",
                       "--no-phase2", "--eval-n", "3", "--eval-stages", "open"] + QUICK[4:10]
          + ["--max-new-tokens", "40"])
NAMES = {"base": "0_judge_start", "after judge": "1_choice_start", "after choice": "2_open_start",
         "after open": "3_final"}


def eval_json(out):
    import json
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def global_steps(out):
    import json
    return [json.loads(line)["global_step"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("staged"))
    train.main(STAGED + ["--out", out])
    return out


@pytest.mark.parametrize("killed_at, where", [(3, "at the judge -> choice boundary"), (4, "inside the choice stage")])
def test_a_resumed_run_evaluates_every_stage_under_its_name(staged_run, tmp_path, monkeypatch, killed_at, where):
    out = str(tmp_path / "resumed")
    kill_before_checkpoint(monkeypatch, killed_at)
    with pytest.raises(Killed):
        train.main(STAGED + ["--out", out])
    assert global_steps(out) == list(range(1, killed_at + 1)), "the killed run logged the step it died in"
    monkeypatch.undo()
    train.main(STAGED + ["--resume", "--out", out])

    assert global_steps(out) == [1, 2, 3, 4, 5, 6], "a step redone after the resume is logged once"
    report = eval_json(out)
    assert report["models"] == {name: os.path.join(out, "stages", d) for name, d in NAMES.items()}, \
        f"resumed {where}: every stage's model, base first, under its own name"
    base = weights(BASE)
    assert all(torch.equal(t, weights(os.path.join(out, "stages", NAMES["base"]))[k]) for k, t in base.items()), \
        "the model called base is the base"
    for name, folder in NAMES.items():
        a, b = weights(os.path.join(staged_run, "stages", folder)), weights(os.path.join(out, "stages", folder))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the resumed run's model is the uninterrupted one's"
    folders = [weights(os.path.join(out, "stages", d)) for d in NAMES.values()]
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(folders, folders[1:])), \
        "every stage moved the weights (else the names could not be told apart)"
    assert report["results"] == eval_json(staged_run)["results"], "the same table as the uninterrupted run"


def test_phase2_prompts_cover_every_task_and_form():
    import random
    from collections import Counter
    import data
    cfg = config.make_config([])
    pool = data.make_rows("train", 3000, draw=False)
    for order in ("as drawn", "shuffled"):
        if order == "shuffled":
            random.Random(0).shuffle(pool)
        prompts = R.load_pool(cfg, pool)
        assert len(prompts) == cfg.phase2.phase2_prompts == 300
        cells = Counter((r["task"], r["stage"]) for r in prompts)
        assert len(cells) == 9, f"pool {order}: all nine (task, form) cells, got {sorted(cells)}"
        per_task = Counter(r["task"] for r in prompts)
        for (task, form), n in cells.items():
            assert abs(n - per_task[task] / 3) <= 1, f"pool {order}: {task} {form} has {n} of {per_task[task]}"
        for task in data.TASKS:
            truths = [r["meta"]["judge"]["truth"] for r in prompts if (r["task"], r["stage"]) == (task, "judge")]
            assert abs(sum(truths) - len(truths) / 2) <= 1, f"{task}: judge claims half true, half false"


def test_phase2_through_train_py(tmp_path):
    import json
    out = str(tmp_path / "run")
    flags = QUICK[:2] + ["--stages", "judge,open", "--stage-steps", "1,2", "--phase2-prompts", "12",
                         "--phase2-samples", "3", "--phase2-epochs", "2", "--phase2-batch", "4", "--phase2-lr", "5e-4",
                         "--eval-n", "3", "--eval-stages", "open"] + QUICK[4:8] + ["--max-new-tokens", "24"]
    train.main(flags + ["--temperature", "0.9", "--box-reward", "iou", "--micro-batch", "2", "--out", out])
    stages = os.path.join(out, "stages")
    report = json.load(open(os.path.join(out, "phase2", "phase2_report.json")))
    assert report["total"] == 12 and report["n_samples"] == 3 and report["temperature"] == 0.9
    assert report["scorer"] == "rule rewards, choice_partial 0.2, box_mode iou, accuracy + format >= 2", \
        "phase 2 keeps answers by the RL stages' rewards (--box-reward, --choice-partial)"
    assert report["kept"] > 0, "the shipped base answers some phase-2 prompts right"
    kept = report["kept"]
    sft = report["sft"]
    assert (sft["epochs"], sft["batch_size"], sft["micro_batch"], sft["lr"], sft["steps"]) == \
           (2, 4, 2, 5e-4, 2 * -(-kept // 4)), \
        "phase 2 runs with the flags' settings: ceil(kept / batch) steps per epoch"
    rl_final, p2 = weights(os.path.join(stages, "2_final")), weights(os.path.join(stages, "3_phase2"))
    assert any(not torch.equal(rl_final[k], p2[k]) for k in p2), "phase 2 fine-tunes the RL model"
    assert len(open(os.path.join(out, "phase2", "sft.jsonl")).read().splitlines()) == kept, "one line per kept answer"

    models = eval_json(out)["models"]
    assert list(models) == ["base", "after judge", "after open", "final (+ phase 2)"]
    assert models["final (+ phase 2)"] == os.path.join(stages, "3_phase2")

    args = flags + ["--temperature", "0.9", "--box-reward", "iou", "--micro-batch", "2", "--out", out, "--resume"]
    saved = os.path.getmtime(os.path.join(stages, "3_phase2", "model.safetensors"))
    train.main(args)
    assert os.path.getmtime(os.path.join(stages, "3_phase2", "model.safetensors")) == saved, \
        "a resume with the same phase-2 flags keeps phase 2's model"
    train.main(args + ["--phase2-lr", "1e-3"])
    assert json.load(open(os.path.join(out, "phase2", "phase2_report.json")))["sft"]["lr"] == 1e-3
    again = weights(os.path.join(stages, "3_phase2"))
    assert any(not torch.equal(again[k], p2[k]) for k in p2), "a resume with another --phase2-lr runs phase 2 again"


def metrics_of(out):
    import json
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch):
    import model as M
    out = str(tmp_path / "run")
    args = QUICK + ["--stage-steps", "2", "--ckpt-every", "5", "--out", out]
    step, calls = train.grpo_step, []

    def killed_at_step_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return step(*a, **kw)
    monkeypatch.setattr(train, "grpo_step", killed_at_step_2)
    with pytest.raises(RuntimeError, match="killed"):
        train.main(args)
    monkeypatch.setattr(train, "grpo_step", step)
    assert [m["global_step"] for m in metrics_of(out)] == [1] and not train.latest_checkpoint(out)
    model, processor = M.load("tiny")  # a start folder of another model, as a run with another --model would leave
    model.save_pretrained(os.path.join(out, "stages", "0_choice_start"))
    processor.save_pretrained(os.path.join(out, "stages", "0_choice_start"))
    with pytest.raises(SystemExit, match="already holds a run: pass --resume"):
        train.main(args)
    train.main(args + ["--resume"])
    ms = metrics_of(out)
    assert [m["global_step"] for m in ms] == [1, 2], "every step logged once"
    assert ms[0]["kl"] < 1e-9, "the reference is this run's start, not the folder the killed attempt left"
    base = weights(BASE)
    assert all(torch.equal(w, base[k]) for k, w in weights(os.path.join(out, "stages", "0_choice_start")).items())


def test_a_missing_tiny_base_under_torchrun_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no assets/tiny-base here
    monkeypatch.setattr(train, "world_size", lambda: 2)
    monkeypatch.setattr(train.tiny_base, "build_base", lambda *a, **k: pytest.fail("rank 0 alone began to build"))
    with pytest.raises(SystemExit, match="assets/tiny-base is missing: build it first, in one process"):
        train.load_base(config.make_config([]), "cpu", torch.float32, 0)


def test_a_resume_with_other_training_flags_is_refused(tmp_path):
    out = str(tmp_path / "run")
    args = QUICK + ["--stage-steps", "2", "--out", out]
    train.main(args)
    before = open(os.path.join(out, "config.json")).read()
    for flags, message in ((["--prompts-per-step", "4"], "--prompts-per-step 4: the run in --out was started with 8"),
                           (["--seed", "3"], "--seed 3: the run in --out was started with 0"),
                           (["--lr", "1e-3"], "--lr 0.001: the run in --out was started with 0.0003"),
                           (["--shard", "optimizer"], "--shard 'optimizer': the run in --out was started with 'none'")):
        with pytest.raises(SystemExit, match=message):
            train.main(args + ["--resume"] + flags)
        assert open(os.path.join(out, "config.json")).read() == before, "a refused resume leaves config.json alone"
    train.main(args + ["--resume", "--micro-batch", "2", "--sample-every", "3"])  # memory and logging may change
    assert [m["global_step"] for m in metrics_of(out)] == [1, 2]


def test_a_latest_pointer_to_a_removed_checkpoint_names_those_left(tmp_path):
    out = tmp_path / "run"
    for step in (4, 5):
        os.makedirs(out / "checkpoints" / f"step_{step:06d}")
        (out / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt").write_bytes(b"")
    (out / "checkpoints" / "latest").write_text("step_000005")
    assert train.latest_checkpoint(str(out)) == str(out / "checkpoints" / "step_000005")
    os.remove(out / "checkpoints" / "step_000005" / "trainer_state.pt")
    with pytest.raises(SystemExit, match="names 'step_000005', which is gone or incomplete: write the name of one "
                                         "that is there \\(step_000004\\) into it"):
        train.main(QUICK + ["--out", str(out), "--resume"])


def test_the_refusal_names_the_flags_a_resume_may_change():
    """The message names the flags a resume accepts a new value of, and every other flag is refused."""
    saved = config.as_dict(config.make_config([]))
    with pytest.raises(ValueError, match="only --device, .* and --phase2-\\* may change") as refused:
        config.check_resume(saved, config.make_config(["--seed", "3"]))
    named = refused.value.args[0].split("only ")[1].split(" may change")[0].replace(" and ", ", ").split(", ")
    fields = {f"--{name.replace('_', '-')}": (group, name) for group, values in saved.items() for name in values}
    assert set(named) - set(fields) == {"--phase2-*"} and "--resume" not in named
    named = [f for f in named if f != "--phase2-*"] + [f for f in fields if f.startswith("--phase2-")]
    for flag, (group, name) in fields.items():
        cfg = config.make_config([])
        value = getattr(getattr(cfg, group), name)
        other = not value if isinstance(value, bool) else value + "x" if isinstance(value, str) else value * 2 + 1
        setattr(getattr(cfg, group), name, other)
        if flag in named or flag == "--resume":
            config.check_resume(saved, cfg)                                  # accepted
        else:
            with pytest.raises(ValueError, match=f"^{flag} "):
                config.check_resume(saved, cfg)
    same = config.as_dict(config.make_config(["--stage-steps", "12,12,12", "--group-size", "8,8,8"]))
    config.check_resume(same, config.make_config(["--stage-steps", "12", "--group-size", "8"]))  # the same values


def test_each_stage_starts_at_kl_zero_to_its_reference_and_restarts_its_schedule(staged_run, tmp_path):
    ms = metrics_of(staged_run)
    assert [(m["stage"], m["step"]) for m in ms] == [(s, k) for s in ("judge", "choice", "open") for k in (1, 2)]
    for m in ms:
        if m["step"] == 1:
            assert m["kl"] < 1e-9, f"{m['stage']}: the reference is the stage's start weights, so KL starts at 0"
        assert m["lr"] == pytest.approx(3e-4 * m["step"] / 5), "warm-up over 5 steps, from the start of every stage"
    assert ms[1]["kl"] > 1e-7, "after a step the policy has left its reference"

    out = str(tmp_path / "ref_base")
    train.main(STAGED + ["--ref", "base", "--warmup", "0", "--eval-n", "0", "--out", out])
    ms = metrics_of(out)
    assert ms[0]["kl"] < 1e-9 and all(m["kl"] > 1e-7 for m in ms[2:]), \
        "--ref base: every later stage is measured against the base, which the policy has left"
    assert [m["lr"] for m in ms] == pytest.approx([3e-4, 1.5e-4] * 3), "no warm-up: linear decay to 0 in each stage"


def test_learning_rate_schedule_hand_values():
    from runtime import lr_factor
    assert [lr_factor(s, 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0], "linear warm-up to 1"
    assert lr_factor(9, 4, 10, "constant") == 1.0 and lr_factor(9, 0, None, "linear") == 1.0
    assert lr_factor(7, 4, 10, "linear", floor=0.0) == pytest.approx(0.5), "half way through the decay"
    assert lr_factor(10, 0, 10, "linear", floor=0.1) == pytest.approx(0.1) and lr_factor(99, 0, 10, "linear") == 0.1
    assert lr_factor(5, 0, 10, "cosine", floor=0.1) == pytest.approx(0.1 + 0.9 * 0.5), "cosine at half way"
    assert lr_factor(0, 0, 10, "cosine") == 1.0 and lr_factor(10, 0, 10, "cosine", floor=0.0) == pytest.approx(0.0)


def test_too_many_non_finite_steps_stop_the_run(tmp_path, non_finite_loss):
    with pytest.raises(RuntimeError, match="2 steps in a row had a non-finite loss"):
        train.main(QUICK + ["--stage-steps", "5", "--max-bad-steps", "2", "--out", str(tmp_path)])
    assert [m["skipped"] for m in metrics_of(str(tmp_path))] == [1, 1], "each skipped step is logged, then the run stops"


@pytest.mark.parametrize("killed_at", [3, 4])
def test_a_bf16_mixed_run_resumes_bit_identically(tmp_path, monkeypatch, killed_at):
    """bf16 weights with fp32 masters: a run killed at the judge -> choice boundary (3) or inside choice (4) and
    resumed ends with the uninterrupted run's weights and masters, bit for bit."""
    flags = QUICK[:2] + ["--stages", "judge,choice", "--stage-steps", "2,2", "--ckpt-every", "1", "--keep", "9",
                         "--dtype", "bfloat16"] + QUICK[4:]
    whole = str(tmp_path / "whole")
    train.main(flags + ["--out", whole])
    out = str(tmp_path / "resumed")
    kill_before_checkpoint(monkeypatch, killed_at)
    with pytest.raises(Killed):
        train.main(flags + ["--out", out])
    monkeypatch.undo()
    train.main(flags + ["--resume", "--out", out])
    a, b = weights(os.path.join(whole, "stages", "2_final")), weights(os.path.join(out, "stages", "2_final"))
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights are the uninterrupted run's"
    masters = [torch.load(os.path.join(run, "checkpoints", "step_000004", "trainer_state.pt"),
                          weights_only=False)["optimizer"]["master"] for run in (whole, out)]
    assert len(masters[0]) == len(a) and all(torch.equal(x, y) for x, y in zip(*masters)), "and so are the masters"
