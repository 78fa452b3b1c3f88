"""
ablate.py: the paper's comparisons in one command. Every arm starts from the same base, with the same RL step
budget and the same evaluation rows, for S seeds; the result is one table per group of answer forms, with 95%
intervals and paired differences, a picture and one JSON.

    python ablate.py                           # 6 arms x 3 seeds on the tiny world, CPU; runs/ablate/
    python ablate.py --quick                   # 1 seed, short stages, small evaluation sets: a smoke test of the grid
    python ablate.py --jobs 2                  # two runs at a time, one CPU thread each
    python ablate.py --arms RL,Curr-RL --seeds 5 --out runs/abl -- --lr 1e-4     # flags after -- go to every run
    python ablate.py --launcher "torchrun --nproc_per_node=8" -- --preset qwen2.5-vl-3b --model /ckpt/3B \\
        --stage-data "judge=j.jsonl;choice=c.jsonl;open=o.jsonl" --eval-data "test=t.jsonl;ood=d.jsonl"

The arms (ARMS; a fork adds one in a line). B is the RL budget, the sum of the curriculum's --stage-steps:
    SFT        supervised fine-tuning on the open questions' reference answers: B steps of --prompts-per-step rows
               in the RL runs' order, at --lr with --warmup, then constant (reject_sample.sft: AdamW (0.9, 0.95))
    RL         GRPO on open questions only, B steps (the release's no-curriculum baseline)
    Curr-RL    judge -> choice -> open, each stage its --stage-steps
    Curr-ReFT  Curr-RL's run continued by phase 2 (rejection-sampling SFT): the same run, nothing computed twice
    reverse    open -> choice -> judge, each form its own steps
    mixed      one stage of B steps whose every batch asks judge, choice and open questions in turn
Arms with the same flags share a run; a run goes through phase 2 only when one of its arms is evaluated after it.
Each run is `train.py --seed s --eval-n 0` in out/<run>-s<seed>/ (the SFT arm: `ablate.py --sft-baseline`), then
`eval.py --records` of its models on the rows of the default run's evaluation (seed 0), the same for every arm.
A killed ablation continues where it stopped: finished runs and evaluations are kept, a half-run one resumes from
its latest checkpoint (`train.py --resume`; the SFT arm, which keeps no checkpoint, restarts).

Statistics, per cell (a task, answer form and split) and its headline metric: x[s, i] is seed s's score on row i,
d[s, i] = x[s, i] - y[s, i] a paired difference on the same rows (y: the base, the same for every seed, or RL's
seed s). For a mean m over S seeds and n rows (interval):
    var = var_s(mean_i x[s, i]) / S + var_i(mean_s x[s, i]) / n     seed-to-seed spread + row sampling
    95% interval: m ± t(0.975, df) sqrt(var), df by Welch-Satterthwaite from the two terms' (S - 1, n - 1)
Both terms hold the seed-by-row noise, so the interval is a little wide (conservative); with one seed it is the
row sampling alone. A difference is marked * where its interval excludes 0.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config
import curriculum
import data
import eval as E
import fsdp
import reject_sample as R
import train
from report import plot_changes
from runtime import barrier, resolve_dtype, setup_dist, write_atomic

@dataclass(frozen=True)
class Arm:
    flags: tuple = ()         # train.py flags of its run; {budget} is the RL budget, {g_open} the open stage's G
    model: str = "final"      # the model evaluated: final (after RL) | phase2 (after rejection-sampling SFT)
    sft: bool = False         # the supervised baseline instead of train.py

ARMS = {
    "SFT": Arm(sft=True),
    "RL": Arm(("--stages", "open", "--stage-steps", "{budget}")),
    "Curr-RL": Arm(("--stages", "judge,choice,open")),
    "Curr-ReFT": Arm(("--stages", "judge,choice,open"), model="phase2"),
    "reverse": Arm(("--stages", "open,choice,judge")),
    "mixed": Arm(("--stages", "mixed", "--stage-steps", "{budget}", "--group-size", "{g_open}")),
}
QUICK = ["--stage-steps", "4,4,8", "--eval-n", "60", "--pool-size", "300", "--phase2-prompts", "30"]
GROUPS = {"Open answers": ("open",), "Yes/no and multiple-choice forms": ("judge", "choice")}
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

# ---- The grid: arms -> runs -> jobs
def rl_budget(cfg):
    """B: the optimizer steps of the judge, choice and open stages of cfg's --stage-steps, summed."""
    return sum(config.per_stage(cfg.rl.stage_steps, curriculum.STAGES, "stage_steps"))

def resolve(arm, common):
    """The train.py flags of an arm's run, its {budget} and {g_open} filled from the common flags' curriculum."""
    cfg = config.make_config(common)
    g_open = config.per_stage(cfg.rl.group_size, curriculum.STAGES, "group_size")[-1]
    return [f.format(budget=rl_budget(cfg), g_open=g_open) for f in arm.flags]

@dataclass
class Run:
    name: str                 # its folder: out/<name>-s<seed>
    flags: list               # train.py flags (without seed, out, eval and phase-2 switches)
    sft: bool
    arms: dict                # arm name -> "final" | "phase2"

def plan_runs(arms, common):
    """The runs the arms need, in the table's order, arms with equal flags in one run; a run is named after the first
    arm of the table that it serves, whichever arms were asked for (so a grid of some arms reuses a fuller one's)."""
    key = {name: (arm.sft, tuple(resolve(arm, common))) for name, arm in ARMS.items()}
    names = {}
    for name in ARMS:
        names.setdefault(key[name], name.lower())
    runs = {}
    for name in [a for a in ARMS if a in arms]:
        run = runs.setdefault(key[name], Run(names[key[name]], list(key[name][1]), ARMS[name].sft, {}))
        run.arms[name] = ARMS[name].model
    return list(runs.values())

def model_dirs(run, folder, common):
    """{arm: the folder of the model it evaluates} of a run in `folder`."""
    if run.sft:
        return {arm: os.path.join(folder, "stages", "1_final") for arm in run.arms}
    stages, _, _ = config.validate(config.make_config(common + run.flags))
    return {arm: os.path.join(folder, "stages", f"{len(stages)}_final" if m == "final" else f"{len(stages) + 1}_phase2")
            for arm, m in run.arms.items()}

def read_json(path):
    """The JSON in `path`, or None when it is missing or cut short (a killed writer)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

@dataclass
class Step:
    command: object           # () -> argv, decided when the step starts
    done: object              # () -> whether its output is complete (then it is skipped)
    finish: object = None     # () -> None, after the command succeeded

@dataclass
class Job:
    name: str
    folder: str               # its log: folder/ablate.log
    steps: list

def train_step(run, seed, folder, common, launcher, threads):
    """Train a run (train.py, or the SFT baseline) into `folder`; done once trained.json says so, with phase 2 if
    the run's arms now need it."""
    marker, phase2 = os.path.join(folder, "trained.json"), "phase2" in run.arms.values()

    def done():
        m = read_json(marker)
        return m is not None and (m["phase2"] or not phase2)

    def command():  # --resume from a checkpoint (a killed run, or one trained before phase 2 was asked); else afresh
        resume = os.path.isfile(os.path.join(folder, "checkpoints", "latest"))
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        argv = launcher + ([os.path.join(HERE, "ablate.py"), "--sft-baseline"] if run.sft else
                           [os.path.join(HERE, "train.py")] + ([] if phase2 else ["--no-phase2"]))
        argv += common + run.flags + ["--seed", str(seed), "--out", folder, "--eval-n", "0"] + threads
        return argv + (["--resume"] if resume else [])

    return Step(command, done, lambda: write_atomic(marker, json.dumps({"phase2": phase2})))

def eval_step(models, out, cfg, threads):
    """eval.py of the model folders `models`, one process, on the default run's evaluation rows (seed 0), with
    every row's scores; done once out holds every model's records."""
    argv = ([sys.executable, os.path.join(HERE, "eval.py"), "--model", ",".join(models), "--records", "--seed", "0",
             "--out", out, "--data", cfg.data.eval_data or "synthetic", "--n", str(cfg.data.eval_n),
             "--stages", cfg.data.eval_stages, "--image-size", str(cfg.data.image_size),
             "--max-new-tokens", str(cfg.rl.max_new_tokens),
             "--device", cfg.model.device, "--dtype", cfg.model.dtype, "--max-pixels", str(cfg.model.max_pixels)]
            + (["--image-root", cfg.data.image_root] if cfg.data.image_root else []) + threads)
    return Step(lambda: argv, lambda: set(models) <= set((read_json(out) or {}).get("records", {})))

def plan_jobs(runs, seeds, cfg, common, out, launcher, threads):
    """One job for the base's evaluation, then one per (run, seed): train, then evaluate its models (cfg: the
    config of the common flags)."""
    jobs = [Job("base", os.path.join(out, "base"),
                [eval_step([cfg.model.model], os.path.join(out, "base", "eval.json"), cfg, threads)])]
    for run in runs:
        for seed in range(seeds):
            folder = os.path.join(out, f"{run.name}-s{seed}")
            models = list(dict.fromkeys(model_dirs(run, folder, common).values()))
            jobs.append(Job(f"{run.name}-s{seed}", folder, [train_step(run, seed, folder, common, launcher, threads),
                                                            eval_step(models, os.path.join(folder, "eval.json"), cfg,
                                                                      threads)]))
    return jobs

def run_job(job):
    """Run a job's steps that are not done yet, in order, logged to folder/ablate.log, their seconds added up over
    calls in folder/seconds.json; (name, seconds of this call, error)."""
    t0 = time.time()
    for step in job.steps:
        if step.done():
            continue
        t_step = time.time()
        argv = step.command()
        os.makedirs(job.folder, exist_ok=True)
        with open(os.path.join(job.folder, "ablate.log"), "a") as log:
            log.write("$ " + shlex.join(argv) + "\n")
            log.flush()
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
        spent = os.path.join(job.folder, "seconds.json")
        write_atomic(spent, json.dumps(round((read_json(spent) or 0) + time.time() - t_step, 1)))
        if code != 0:
            return job.name, time.time() - t0, f"exit {code}: see {os.path.join(job.folder, 'ablate.log')}"
        if step.finish:
            step.finish()
    return job.name, time.time() - t0, None

# ---- Statistics
def t975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom (df floored, table to 30, then a series)."""
    if df < 1:
        return T975[0]
    if df < 31:
        return T975[int(df) - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)

def interval(x):
    """(mean, 95% half-width) of x (S seeds, n rows): seed-to-seed spread plus row sampling (module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    S, n = x.shape
    v_seed = x.mean(1).var(ddof=1) / S if S > 1 else 0.0
    v_row = x.mean(0).var(ddof=1) / n if n > 1 else 0.0
    v = v_seed + v_row
    if v == 0:
        return float(x.mean()), 0.0
    df = v ** 2 / ((v_seed ** 2 / (S - 1) if S > 1 else 0.0) + (v_row ** 2 / (n - 1) if n > 1 else 0.0))
    return float(x.mean()), float(t975(df) * math.sqrt(v))

def scores(records):
    """{(split, task, stage): [each row's accuracy, in order]} of one model's eval.py records (accuracy is the headline
    metric of every cell: detection acc@0.5, classification exact set, math and the judge / choice forms right)."""
    out = {}
    for r in records:
        out.setdefault((r["split"], r["task"], r["stage"]), []).append(r["accuracy"])
    return out

def statistics(base, arms):
    """base: {cell: [n]}; arms: {arm: [{cell: [n]} per seed]} -> {"value" | "vs base" | "vs RL": {arm: {cell:
    {"mean", "half", "per_seed"}}}}; "vs RL" pairs seed s with RL's seed s (when RL is an arm)."""
    def cell(x):
        m, h = interval(x)
        return {"mean": m, "half": h, "per_seed": [float(np.mean(row)) for row in x]}
    out = {"value": {"base": {c: cell([v]) for c, v in base.items()}}, "vs base": {}, "vs RL": {}}
    for arm, seeds in arms.items():
        x = {c: np.array([s[c] for s in seeds], dtype=np.float64) for c in base}
        out["value"][arm] = {c: cell(v) for c, v in x.items()}
        out["vs base"][arm] = {c: cell(v - np.array(base[c])) for c, v in x.items()}
        if "RL" in arms and arm != "RL":
            S = min(len(seeds), len(arms["RL"]))
            out["vs RL"][arm] = {c: cell(v[:S] - np.array([s[c] for s in arms["RL"][:S]])) for c, v in x.items()}
    return out

def markdown(stats, kind, forms, splits, signed=False):
    """One table (eval.py's layout): a row per model of stats[kind], a column per (task, form, split) of `forms`."""
    label = {"open": {"detection": "acc@0.5", "classify": "exact", "math": "acc"}}
    rows = stats[kind]
    cells = [(split, task, form) for form in forms for task in E.SHORT for split in splits
             if any((split, task, form) in r for r in rows.values())]
    head = [f"{E.SHORT[t]} {label.get(f, {}).get(t, f)} {s}" for s, t, f in cells]

    def fmt(r, c):  # "mean ± half-width" in percent, * where a difference's interval excludes 0
        if c not in r:
            return "–"
        star = " *" if signed and abs(r[c]["mean"]) > r[c]["half"] else ""
        return E._pct(r[c]["mean"], r[c]["half"], signed) + star
    return "\n".join(E._table(["arm"] + head, [[name] + [fmt(r, c) for c in cells] for name, r in rows.items()]))

def tables(stats, splits, seeds, base):
    """The markdown of the whole grid: per group its values, changes from the base and changes from RL."""
    parts = []
    for title, forms in GROUPS.items():
        if not any(c[2] in forms for c in stats["value"]["base"]):
            continue
        parts.append(f"{title}, mean over {seeds} seed(s) ± the 95% interval's half-width, in percent:\n\n"
                     + markdown(stats, "value", forms, splits))
        parts.append(f"{title}: change from the base, paired over the same rows, in points (* the interval "
                     f"excludes 0):\n\n" + markdown(stats, "vs base", forms, splits, signed=True))
        if stats["vs RL"]:
            parts.append(f"{title}: change from RL, seed s against RL's seed s, paired over the same rows, in "
                         f"points:\n\n" + markdown(stats, "vs RL", forms, splits, signed=True))
    ns = {len(v) for v in base.values()}
    rows = f"{ns.pop()} per task, form and split" if len(ns) == 1 else ", ".join(f"{' '.join(c)} {len(v)}"
                                                                                 for c, v in base.items())
    return "\n\n".join(parts) + f"\n\nRows per cell: {rows}. Intervals: seed-to-seed spread plus row sampling (ablate.py)."

# ---- The supervised arm
def sft_baseline(argv):
    """`ablate.py --sft-baseline <train.py flags>`: SFT of the base on the open stage's rows with their reference
    answers, B steps of --prompts-per-step rows in the RL runs' order, at the RL lr and warm-up; stages/1_final."""
    cfg = config.make_config(argv)
    rank, _, _, device = setup_dist(None if cfg.model.device == "auto" else cfg.model.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dtype = resolve_dtype(cfg.model.dtype, device)
    budget = rl_budget(cfg)
    torch.manual_seed(cfg.run.seed)
    policy, processor = train.load_base(cfg, device, dtype, rank)
    pool = data.make_split("train", cfg.data.pool_size, seed=cfg.run.seed, size=cfg.data.image_size)
    cur = train.make_curriculum(cfg, ["open"], [2], [budget], pool)  # the RL arm's rows, in its order
    if cfg.model.shard == "fsdp":
        policy = fsdp.shard(policy, dtype)
    R.sft(policy, processor, lambda step: cur.next_batch(cfg.rl.prompts_per_step), budget, lr=cfg.rl.lr,
          warmup=cfg.rl.warmup, micro_batch=cfg.rl.micro_batch, rank=rank, device=device, desc="sft baseline",
          shard=cfg.model.shard)
    fsdp.save(policy, processor, os.path.join(cfg.run.out, "stages", "1_final"), dtype, rank)
    if dist.is_initialized():
        del policy  # FSDP's state holds the process group: free it first
        barrier()
        dist.destroy_process_group()

# ---- The command
HERE = os.path.dirname(os.path.abspath(__file__))

def build_parser():
    p = argparse.ArgumentParser(description="The Curr-ReFT ablation grid: arms x seeds, tables with 95% intervals.",
                                epilog="Flags after -- go to every run (train.py's; see python train.py --help).")
    p.add_argument("--arms", default=",".join(ARMS), help=f"arms, comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (0 .. S-1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one CPU thread when > 1 (on a CPU; "
                                                        "GPU runs take the GPUs: keep 1)")
    p.add_argument("--out", default=None, help="output folder (default runs/ablate, --quick runs/ablate-quick)")
    p.add_argument("--quick", action="store_true", help="1 seed, stages of 4/4/8 steps, 60 evaluation rows per split "
                                                        "and form: a smoke test of the grid, not results")
    p.add_argument("--launcher", default="", help="command that starts train.py, e.g. 'torchrun --nproc_per_node=8' "
                                                  "(default: this python); eval.py runs in one process (--records)")
    return p

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--sft-baseline"]:
        return sft_baseline(argv[1:])
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    out = os.path.abspath(args.out or ("runs/ablate-quick" if args.quick else "runs/ablate"))
    seeds = 1 if args.quick else args.seeds
    common = (QUICK if args.quick else []) + common
    try:  # a bad arm or flag: one line before any work
        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms:
            raise ValueError(f"--arms: unknown {unknown or args.arms!r}; choose from {', '.join(ARMS)}")
        if seeds < 1 or args.jobs < 1:
            raise ValueError("--seeds and --jobs must be >= 1")
        if any(f in common for f in ("--seed", "--out", "--resume")):
            raise ValueError("--seed, --out and --resume are set per run by ablate.py: leave them out after --")
        cfg = config.make_config(common)
        if cfg.data.eval_n <= 0:
            raise ValueError("--eval-n must be > 0: the grid compares evaluations")
        runs = plan_runs(arms, common)
        for run in runs:
            config.make_config(common + run.flags)
        launcher = shlex.split(args.launcher) or [sys.executable]
        if shutil.which(launcher[0]) is None:
            raise ValueError(f"--launcher {args.launcher!r}: no command {launcher[0]!r} on this machine's PATH")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    threads = ["--threads", "1"] if args.jobs > 1 else []
    os.makedirs(out, exist_ok=True)
    jobs = plan_jobs(runs, seeds, cfg, common, out, launcher, threads)
    print(f"ablation: {len(arms)} arms ({', '.join(arms)}) x {seeds} seed(s) = {len(jobs) - 1} runs + the base, "
          f"{args.jobs} at a time, in {out}/", flush=True)

    t0, failed = time.time(), []
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(jobs), desc="ablation", dynamic_ncols=True) as bar:
        for name, s, error in pool.map(run_job, jobs):
            bar.update(1)
            bar.write(f"{name}: {'failed, ' + error if error else 'done'} ({s:.0f} s)")
            if error:
                failed.append(name)
    if failed:
        raise SystemExit(f"error: {len(failed)} job(s) failed ({', '.join(failed)}); fix and rerun the same "
                         f"command to continue")

    base = scores(read_json(os.path.join(out, "base", "eval.json"))["records"][cfg.model.model])
    per_arm = {a: [] for a in arms}
    for run in runs:
        for seed in range(seeds):
            folder = os.path.join(out, f"{run.name}-s{seed}")
            records = read_json(os.path.join(folder, "eval.json"))["records"]
            for arm, path in model_dirs(run, folder, common).items():
                per_arm[arm].append(scores(records[path]))
    stats = statistics(base, per_arm)
    splits = list(dict.fromkeys(c[0] for c in base))
    table = tables(stats, splits, seeds, base)
    plot_changes(stats["vs base"], os.path.join(out, "ablation.png"))
    wall = round(time.time() - t0, 1)
    seconds = {job.name: read_json(os.path.join(job.folder, "seconds.json")) for job in jobs}
    write_atomic(os.path.join(out, "ablation.json"), json.dumps(
        {"settings": {"arms": {a: vars(ARMS[a]) for a in arms}, "seeds": seeds, "common": common,
                      "runs": [vars(r) for r in runs], "config": config.as_dict(cfg)},
         "stats": {k: {a: {"|".join(c): v for c, v in cells.items()} for a, cells in d.items()} for k, d in stats.items()},
         "seconds": seconds, "wall_seconds_this_call": wall, "table": table}, indent=1))
    write_atomic(os.path.join(out, "ablation.md"), table + "\n")
    print("\n" + table, flush=True)
    print(f"ablation: {wall:.0f} s this call; {out}/ablation.json, ablation.md, ablation.png", flush=True)
    return stats

if __name__ == "__main__":
    main()
