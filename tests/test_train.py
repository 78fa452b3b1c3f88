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
    (["--stages", "judge,exam"], "--stages"),
    (["--lr", "-1"], "lr > 0"),
    (["--image-size", "100"], "multiple of 28"),
    (["--model", "/no/such/folder"], "neither 'tiny' nor a folder"),
])
def test_bad_config_is_a_clear_error(flags, message):
    with pytest.raises(SystemExit, match="error: .*" + message.replace("-", r"\-").replace("+", r"\+")):
        train.main(flags + ["--out", "/tmp/never-written"])


def test_presets_and_flags():
    cfg = train.make_config(["--preset", "qwen2.5-vl-3b", "--model", ROOT, "--lr", "1e-5"])
    assert cfg.rl.lr == 1e-5, "a flag overrides the preset"
    assert cfg.rl.group_size == "4,2,4" and cfg.rl.beta == 0.04 and cfg.rl.max_new_tokens == 256
    assert cfg.rl.prompts_per_step == 8 and cfg.model.dtype == "bfloat16"
    assert train.make_config(["--no-phase2"]).phase2.phase2 is False, "boolean flags are real booleans"
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--agg", "mean"])


def test_a_run_with_replay_reports_the_replayed_accuracy(tmp_path):
    r = run(QUICK[:2] + ["--stages", "choice,open", "--stage-steps", "1", "--replay", "0.5"] + QUICK[4:], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["stage"] == "choice" and "replay_accuracy" in first
    assert "replayed open questions" in r.stdout


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
    train.plot_rewards(metrics, tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size == (960, 360)
    text = train.stage_summary(metrics)
    import numpy as np
    ys = np.array([0.25] * 10 + [0.75] * 10)
    (slope, _), (res,), *_ = np.polyfit(np.arange(20), ys, 1, full=True)
    se = np.sqrt(res / 18 / ((np.arange(20) - 9.5) ** 2).sum()) * 19  # the fitted change's standard error
    assert (f"judge    20 steps | accuracy 0.250 -> 0.750 | change {slope * 19:+.3f} +- {se:.3f} | "
            f"reward 0.500 -> 1.500 | 20s") in text, text
    assert "replayed" not in text
    metrics[0]["replay_accuracy"], metrics[19]["replay_accuracy"] = 0.25, 0.75
    assert "replayed open questions | accuracy 0.250 -> 0.750" in train.stage_summary(metrics)
    assert "open     20 steps | accuracy 0.500 -> 0.500 | change +0.000 +- 0.000 |" in text, "flat: no change"


def test_per_stage_values_map_by_stage_name():
    assert train.per_stage("100,100,150", ["judge", "choice", "open"], "stage_steps") == [100, 100, 150]
    assert train.per_stage("100,100,150", ["open"], "stage_steps") == [150], "three values name the three stages"
    assert train.per_stage("4,2,4", ["choice", "open"], "group_size") == [2, 4]
    assert train.per_stage("7", ["open", "judge"], "stage_steps") == [7, 7]
    with pytest.raises(ValueError, match="one value or one per stage"):
        train.per_stage("1,2", ["open"], "stage_steps")


def test_replay_ratios(monkeypatch):
    rl = lambda text, **kw: train.RLConfig(replay=text, **kw)
    assert train.replay_ratios(rl("0.25"), ["judge", "choice", "open"]) == [0.25, 0.25, 0.0], "open asks open anyway"
    assert train.replay_ratios(rl("0.125,0.5,0"), ["judge", "choice", "open"]) == [0.125, 0.5, 0.0]
    assert train.replay_ratios(rl("0.3"), ["open"]) == [0.0]
    assert train.replay_ratios(rl("0.25"), ["judge"]) == [0.0], "one value: nothing to rehearse without open"
    with pytest.raises(ValueError, match="include open"):
        train.replay_ratios(rl("0.25,0"), ["judge", "choice"])
    with pytest.raises(ValueError, match="in \\[0, 4\\]"):
        train.replay_ratios(rl("5"), ["judge", "open"])
    with pytest.raises(ValueError, match="whole number"):
        train.replay_ratios(rl("0.1"), ["judge", "open"])  # 3.2 more prompts
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(ValueError, match="multiple of the 16 processes"):
        train.replay_ratios(rl("0.25"), ["judge", "open"])  # 40 prompts
