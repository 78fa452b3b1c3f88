"""
eval.py: held-out evaluation of Curr-ReFT checkpoints, in-domain and out of domain, side by side.

Greedy answers (rollout.generate, batched), scored on their one <answer> block; every checkpoint one table row.
On a CPU the batches run in forked one-thread processes, one per torch thread (runtime.forked_map).

    python eval.py --model runs/tiny/stages/0_judge_start,runs/tiny/stages/3_final     # synthetic test + ood
    python eval.py --model DIR --n 300 --stages judge,choice,open                     # + judge / choice rows
    python eval.py --model DIR --data "test=test.jsonl;ood=ood.jsonl" --task math --out results.json
    python eval.py --model DIR --samples 8 --pass-k 1,4                               # + pass@k from 8 samples
    torchrun --nproc_per_node=8 eval.py --model DIR --rows 300  # rank r: rows[r::W], sums all-reduced; --rows = --n
    results = evaluate_models([("base", model, processor), "DIR"], eval_sets_synthetic(n=150))  # from Python

Data: data.make_split("test" | "ood", n) rows, asked in each --stages form (curriculum.stage_rows), or --data files.
Metrics of a (split, task, stage) cell, means over its n rows (a row's stage: its `stage` field, else open):
    detection  accuracy = acc@0.5 = 1[IoU >= 0.5], iou_mean = IoU of the last box with the true one (0 if none)
    classify   accuracy = exact = 1[P = G]; f1 = 2|P & G| / (|P| + |G|) for label sets P, G (0 if P does not parse)
    math       1 if the last \\boxed{} (else the one number after the last "=") is the solution, within 1e-6 relative
    judge      1 if the answer is exactly the right yes or no; choice: 1 if the option letters are the right set
    format     1 if the completion is a think block then an answer block that parses as the form's type
    pass@k     1 - C(n-c, k) / C(n, k) for c right of n samples at temperature 1, row i seeded seed * 1_000_003 + i
    *_se       sqrt((mean(x^2) - mean(x)^2) / n), which is sqrt(p (1 - p) / n) for 0/1 scores
    change     each checkpoint minus the first on the same rows (paired_differences): mean(d) ± sd(d) / sqrt(n)

Departures from the paper's release, and why:
- Only the answer block, exact label sets and one parsed number count (the release takes a label superset, or any
  number in the output, as right): lenient rules pay for guessing. Detection: IoU >= 0.5 (the release: > 0.5).
- The release's benchmarks (AI2D, MMVet, ...) are graded by a GPT judge, an outside service: not reproduced.
"""
import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

import curriculum
import data
import model as M
import rewards
from rollout import generate
from runtime import (all_reduce_sum, barrier, check_device, cpu_workers, forked_map, require, resolve_dtype,
                     setup_dist, world_size, write_atomic)

IOU_THRESHOLD = 0.5
TASK_METRICS = {("detection", "open"): {"acc@0.5": "acc@0.5", "iou_mean": "IoU"},   # metric: column label
                ("classify", "open"): {"exact": "exact", "f1": "F1"}}
SHORT = {"detection": "det", "classify": "cls", "math": "math"}
# Sequences per generation batch on one rank (evaluate_models, --batch-size); the decode batch shrinks as answers end.
EVAL_BATCH = 128

@torch.no_grad()
def answers(model, processor, rows, batch_size=64, max_new_tokens=64, samples=0, seed=0, index=None, workers=1,
            cuda_graphs=False):
    """Per row: [its greedy answer], or `samples` answers at temperature 1 from a generator seeded by
    seed * 1_000_003 + index[j] (default j), so batch- and rank-independent. At most batch_size sequences a batch;
    workers > 1: the batches dealt to forked processes (runtime.forked_map), each batch the same as in one."""
    G = max(1, samples)
    step = max(1, batch_size // G)
    index = range(len(rows)) if index is None else index
    device = next(model.parameters()).device

    def batch(i):  # the answers of rows[i:i + step]
        chunk = rows[i:i + step]
        gens = None if not samples else [torch.Generator(device=device).manual_seed(seed * 1_000_003 + index[i + j])
                                         for j in range(len(chunk))]
        r = generate(model, processor, data.samples_of(chunk), group_size=G, max_new_tokens=max_new_tokens,
                     greedy=not samples, temperature=1.0, generator=gens, cuda_graphs=cuda_graphs)
        return [r.texts[j * G:(j + 1) * G] for j in range(len(chunk))]   # row-major: G texts per row

    return [texts for part in forked_map(batch, range(0, len(rows), step), workers) for texts in part]

@torch.no_grad()
def evaluate(model, processor, rows, batch_size=64, max_new_tokens=64, reward_options=None):
    """The quick evaluation: the training reward (rewards.score) of greedy answers, one process, no se:
    {(task, stage): {"accuracy", "format", "n", "iou" (open detection)}}."""
    was_training = model.training
    model.eval()
    sums = defaultdict(lambda: defaultdict(float))
    for row, (text,) in zip(rows, answers(model, processor, rows, batch_size, max_new_tokens)):
        s = rewards.score(text, row["solution"], row["task"], row.get("stage", "open"), **(reward_options or {}))
        cell = sums[(row["task"], row.get("stage", "open"))]
        cell["n"] += 1
        for k in ("accuracy", "format", "iou"):
            if k in s:
                cell[k] += s[k]
    model.train(was_training)
    return {key: {k: (v if k == "n" else v / cell["n"]) for k, v in cell.items()} for key, cell in sums.items()}

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c right: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples holds a right one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def metric_names(task, stage, ks=()):
    """The metrics of a (task, stage) cell, in table order."""
    return ["accuracy", "format"] + list(TASK_METRICS.get((task, stage), {})) + [f"pass@{k}" for k in ks]

def score_answer(text, row):
    """{"task", "stage", + the row's own value of each of metric_names(task, stage)} for one answer."""
    task, stage, solution = row["task"], row.get("stage", "open"), row["solution"]
    s = rewards.score(text, solution, task, stage)
    out = {"task": task, "stage": stage, "accuracy": s["accuracy"], "format": s["format"]}
    if (task, stage) == ("detection", "open"):
        hit = float(s["iou"] >= IOU_THRESHOLD)
        out.update({"accuracy": hit, "acc@0.5": hit, "iou_mean": s["iou"]})
    elif (task, stage) == ("classify", "open"):
        exact = rewards.score(text, solution, task, stage, label_mode="exact")["accuracy"]
        f1 = rewards.score(text, solution, task, stage, label_mode="f1")["accuracy"]
        out.update({"accuracy": exact, "exact": exact, "f1": f1})
    return out

def cells_of(eval_sets):
    """Every (split, task, stage) of the sets, in order: splits as given, then TASKS, then STAGES."""
    order = {(t, s): i for i, (t, s) in enumerate((t, s) for s in rewards.STAGES for t in rewards.TASKS)}
    cells = []
    for split, rows in eval_sets.items():
        present = {(r["task"], r.get("stage", "open")) for r in rows}
        cells += [(split, t, s) for t, s in sorted(present, key=order.get)]
    return cells

def metrics(records, cells=None, ks=(), reduce=None):
    """Per-row records (evaluate_models) -> {split: {task: {stage: {"n", metric, metric + "_se", ...}}}}. The sums
    (n, sum x, sum x^2 of every cell and metric) pass through `reduce` as one tensor (runtime.all_reduce_sum: the
    totals of all ranks); `cells` (default: the records') fixes that layout and must be the same on every rank."""
    if cells is None:
        cells = list(dict.fromkeys((r["split"], r["task"], r["stage"]) for r in records))
    layout = {cell: metric_names(cell[1], cell[2], ks) for cell in cells}
    at, size = {}, 0
    for cell, names in layout.items():           # per cell: n, then (sum x, sum x^2) per metric
        at[cell], size = size, size + 1 + 2 * len(names)
    sums = torch.zeros(size, dtype=torch.float64)
    for r in records:
        cell = (r["split"], r["task"], r["stage"])
        i = at[cell]
        sums[i] += 1
        for j, name in enumerate(layout[cell]):
            sums[i + 1 + 2 * j] += r[name]
            sums[i + 2 + 2 * j] += r[name] ** 2
    sums = (sums if reduce is None else reduce(sums)).tolist()
    out = {}
    for (split, task, stage), names in layout.items():
        i = at[(split, task, stage)]
        n = int(round(sums[i]))
        cell = {"n": n}
        for j, name in enumerate(names):   # se = sqrt((mean(x^2) - mean(x)^2) / n)
            mean = sums[i + 1 + 2 * j] / n if n else None
            var = max(0.0, sums[i + 2 + 2 * j] / n - mean ** 2) if n else None
            cell[name], cell[name + "_se"] = mean, (math.sqrt(var / n) if n else None)
        out.setdefault(split, {}).setdefault(task, {})[stage] = cell
    return out

def eval_sets_synthetic(n=300, seed=0, stages=("open",), size=112):
    """{"test": rows, "ood": rows}: n synthetic rows per split (n/3 per task), each asked in every stage of
    `stages` (curriculum.stage_rows), so n * len(stages) rows a split."""
    sets = {}
    for split in ("test", "ood"):
        base = data.make_split(split, n, seed=seed, size=size)
        sets[split] = [r for stage in stages for r in curriculum.stage_rows(base, stage, seed=seed)]
    return sets

def parse_data_spec(text):
    """'test=a.jsonl;ood=b.jsonl:first:200' -> [("test", "a.jsonl"), ("ood", "b.jsonl:first:200")]; a part
    without a name is named after its first file ('ood.jsonl' -> 'ood')."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, spec = part.partition("=")
        if not sep:
            name, spec = os.path.splitext(os.path.basename(part.split(",")[0].split(":")[0]))[0], part
        if not name.strip() or not spec.strip():
            raise ValueError(f"bad --data part {part!r}; expected name=mixture_spec")
        out.append((name.strip(), spec.strip()))
    if len({name for name, _ in out}) != len(out):
        raise ValueError(f"--data names a split twice: {text!r}")
    return out

def load_eval_sets(spec="synthetic", n=300, seed=0, stages=("open",), image_root=None, default_task=None,
                   size=112, flag="--data"):
    """Evaluation sets from `flag` (this command's --data, train.py's --eval-data): "synthetic" (or empty) or
    'name=spec;name=spec' of Curr-ReFT files. A missing or bad file raises data.DataError naming it and the split."""
    if spec.strip() in ("", "synthetic"):
        return eval_sets_synthetic(n, seed, stages, size)
    sets = {}
    for name, mixture in parse_data_spec(spec):
        try:
            rows = data.load_mixture(mixture, seed=seed, image_root=image_root, default_task=default_task)
        except data.DataError as e:
            raise data.DataError(f"{flag} {name}={mixture}: {e}") from e
        if not rows:
            raise data.DataError(f"{flag} {name}={mixture}: no rows")
        for i, row in enumerate(rows, 1):
            if row.get("stage", "open") not in rewards.STAGES:
                raise data.DataError(f"{flag} {name}: row {i} has unknown stage {row['stage']!r}")
        try:  # adds the instruction line where it is missing; a row without a stage is an open question
            sets[name] = curriculum.prepare_stage_rows(rows, "open")
        except data.DataError as e:
            raise data.DataError(f"{flag} {name}={mixture}: {e}") from None
    return sets

def check_checkpoint(path):
    """Raise FileNotFoundError or ValueError naming what to fix unless `path` is a preset of model.load or a
    checkpoint folder that model.load can read (model.check_checkpoint)."""
    if path not in M.PRESETS:
        M.check_checkpoint(path)

def _open_model(entry, device, dtype, max_pixels):
    """(name, model, processor) from a path, a (name, path) pair or a (name, model, processor) triple."""
    if isinstance(entry, (str, os.PathLike)):
        entry = (os.fspath(entry), os.fspath(entry))
    if len(entry) == 3:
        return entry
    name, path = entry
    check_checkpoint(path)
    with torch.random.fork_rng(devices=[]):   # loading a preset seeds its init; leave the caller's RNG alone
        model, processor = M.load(path, device=device or "cpu", dtype=dtype or torch.float32, max_pixels=max_pixels)
    return name, model, processor

def _rank_world():
    return (dist.get_rank() if dist.is_initialized() else 0), world_size()

def evaluate_models(models, eval_sets, batch_size=EVAL_BATCH, max_new_tokens=64, samples=0, pass_k=(), seed=0,
                    device=None, dtype=None, max_pixels=None, verbose=False, records_out=None, cuda_graphs=False):
    """{name: metrics(...)} of every model (a path, a (name, path) pair, loaded one at a time, or a (name, model,
    processor) triple) on every set of eval_sets {split: rows}; samples > 0 adds pass@k for k in pass_k (default
    1 and samples). Under torchrun rank r answers rows[r::W] and every rank returns the all-reduced totals.
    records_out: a dict to receive {name: this rank's per-row records}, for paired_differences. cuda_graphs: decode
    steps as CUDA graphs (rollout.generate)."""
    rank, W = _rank_world()
    ks = tuple(sorted(set(pass_k or (1, samples)))) if samples else ()
    if any(not 1 <= k <= samples for k in ks):
        raise ValueError(f"pass@k needs 1 <= k <= samples={samples}, got k in {ks}")
    cells = cells_of(eval_sets)
    names = [os.fspath(e) if isinstance(e, (str, os.PathLike)) else e[0] for e in models]
    if len(set(names)) < len(names):  # before the first model's hours of evaluation
        raise ValueError(f"two models are named {next(n for n in names if names.count(n) > 1)!r}")
    results = {}
    for entry in models:
        name, model, processor = _open_model(entry, device, dtype, max_pixels)
        workers = cpu_workers(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        records = []
        for split, rows in eval_sets.items():
            t0 = time.time()
            index = list(range(rank, len(rows), W))                        # this rank's rows: rows[rank::W]
            mine = [rows[i] for i in index]
            greedy = answers(model, processor, mine, batch_size, max_new_tokens, workers=workers,
                             cuda_graphs=cuda_graphs)
            sampled = (answers(model, processor, mine, batch_size, max_new_tokens, samples, seed, index, workers,
                               cuda_graphs)
                       if samples else [None] * len(mine))
            for row, (text,), texts in zip(mine, greedy, sampled):   # a record per row: its scores, its pass@k
                records.append({"split": split, **score_answer(text, row)})
                if ks:
                    c = sum(score_answer(t, row)["accuracy"] == 1.0 for t in texts)
                    records[-1].update({f"pass@{k}": pass_at_k(len(texts), c, k) for k in ks})
            if verbose and rank == 0:
                print(f"eval {name}: {split} {len(rows)} rows ({len(mine)} on rank 0) in {time.time() - t0:.1f}s",
                      file=sys.stderr, flush=True)
        model.train(was_training)
        if records_out is not None:
            records_out[name] = records
        results[name] = metrics(records, cells, ks, reduce=all_reduce_sum)
        for cell in (c for tasks in results[name].values() for stages in tasks.values() for c in stages.values()):
            cell["samples"] = samples
        del model, processor  # the next model loads without this one in memory
    return results

def paired_differences(records_a, records_b, cells, reduce=None):
    """metrics() of the per-row differences b - a of two models' records of the same rows: each cell's mean
    change and its paired se, sd(b - a) / sqrt(n), far under the unpaired one when the models agree on most rows."""
    if len(records_a) != len(records_b):
        raise ValueError(f"paired differences need the same rows: {len(records_a)} vs {len(records_b)} records")
    diffs = []
    for a, b in zip(records_a, records_b):
        if (a["split"], a["task"], a["stage"]) != (b["split"], b["task"], b["stage"]):
            raise ValueError("paired differences need the records of the same rows, in the same order")
        names = metric_names(a["task"], a["stage"])
        diffs.append({"split": a["split"], "task": a["task"], "stage": a["stage"],
                      **{m: b[m] - a[m] for m in names}})
    return metrics(diffs, cells, reduce=reduce)

def changes_from_first(records, eval_sets, reduce=None):
    """{"<name> − <first>": paired_differences(first, name)} for every model after the first of `records`."""
    first, cells = next(iter(records)), cells_of(eval_sets)
    return {f"{name} − {first}": paired_differences(records[first], recs, cells, reduce=reduce)
            for name, recs in records.items() if name != first}

def _columns(results, labels):
    """([(label, split, task, stage, metric)], splits): for each form of the results, in table order, its metrics
    labels(task, stage) = {metric: label}, each with the splits side by side."""
    splits = list(dict.fromkeys(split for per_model in results.values() for split in per_model))
    forms = {(task, stage) for per_model in results.values() for tasks in per_model.values()
             for task, stages in tasks.items() for stage in stages}
    cols = []
    for task, stage in [(t, s) for s in ("open", "judge", "choice") for t in rewards.TASKS if (t, s) in forms]:
        for metric, label in labels(task, stage).items():
            cols += [(f"{SHORT[task]} {label} {split}", split, task, stage, metric) for split in splits]
    return cols, splits

def _pct(mean, se, signed=False):
    return f"{100 * mean:{'+' if signed else ''}.1f} ± {100 * se:.1f}"

def _entry(per_model, split, task, stage, metric, signed=False):
    """A cell's metric as "mean ± se" in percent, or – where the model has no rows."""
    cell = per_model.get(split, {}).get(task, {}).get(stage)
    return _pct(cell[metric], cell[metric + "_se"], signed) if cell and cell["n"] else "–"

def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]

def markdown_table(results, differences=False):
    """A markdown table, one row per model: each form's headline metrics per split, then each split's format
    rate; a note with the n of every cell; a pass@k table when sampled. differences=True: `results` are
    paired_differences (signed changes with their paired se; no format columns)."""
    cols, splits = _columns(results, lambda t, s: TASK_METRICS.get((t, s), {"accuracy": "acc" if s == "open" else s}))
    header = ["model"] + [c[0] for c in cols] + ([] if differences else [f"format {s}" for s in splits])
    body = []
    for name, per_model in results.items():
        row = [name] + [_entry(per_model, *c[1:], signed=differences) for c in cols]
        for split in [] if differences else splits:  # format over the split's rows: a 0/1 rate, se = sqrt(p(1-p)/N)
            cells = [c for stages in per_model.get(split, {}).values() for c in stages.values() if c["n"]]
            N = sum(c["n"] for c in cells)
            p = sum(c["format"] * c["n"] for c in cells) / N if N else None
            row.append(_pct(p, math.sqrt(p * (1 - p) / N)) if N else "–")
        body.append(row)
    lines = _table(header, body)
    first = next(iter(results.values()), {})
    notes = []
    for split, tasks in first.items():
        ns = {f"{SHORT[t]} {s}": c["n"] for t, stages in tasks.items() for s, c in stages.items()}
        if len(set(ns.values())) == 1:
            notes.append(f"{split} {next(iter(ns.values()))} per task and form")
        else:
            notes.append(f"{split} " + ", ".join(f"{k} {v}" for k, v in ns.items()))
    lines += ["", ("Percentage points, the change on the same rows ± its paired standard error (sd of the "
                   "per-row change / sqrt(n)). " if differences else
                   "Percentages, mean ± one standard error (sqrt(p(1-p)/n) for a rate). ")
              + "Rows per cell: " + "; ".join(notes) + "."]
    cell = next((c for tasks in first.values() for stages in tasks.values() for c in stages.values()), {})
    ks = [m for m in cell if m.startswith("pass@") and not m.endswith("_se")]
    if ks:
        pcols, _ = _columns(results, lambda task, stage: {k: k if stage == "open" else f"{stage} {k}" for k in ks})
        lines += ["", f"pass@k from {cell['samples']} samples per row at temperature 1 (unbiased estimator):", ""]
        lines += _table(["model"] + [c[0] for c in pcols],
                        [[name] + [_entry(per_model, *c[1:]) for c in pcols] for name, per_model in results.items()])
    return "\n".join(lines)

def build_parser():
    p = argparse.ArgumentParser(description="Evaluate Curr-ReFT checkpoints in and out of domain.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folders (or 'tiny'), comma-separated; one table row each")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (the test and ood splits) or 'name=mixture_spec;name=mixture_spec' of JSONL files")
    p.add_argument("--task", default=None, choices=list(data.TASKS), help="task of file rows without a `task` field")
    p.add_argument("--image-root", default=None, help="folder relative image paths start from (default: the file's)")
    p.add_argument("--n", "--rows", dest="n", type=int, default=300,
                   help="synthetic rows per split (n/3 per task); write --rows under torchrun, which takes --n")
    p.add_argument("--stages", default="open", help="synthetic forms asked of each row: any of judge,choice,open")
    p.add_argument("--image-size", type=int, default=112, help="synthetic image side in pixels (a multiple of 28; "
                                                               "train.py's --image-size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic splits and of the sampling")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH, help="sequences per generation batch on one rank")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (the paper samples 256)")
    p.add_argument("--samples", type=int, default=0, help="answers sampled per row for pass@k (0: greedy only)")
    p.add_argument("--pass-k", default="", help="k values of pass@k, comma-separated (default: 1 and --samples)")
    p.add_argument("--out", default="", help="write the results as JSON here (rank 0)")
    p.add_argument("--records", action="store_true", help="--out also holds every row's scores, per model (for "
                                                           "paired statistics such as ablate.py's; one process)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-pixels", type=int, default=None, help="resize images to at most this many pixels")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cuda-graphs", action="store_true", help="decode steps replayed as CUDA graphs (GPU only)")
    return p

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:  # bad input: one clear line naming it, before any model is loaded
        paths = [m.strip() for m in args.model.split(",") if m.strip()]
        if not paths:
            raise ValueError("--model names no checkpoint")
        if len(set(paths)) < len(paths):
            raise ValueError(f"--model names {next(p for p in paths if paths.count(p) > 1)!r} twice")
        for path in paths:
            check_checkpoint(path)
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        if not stages or any(s not in curriculum.STAGES for s in stages) or len(set(stages)) < len(stages):
            raise ValueError(f"--stages {args.stages!r}: expected some of {', '.join(curriculum.STAGES)}, each once")
        check_device(args.device)
        require([(args.n >= 1, "--n must be >= 1"),
                 (args.n >= 3 or args.data.strip() not in ("", "synthetic"),
                  "--n must be >= 3 on the synthetic sets (a third of the rows for each task)"),
                 (args.batch_size >= 1, "--batch-size must be >= 1"),
                 (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
                 (args.samples >= 0, "--samples must be >= 0 (0: greedy only)"),
                 (args.threads >= 0, "--threads must be >= 0 (0: torch's default)"),
                 (args.threads <= (os.cpu_count() or 1), f"--threads {args.threads}: this machine has "
                                                         f"{os.cpu_count()} cores"),
                 (args.max_pixels is None or args.max_pixels >= 1, "--max-pixels must be >= 1"),
                 (args.image_size >= 28 and args.image_size % 28 == 0, "--image-size must be a multiple of 28")])
        if not all(k.strip().isdigit() for k in args.pass_k.split(",") if k.strip()):
            raise ValueError(f"--pass-k {args.pass_k!r}: give whole numbers, comma-separated")
        ks = tuple(int(k) for k in args.pass_k.split(",") if k.strip())
        if (ks and not args.samples) or any(not 1 <= k <= args.samples for k in ks):
            raise ValueError(f"--pass-k {args.pass_k!r} needs --samples >= every k (got --samples {args.samples})")
        sets = load_eval_sets(args.data, args.n, args.seed, stages, args.image_root, args.task, args.image_size)
    except (ValueError, FileNotFoundError) as e:   # data.DataError is a ValueError
        raise SystemExit(f"error: {e}")
    if args.records and (not args.out or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        raise SystemExit("error: --records writes every row's scores into --out, from one process: give --out, "
                         "and run it without torchrun")
    rank, _, W, device = setup_dist(None if args.device == "auto" else args.device)
    if args.cuda_graphs and not device.startswith("cuda"):
        raise SystemExit(f"error: --cuda-graphs needs a GPU (this run is on {device}): drop it")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.time()
    records = {}
    results = evaluate_models(paths, sets, args.batch_size, args.max_new_tokens, args.samples, ks, args.seed,
                              device=device, dtype=dtype, max_pixels=args.max_pixels, verbose=True,
                              records_out=records, cuda_graphs=args.cuda_graphs)
    changes = changes_from_first(records, sets, reduce=all_reduce_sum)  # several checkpoints: paired changes
    if rank == 0:
        table = markdown_table(results)
        if changes:
            table += (f"\n\nChange from {next(iter(records))}, paired over the same rows:\n\n"
                      + markdown_table(changes, True))
        print(table, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            extra = {"records": records} if args.records else {}
            write_atomic(args.out, json.dumps({"config": vars(args), "world_size": W, "seconds": round(time.time() - t0, 1),
                                               "results": results, "changes": changes, "table": table, **extra},
                                              indent=1))
            print(f"wrote {args.out}", file=sys.stderr)
    barrier()
    return results

if __name__ == "__main__":
    main()
