"""ablate.py: the arm table, the statistics against values computed by hand, a tiny grid end to end, and the resume
of a killed grid."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ablate
import config
import curriculum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--stage-steps", "1,1,2", "--eval-n", "12", "--pool-size", "48", "--phase2-prompts", "6",
        "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "40", "--ckpt-every", "1"]


@pytest.mark.parametrize("common", [[], ablate.QUICK, ["--preset", "qwen2.5-vl-3b", "--model", ROOT]],
                         ids=["default", "quick", "3b"])
def test_every_arm_is_a_valid_run_with_the_same_rl_budget(common):
    budget = sum(config.per_stage(config.make_config(common).rl.stage_steps, curriculum.STAGES, "stage_steps"))
    for name, arm in ablate.ARMS.items():
        cfg = config.make_config(common + ablate.resolve(arm, common))
        stages, groups, steps = config.validate(cfg)
        assert arm.sft or sum(steps) == budget, f"{name}: {sum(steps)} RL steps, the budget is {budget}"
    runs = ablate.plan_runs(list(ablate.ARMS), common)
    assert [r.name for r in runs] == ["sft", "rl", "curr-rl", "reverse", "mixed"], "Curr-ReFT shares Curr-RL's run"
    assert runs[2].arms == {"Curr-RL": "final", "Curr-ReFT": "phase2"}
    stages, groups, steps = config.validate(config.make_config(common + runs[3].flags))
    forward = dict(zip(*config.validate(config.make_config(common + runs[2].flags))[::2]))
    assert stages == ["open", "choice", "judge"] and steps == [forward[s] for s in stages], \
        "the reverse order gives each stage the steps it has in the forward curriculum"


def test_the_interval_against_values_computed_by_hand():
    x = [[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]]  # 3 seeds x 4 rows
    m, h = ablate.interval(x)
    # seed means 3/4, 2/4, 3/4: var (ddof 1) = 1/48, / 3 = 1/144; row means 2/3, 1/3, 1, 2/3: var = 2/27, / 4 = 1/54
    v_seed, v_row = 1 / 144, 1 / 54
    df = (v_seed + v_row) ** 2 / (v_seed ** 2 / 2 + v_row ** 2 / 3)  # 4.67: floored to 4, t = 2.776
    assert 4 < df < 5
    assert m == pytest.approx(8 / 12)
    assert h == pytest.approx(2.776 * math.sqrt(v_seed + v_row))
    m1, h1 = ablate.interval([[1, 0, 1, 1]])  # one seed: the rows alone, 3 df, t = 3.182
    assert (m1, h1) == pytest.approx((0.75, 3.182 * math.sqrt(0.25 / 4)))
    assert ablate.interval([[1, 1], [1, 1]]) == (1.0, 0.0)
    assert ablate.t975(1e6) == pytest.approx(1.96, abs=1e-3) and ablate.t975(40) == pytest.approx(2.021, abs=2e-3)


def test_paired_statistics_and_the_marks():
    base = {("test", "math", "open"): [0, 0, 1, 1]}
    arms = {"RL": [{("test", "math", "open"): [1, 0, 1, 1]}, {("test", "math", "open"): [0, 0, 1, 1]}],
            "B": [{("test", "math", "open"): [1, 1, 1, 1]}, {("test", "math", "open"): [1, 1, 1, 1]}]}
    stats = ablate.statistics(base, arms)
    cell = ("test", "math", "open")
    d = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])  # B - base, per seed
    assert stats["vs base"]["B"][cell]["mean"] == pytest.approx(0.5)
    assert stats["vs base"]["B"][cell]["half"] == pytest.approx(ablate.interval(d)[1])
    vs_rl = np.array([[0, 1, 0, 0], [1, 1, 0, 0]])  # B's seed s - RL's seed s
    assert stats["vs RL"]["B"][cell]["mean"] == pytest.approx(vs_rl.mean())
    assert "RL" not in stats["vs RL"]
    assert stats["value"]["RL"][cell]["per_seed"] == [0.75, 0.5]
    table = ablate.markdown(stats, "vs base", ("open",), ["test"], signed=True)
    assert "+50.0 ±" in table and ("*" in table) == (0.5 > stats["vs base"]["B"][cell]["half"])


def test_bad_arguments_stop_before_any_work(tmp_path):
    for argv, words in ((["--arms", "RL,nope"], "unknown"), (["--seeds", "0"], ">= 1"),
                        (["--", "--seed", "3"], "set per run"), (["--", "--lr", "-1"], "lr"),
                        (["--", "--eval-n", "0"], "--eval-n"),
                        (["--launcher", "no-such-launcher --nproc_per_node=2"], "no command 'no-such-launcher'")):
        with pytest.raises(SystemExit, match=words):
            ablate.main(["--out", str(tmp_path / "x")] + argv)
    assert not (tmp_path / "x").exists()


def grid(out, arms):
    return [sys.executable, os.path.join(ROOT, "ablate.py"), "--arms", arms, "--seeds", "1", "--out", str(out),
            "--", *TINY]


@pytest.mark.slow
def test_a_killed_grid_resumes_to_the_same_result(tmp_path):
    """A grid of RL and Curr-RL killed inside its Curr-RL run (a checkpoint written, the base and RL finished),
    rerun with Curr-ReFT added, resumes that run from its checkpoint through phase 2 and ends with the numbers of
    an uninterrupted grid of RL and Curr-ReFT; the finished base and RL are not run again."""
    whole = subprocess.run(grid(tmp_path / "whole", "RL,Curr-ReFT"), cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    want = json.load(open(tmp_path / "whole" / "ablation.json"))
    assert set(want["stats"]["value"]) == {"base", "RL", "Curr-ReFT"} and (tmp_path / "whole" / "ablation.png").is_file()
    assert "Open answers" in want["table"] and "change from RL" in want["table"]
    assert any(c["mean"] > 0 for c in want["stats"]["value"]["base"].values()), "the base answers some rows"

    out = tmp_path / "killed"
    p = subprocess.Popen(grid(out, "RL,Curr-RL"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    latest = out / "curr-rl-s0" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert latest.is_file() and not (out / "curr-rl-s0" / "trained.json").exists(), "killed inside the run"
    finished = {f: os.path.getmtime(out / f / "eval.json") for f in ("base", "rl-s0")}
    again = subprocess.run(grid(out, "RL,Curr-RL,Curr-ReFT"), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in open(out / "curr-rl-s0" / "ablate.log").read()
    for f, t in finished.items():
        assert os.path.getmtime(out / f / "eval.json") == t, f"{f} was finished and must not run again"
    got = json.load(open(out / "ablation.json"))["stats"]
    for kind in ("value", "vs base", "vs RL"):
        for arm, cells in want["stats"][kind].items():
            assert got[kind][arm] == cells, f"{kind} {arm}: the resumed grid must give the uninterrupted one's numbers"
