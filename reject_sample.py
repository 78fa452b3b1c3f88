"""
reject_sample.py: phase 2 of Curr-ReFT (rejection-sampling SFT) and the supervised loop `sft` that tiny_base.py's
warm-start shares. After the curriculum GRPO the paper samples answers from the RL model, keeps the good ones and
fine-tunes on them with a plain supervised loss and a small lr, to keep the general abilities.

    python reject_sample.py --model runs/tiny/stages/3_final --out runs/p2                    # synthetic pool, CPU
    python reject_sample.py --model RL --phase2-data a.jsonl --judge QWEN_VL --phase2-lr 2e-7 --device cuda --out O
    torchrun --nproc_per_node=8 reject_sample.py --model ... --phase2-data ... --out ...       # N GPUs

`phase2` (rejection_sample -> write_sft_file -> sft) on load_pool's prompts, each (image, problem) once:
1. sample y_1..y_N ~ pi(. | x, I) at temperature tau, one generator per prompt seeded by (seed, its pool index);
2. score s_j = accuracy(y_j) + format(y_j) (rewards.score, the RL stages' rule rewards), or a judge's 0-100 grade;
3. keep (x, y_j*), j* = argmax_j s_j (ties: the first sampled), when s_j* >= bar (2: both 1), judged >= 85;
4. write --out/sft.jsonl (in-memory images as PNGs in images/) and phase2_report.json (kept / total per task);
5. fine-tune `epochs` passes, a fresh seeded order each, on the token mean over each global batch's answers
       L = - sum_i sum_t m_it log pi(y_it | x_i, I_i, y_i<t) / sum_i sum_t m_it      (m: answer + <|im_end|>)
   and save --out/model/ (when anything was kept).
Distributed: rank r samples pool[r::W] and the kept rows are gathered in pool order; each rank trains on its slice
of every global batch, the token count all-reduced: the process count and the batching change nothing.

Departures from the paper, and why:
- Scorer: the rule rewards (offline, deterministic, exact here); --judge: a local Qwen-VL at the paper's 85.
- One answer per prompt (the best), duplicates dropped: the paper does not say; several over-weight easy prompts.
- Prompts: the synthetic world's, every task in every form, stand in for the paper's domain mix on a CPU.
- lr 1e-4 (the paper's 2e-7 is for 3B; the tiny model does not move at it); AdamW (0.9, 0.95), clip 1.0, constant:
  the release's SFT ran with ms-swift, whose other settings are not reproduced.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import config
import curriculum
import data
import model as M
import rewards
from rollout import generate
import fsdp
import optim
from runtime import all_reduce_sum, barrier, lr_factor, resolve_dtype, setup_dist, world_size

def target_text(row):
    """What the model should write for a row: its own completion when it has reasoning (sampled answers), else
    the synthetic world's reference completion (`<think></think><answer>...</answer>` for a bare answer)."""
    if "<think>" in row["solution"]:
        return row["solution"].strip()
    return data.reference_completion(row)

def sft_targets(processor, rows):
    """Right-padded target ids (n, T), each followed by <|im_end|>, and their mask (n, T)."""
    tok = processor.tokenizer
    ids = [torch.tensor(tok(target_text(r), add_special_tokens=False)["input_ids"] + [processor.eos_token_id])
           for r in rows]
    out = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=processor.pad_token_id)
    lengths = torch.tensor([len(x) for x in ids])
    return out, (torch.arange(out.shape[1]) < lengths[:, None]).float()

def sft_loss(model, processor, rows, targets, num_tokens, device):
    """Summed negative log-likelihood of the rows' targets (sft_targets: assistant tokens only) / num_tokens."""
    batch = {k: v.to(device) for k, v in M.encode(processor, data.samples_of(rows)).items()}
    fsdp.check_images(model, batch)
    ids, mask = (t.to(device) for t in targets)
    logp = M.completion_logprobs(model, batch, ids, mask)          # (n, T)
    return -(torch.where(mask.bool(), logp, 0.0)).sum() / num_tokens

def sft(model, processor, next_rows, steps, lr=1e-3, warmup=20, micro_batch=None, rank=0, device="cpu",
        callback=None, desc="sft", shard="none"):
    """Supervised fine-tuning (AdamW (0.9, 0.95), clip 1.0, constant lr after a linear warm-up) on the global batch
    `next_rows(step)` returns, this rank on its slice. callback(step, loss) may return True to stop. Returns the
    number of steps taken."""
    W = world_size()
    opt = optim.make(shard, model.parameters(), lr=lr, betas=(0.9, 0.95))
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=rank != 0, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 60)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, warmup, steps, "constant")
        rows = next_rows(step)
        local = rows[rank::W]  # may be empty when a batch has fewer rows than ranks
        mb = micro_batch or max(1, math.ceil(len(rows) / W))  # rows per forward
        chunks = [(local[i:i + mb], 1) for i in range(0, len(local), mb)]  # (rows, weight)
        if fsdp.is_sharded(model):  # every rank makes as many forwards (FSDP's collectives): extra ones weighted 0
            chunks += [(rows[:1], 0)] * (math.ceil(math.ceil(len(rows) / W) / mb) - len(chunks))
        chunks = [(chunk, weight, sft_targets(processor, chunk)) for chunk, weight in chunks]
        num_tokens = all_reduce_sum(sum(w * mask.sum().item() for _, w, (_, mask) in chunks))  # global
        loss_sum = 0.0
        for chunk, weight, targets in chunks:
            loss = sft_loss(model, processor, chunk, targets, num_tokens, device) * (weight * W)  # averaged
            loss.backward()
            loss_sum += loss.item() / W
        opt.step(max_norm=1.0)  # all-reduce, clip, AdamW on the fp32 masters (optim.py)
        loss_sum = all_reduce_sum(loss_sum)
        bar.set_postfix(loss=f"{loss_sum:.3f}", refresh=False)
        if callback is not None and callback(step, loss_sum):
            return step + 1
    return steps

class RuleScorer:
    """The RL stages' rule rewards, accuracy + format; an answer passes at score >= bar (2: both 1; 0: all).
    options: rewards.score's, as the RL run sets them (config.reward_options)."""

    def __init__(self, bar=2.0, **options):
        self.bar, self.options = bar, options

    def __call__(self, row, answers):
        scores = [rewards.score(a, row["solution"], row["task"], row.get("stage", "open"), **self.options)
                  for a in answers]
        return [{"score": s["total"], "passed": s["total"] >= self.bar - 1e-9, "accuracy": s["accuracy"],
                 "format": s["format"]} for s in scores]

    def __str__(self):
        options = "".join(f", {k} {v}" for k, v in self.options.items())
        return f"rule rewards{options}, accuracy + format >= {self.bar:g}"

JUDGE_PROMPT = ("Grade a candidate answer against the reference answer.\n"
                "Question: {question}\nReference answer: {reference}\nCandidate answer: {answer}\n"
                "How right is the candidate? Reply with one integer from 0 (wrong) to 100 (fully right).")
_JUDGE_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")

def parse_judge_score(text):
    """The first number a judge wrote (after its think block, if any) when it lies in [0, 100]; else 0."""
    if not isinstance(text, str):
        return 0.0
    m = _JUDGE_NUMBER.search(text.rpartition("</think>")[2][:1000])
    value = float(m.group()) if m else 0.0
    return value if 0.0 <= value <= 100.0 else 0.0

class Judge:
    """A local Qwen-VL checkpoint as the judge: shown the row's image, the question, the reference and an answer,
    it replies greedily with a 0-100 grade (parse_judge_score). An answer passes at >= threshold (paper: 85)."""

    def __init__(self, model, processor, threshold=85.0, name="judge"):
        self.model, self.processor, self.threshold, self.name = model, processor, threshold, name

    @classmethod
    def load(cls, path, threshold=85.0, **load_kw):  # load_kw: model.load's device, dtype, max_pixels
        return cls(*M.load(path, **load_kw), threshold=threshold, name=f"judge {path}")

    def prompt(self, row, answer):
        for token in data.VISION_TOKENS:  # only the processor may place vision tokens in a prompt
            answer = answer.replace(token, "")
        return JUDGE_PROMPT.format(question=row["problem"], reference=rewards.solution_text(row["solution"]),
                                   answer=answer.strip())

    @torch.no_grad()
    def __call__(self, row, answers):
        image = data.open_image(row) if row.get("image") is not None else None
        samples = [{"image": image, "problem": self.prompt(row, a)} for a in answers]
        was_training = self.model.training
        self.model.eval()
        replies = generate(self.model, self.processor, samples, max_new_tokens=16, greedy=True).texts
        self.model.train(was_training)
        scores = [parse_judge_score(t) for t in replies]
        return [{"score": s, "passed": s >= self.threshold, "reply": t[:200]} for s, t in zip(scores, replies)]

    def __str__(self):
        return f"{self.name}, score >= {self.threshold:g} / 100"

def image_key(image):
    """What identifies an image: its path, or a hash of an in-memory image's pixels (with size and mode)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        h = hashlib.sha1(f"{image.mode}:{image.size}:".encode())
        h.update(image.tobytes())
        return "sha1:" + h.hexdigest()
    return "path:" + os.path.abspath(os.fspath(image))

def clean_answer(text):
    """An answer as data.load_rows reads an assistant turn back: <image> placeholders removed, stripped."""
    return text.replace("<image>", "").strip()

def select(answers, verdicts, per_prompt=1):
    """Indices of the best passing answers of one prompt, best first (ties: the first sampled), at most
    per_prompt, all distinct; and the number of passing answers dropped as repeats of a kept one."""
    order = sorted(range(len(answers)), key=lambda j: -verdicts[j]["score"])  # stable sort
    chosen, seen, repeats = [], set(), 0
    for j in order:
        if not verdicts[j]["passed"]:
            continue
        text = clean_answer(answers[j])
        if text in seen:
            repeats += 1
        elif len(chosen) < per_prompt:
            chosen.append(j)
            seen.add(text)
    return chosen, repeats

SAMPLE_BATCH = 8  # prompts per generate call

@torch.no_grad()
def rejection_sample(model, processor, rows, n_samples=4, bar=2.0, scorer=None, per_prompt=1, max_new_tokens=64,
                     temperature=1.0, seed=0, rank=0, world=None, cuda_graphs=False):
    """Steps 1-3 of the top docstring: (kept rows, report), every rank the same kept rows in pool order.
    scorer(row, answers) -> [{"score", "passed", ...}] per answer (default RuleScorer(bar)); per_prompt k keeps
    the k best distinct passing answers. Rank r of `world` (default: the torchrun world size) samples pool[r::world]."""
    scorer = scorer if scorer is not None else RuleScorer(bar)
    W = world_size() if world is None else world
    t0 = time.time()
    first = {}  # each prompt (image, problem) once, its first row kept
    for row in rows:
        first.setdefault((image_key(row.get("image")), row["problem"]), row)
    pool, pool_duplicates = list(first.values()), len(rows) - len(first)
    local = list(enumerate(pool))[rank::W]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kept, stats = [], Counter()
    with fsdp.gathered(model):  # FSDP: gathered once; the ranks' sampling loops then differ in length freely
        for start in tqdm(range(0, len(local), SAMPLE_BATCH), desc="rejection sampling", disable=rank != 0,
                          dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 60):
            chunk = local[start:start + SAMPLE_BATCH]
            gens = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i, _ in chunk]
            ro = generate(model, processor, data.samples_of([row for _, row in chunk]), group_size=n_samples,
                          max_new_tokens=max_new_tokens, temperature=temperature, generator=gens,
                          cuda_graphs=cuda_graphs)
            for b, (i, row) in enumerate(chunk):
                answers = ro.texts[b * n_samples:(b + 1) * n_samples]               # the group of prompt b
                verdicts = scorer(row, answers)
                chosen, repeats = select(answers, verdicts, per_prompt)
                for j in chosen:  # an SFT row: what write_sft_file stores and load_rows gives back
                    text = clean_answer(answers[j])
                    kept.append({"image": row.get("image"), "problem": row["problem"],
                                 "solution": data.normalize_solution(text), "task": row["task"],
                                 "stage": row.get("stage", "open"), "answer": text,
                                 "score": float(verdicts[j]["score"]), "index": i})
                stats["duplicate_answers"] += repeats
                stats["answers_passed"] += sum(bool(v["passed"]) for v in verdicts)
                stats["answers_sampled"] += len(answers)
    model.train(was_training)
    if W > 1 and world_size() > 1:  # every rank gets every rank's kept rows (images included)
        parts = [None] * W
        dist.all_gather_object(parts, (kept, dict(stats)))
        kept = sorted((r for part, _ in parts for r in part), key=lambda r: r["index"])  # stable: best first per prompt
        stats = sum((Counter(s) for _, s in parts), Counter())

    totals = Counter(r["task"] for r in pool)
    kept_prompts = Counter(r["task"] for r in {r["index"]: r for r in kept}.values())
    report = {"per_task": {t: {"kept": kept_prompts[t], "total": totals[t]} for t in sorted(totals)},
              "kept": len(kept), "kept_prompts": sum(kept_prompts.values()), "total": len(pool),
              "pool_duplicates": pool_duplicates, "duplicate_answers": stats["duplicate_answers"],
              "answers_passed": stats["answers_passed"], "answers_sampled": stats["answers_sampled"],
              "scorer": str(scorer), "n_samples": n_samples, "per_prompt": per_prompt,
              "temperature": temperature, "seconds": round(time.time() - t0, 2)}
    if rank == 0:
        for t, c in report["per_task"].items():
            print(f"rejection sampling: {t:<9} kept {c['kept']:>5} / {c['total']:<5} prompts "
                  f"({100 * c['kept'] / max(1, c['total']):.1f}%)", flush=True)
        print(f"rejection sampling: kept {len(kept)} answers for {report['kept_prompts']} / {len(pool)} prompts "
              f"({scorer}; {report['answers_passed']} / {report['answers_sampled']} answers passed; "
              f"{pool_duplicates} duplicate prompts, {report['duplicate_answers']} duplicate answers dropped; "
              f"{report['seconds']:.1f}s)", flush=True)
    return kept, report

def write_sft_file(kept, path):
    """Write rows as Curr-ReFT SFT JSONL: {"messages": [user, assistant], "image", "task", "stage"} per line.
    An in-memory (PIL) image is saved as images/<sha1>.png beside the file (the same image once); a path
    under the file's folder is written relative to it, any other path absolute. Returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in kept:
            record = {"messages": [{"role": "user", "content": row["problem"]},
                                   {"role": "assistant", "content": row.get("answer", row["solution"])}]}
            image = row.get("image")
            if isinstance(image, Image.Image):
                name = os.path.join("images", image_key(image)[len("sha1:"):][:20] + ".png")
                if not os.path.isfile(os.path.join(folder, name)):
                    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
                    image.save(os.path.join(folder, name))
                record["image"] = name.replace(os.sep, "/")
            elif image is not None:
                full = os.path.abspath(os.fspath(image))
                inside = os.path.commonpath([full, folder]) == folder
                record["image"] = os.path.relpath(full, folder).replace(os.sep, "/") if inside else full
            record.update(task=row["task"], stage=row.get("stage", "open"))
            f.write(json.dumps(record) + "\n")  # ASCII-escaped: no U+2028 or U+0085 for splitlines to cut at
    os.replace(tmp, path)
    return path

P2 = config.Phase2Config()  # one set of phase-2 defaults, for train.py and this command line

def phase2(model, processor, pool_rows, out_dir, n_samples=P2.phase2_samples, lr=P2.phase2_lr,
           epochs=P2.phase2_epochs, batch_size=P2.phase2_batch, bar=P2.phase2_bar, scorer=None, max_new_tokens=64,
           temperature=1.0, seed=0, rank=0, device=None, shard="none", cuda_graphs=False, micro_batch=None):
    """Rejection sampling, out_dir/sft.jsonl, then `epochs` passes of `sft` over the kept rows in global batches
    of batch_size, micro_batch rows per forward on a rank (None: all): fine-tunes `model` in place (unchanged when
    nothing was kept) and returns the report, also written to out_dir/phase2_report.json."""
    device = device or next(model.parameters()).device
    was_training = model.training
    kept, report = rejection_sample(model, processor, pool_rows, n_samples=n_samples, bar=bar, scorer=scorer,
                                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, rank=rank,
                                    cuda_graphs=cuda_graphs)
    path = os.path.join(out_dir, "sft.jsonl")
    if rank == 0:
        write_sft_file(kept, path)
        print(f"phase 2: {len(kept)} rows written to {path}", flush=True)
    barrier()

    per_epoch = math.ceil(len(kept) / batch_size)
    steps = epochs * per_epoch
    losses = []
    if steps == 0:
        if rank == 0:
            print(f"phase 2: no answer passed the bar ({report['scorer']}) on {report['total']} prompts: "
                  f"nothing to fine-tune on, SFT skipped, the model is unchanged", flush=True)
    else:
        def next_rows(step):  # the same global batch on every rank: a fresh seeded order each epoch
            epoch, k = divmod(step, per_epoch)
            order = list(range(len(kept)))
            random.Random(f"phase2:{seed}:{epoch}").shuffle(order)
            return [kept[i] for i in order[k * batch_size:(k + 1) * batch_size]]

        def callback(step, loss):
            losses.append(round(loss, 4))
            if rank == 0 and (step + 1) % per_epoch == 0:
                print(f"phase 2 sft: epoch {(step + 1) // per_epoch}/{epochs} step {step + 1}/{steps} "
                      f"loss {loss:.4f}", flush=True)
            return False

        sft(model, processor, next_rows, steps, lr=lr, warmup=0, micro_batch=micro_batch, rank=rank, device=device,
            callback=callback, desc="phase 2 sft", shard=shard)
        model.train(was_training)
    report["sft"] = {"skipped": steps == 0, "rows": len(kept), "steps": steps, "epochs": epochs,
                     "batch_size": batch_size, "micro_batch": micro_batch, "lr": lr, "warmup": 0,
                     "schedule": "constant",
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                     "losses": losses}
    if rank == 0:
        with open(os.path.join(out_dir, "phase2_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report

def phase2_of_run(cfg, model, processor, pool_rows, out_dir, rank=0, device=None, scorer=None):
    """phase2 as a run's config sets it (train.py and this command line): its phase-2 flags and the RL stages'
    answer length, temperature, micro-batch, seed, sharding and rule rewards (scorer: another grader)."""
    p2, rl = cfg.phase2, cfg.rl
    return phase2(model, processor, pool_rows, out_dir, n_samples=p2.phase2_samples, lr=p2.phase2_lr,
                  epochs=p2.phase2_epochs, batch_size=p2.phase2_batch, bar=p2.phase2_bar,
                  scorer=scorer or RuleScorer(p2.phase2_bar, **config.reward_options(rl)),
                  max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, seed=cfg.run.seed, rank=rank,
                  device=device, shard=cfg.model.shard, cuda_graphs=cfg.model.cuda_graphs, micro_batch=rl.micro_batch)

def phase2_prompts(rows, seed=0):
    """Synthetic open rows as phase 2's prompts: each task's rows asked in judge, choice and open form in turn,
    so every (task, form) cell gets a near-equal share and the SFT keeps every answer form of every task."""
    out, seen = [], {}  # rows of each task so far
    for i, row in enumerate(rows):
        k = seen.get(row["task"], 0)                               # this row is its task's k-th
        seen[row["task"]] = k + 1
        rng = random.Random(f"phase2:{seed}:{i}")
        out.append(curriculum.make_stage_row(row, curriculum.STAGES[k % 3], rng, truth=(k // 3) % 2 == 0))
    return out

def load_pool(cfg, pool=None):
    """Phase 2's prompts: the phase2_data files (a problem without the instruction line gets its stage's), else
    the last phase2_prompts rows of the synthetic train pool (train.py's, rebuilt when not given), as
    phase2_prompts asks them."""
    if cfg.phase2.phase2_data:
        rows = data.load_mixture(cfg.phase2.phase2_data, seed=cfg.run.seed, image_root=cfg.data.image_root or None)
        if not rows:
            raise data.DataError(f"--phase2-data {cfg.phase2.phase2_data!r}: no rows")
        try:  # a row without a stage is an open question
            return curriculum.prepare_stage_rows(rows, "open")
        except data.DataError as e:
            raise data.DataError(f"--phase2-data {cfg.phase2.phase2_data!r}: {e}") from None
    if pool is None:
        pool = data.make_split("train", cfg.data.pool_size, seed=cfg.run.seed, size=cfg.data.image_size)
    return phase2_prompts(pool[-cfg.phase2.phase2_prompts:], cfg.run.seed)

def build_parser():
    """The phase-2 settings of config.py's dataclasses (train.py's names and defaults), plus the judge's."""
    p = argparse.ArgumentParser(description="Phase 2 of Curr-ReFT: rejection-sampling SFT (--out is required).")
    config.add_flags(p, "phase2", ["phase2_data", "phase2_prompts", "phase2_samples", "phase2_bar", "phase2_lr",
                                   "phase2_epochs", "phase2_batch"])
    config.add_flags(p, "model")
    config.add_flags(p, "data", ["pool_size", "image_size", "image_root"])
    config.add_flags(p, "rl", ["max_new_tokens", "temperature"])
    config.add_flags(p, "run", ["out", "seed", "threads"])
    p.add_argument("--judge", help="score with this local Qwen-VL checkpoint's 0-100 grade, not the rule rewards")
    p.add_argument("--judge-threshold", type=float, default=85.0, help="judge: keep an answer scored >= this")
    return p

def check_args(args, cfg):
    """One clear line for a missing --out, model folder or data file, or a bad value, before any work."""
    if getattr(args, "run.out") is None:
        raise SystemExit("error: --out: give the output folder")
    for flag, path in (("--model", cfg.model.model), ("--judge", args.judge)):
        if path is not None and path not in M.PRESETS and not os.path.isdir(path):
            raise SystemExit(f"error: {flag} {path!r}: no such folder (give a Qwen2.5-VL / Qwen2-VL checkpoint "
                             f"folder{', or tiny' if flag == '--model' else ''})")
    spec = cfg.phase2.phase2_data
    if not 0 <= args.judge_threshold <= 100:
        raise SystemExit(f"error: --judge-threshold {args.judge_threshold}: the judge grades 0 to 100")
    try:
        config.validate(cfg)
        missing = [item.path for item in (data.parse_mixture(spec) if spec else []) if not os.path.isfile(item.path)]
    except ValueError as e:  # data.DataError is a ValueError
        raise SystemExit(f"error: {e}")
    if missing:
        raise SystemExit(f"error: --phase2-data {spec!r}: data file not found: {missing[0]}")

def main(argv=None):
    """`python reject_sample.py --model DIR --out DIR`: phase 2 alone on load_pool's prompts, then model.save."""
    args = build_parser().parse_args(argv)
    cfg = config.apply_flags(config.Config(), args)
    check_args(args, cfg)
    rank, _, W, device = setup_dist(None if cfg.model.device == "auto" else cfg.model.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dtype = resolve_dtype(cfg.model.dtype, device)
    out, seed = cfg.run.out, cfg.run.seed
    resolved = {"world_size": W, "device": str(device), **config.as_dict(cfg), "judge": args.judge,
                "judge_threshold": args.judge_threshold}
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        print(json.dumps(resolved, indent=1), flush=True)
    try:
        pool = load_pool(cfg)
        load_kw = dict(device=device, dtype=dtype, max_pixels=cfg.model.max_pixels)
        model, processor = M.load(cfg.model.model, seed=seed, **load_kw)
        M.set_memory_options(model, cfg.model.attn, cfg.model.grad_checkpointing)
        scorer = Judge.load(args.judge, threshold=args.judge_threshold, **load_kw) if args.judge else None
    except (FileNotFoundError, ValueError) as e:  # data.DataError is a ValueError
        raise SystemExit(f"error: {e}")
    if cfg.model.shard == "fsdp":
        model = fsdp.shard(model, dtype)
    torch.manual_seed(seed)
    report = phase2_of_run(cfg, model, processor, pool, out, rank=rank, device=device, scorer=scorer)
    if rank == 0:
        report["config"] = resolved
        with open(os.path.join(out, "phase2_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if report["sft"]["skipped"]:
            print(f"phase 2: nothing kept, no model written; report in {out}/phase2_report.json", flush=True)
    if not report["sft"]["skipped"]:
        fsdp.save(model, processor, os.path.join(out, "model"), dtype, rank)
        if rank == 0:
            print(f"phase 2: fine-tuned model written to {os.path.join(out, 'model')}", flush=True)
    if dist.is_initialized():
        del model  # FSDP's state holds the process group: free it first, or gloo may abort at exit
        barrier()
        dist.destroy_process_group()
    return report

if __name__ == "__main__":
    main()
