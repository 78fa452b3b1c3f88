"""
reject_sample.py: phase 2 of Curr-ReFT, rejection-sampling SFT, and the supervised loop `sft` it shares with the
tiny base's warm-start (tiny_base.py).

After the curriculum GRPO (train.py), the paper samples answers from the RL model, keeps only the good ones and
fine-tunes on them with a plain supervised loss and a tiny learning rate, to keep the model's general abilities.

    python reject_sample.py --model runs/tiny/checkpoints/step_000180 --data synthetic --out runs/phase2  # CPU
    python reject_sample.py --model tiny --data "pool.jsonl:random:2000" --bar 0 --out runs/p2   # a smoke test
    python reject_sample.py --model RL --data pool.jsonl --judge QWEN_VL --lr 2e-7 --device cuda --out OUT  # 1 GPU
    torchrun --nproc_per_node=8 reject_sample.py --model ... --data ... --out ...                 # N GPUs

The algorithm (`phase2` = `rejection_sample` -> `write_sft_file` -> `sft`):
1. pool: the prompts (image and text-only rows), each (image, problem) once.
2. sample: N answers per prompt, y_1..y_N ~ pi(. | x, I) at temperature tau (rollout.generate, group_size = N),
   one generator per prompt seeded by (seed, its pool index): independent of the batch and the process count.
3. score: s_j = accuracy(y_j) + format(y_j) (rewards.score, the RL stages' rule rewards), or with a judge model
   the 0-100 grade it writes greedily for y_j against the reference answer.
4. keep: j* = argmax_j s_j (ties: the first sampled); (x, y_j*) is kept if s_j* >= bar (default 2: accuracy 1
   and format 1), or with the judge s_j* >= 85. `per_prompt` k > 1 keeps the k best distinct passing answers.
5. write: one JSON per line in the Curr-ReFT SFT format (images of in-memory rows as PNGs in images/ beside the
   file, so data.load_rows reads it back), plus kept / total per task.
6. fine-tune: `epochs` passes over the kept rows, a fresh seeded order each epoch, global batches of `batch_size`:
       L = - sum_i sum_t m_it log pi(y_it | x_i, I_i, y_i<t) / sum_i sum_t m_it
   a token mean over the assistant tokens of the global batch (the target ends with <|im_end|>, so the model
   learns to stop; prompt and image are never in the loss).

Distributed (runtime.py's helpers): rank r samples pool[r::W]; the kept rows are gathered to every rank
(all_gather_object, when W > 1) in pool order; rank 0 writes the file; each rank trains on its slice of every
global batch, the token count all-reduced and the loss summed over micro-batches and ranks: W changes nothing.
Outputs in --out: sft.jsonl (+ images/), phase2_report.json (kept / total per task, SFT losses, the config),
model/ (the fine-tuned model; not written when nothing was kept).

Departures from the paper, and why:
- Default scorer: the rule rewards (accuracy 1, format 1), not a judge model: offline, deterministic, exact here.
- --judge: a local Qwen-VL checkpoint, the paper's threshold 85 (--judge-threshold); the judge prompt is ours.
- One answer per prompt (the best), duplicates dropped: the paper does not say; several over-weight easy prompts.
- A kept answer without a think block trains as `<think></think><answer>...</answer>`, as target_text does.
- Pool: the synthetic world's questions, every task in every form, stand in for the paper's domain mix on a CPU.
- lr 1e-4 by default (the paper's 2e-7 is for 3B; the tiny model does not move at it); AdamW (0.9, 0.95), clip
  1.0, constant: the release's SFT ran with ms-swift, whose other settings are not reproduced.
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

import curriculum
import data
from config import Phase2Config
import model as M
import rewards
from rollout import generate
from runtime import all_reduce_grads, all_reduce_sum, barrier, lr_factor, resolve_dtype, setup_dist, world_size


def target_text(row):
    """What the model should write for a row: the row's own completion when it has reasoning (an SFT file
    of sampled answers), else the reference completion of the synthetic world."""
    if "<think>" in row["solution"]:
        return row["solution"].strip()
    return data.reference_completion(row)


def sft_targets(processor, rows):
    """Right-padded target ids (n, T), each followed by <|im_end|>, and their mask (n, T)."""
    tok = processor.tokenizer
    ids = [tok(target_text(r), add_special_tokens=False)["input_ids"] + [processor.eos_token_id] for r in rows]
    T = max(len(x) for x in ids)
    out = torch.full((len(ids), T), processor.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T))
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return out, mask


def sft_loss(model, processor, rows, targets, num_tokens, device):
    """Summed negative log-likelihood of the rows' targets (sft_targets: assistant tokens only) / num_tokens."""
    batch = {k: v.to(device) for k, v in M.encode(processor, data.samples_of(rows)).items()}
    ids, mask = (t.to(device) for t in targets)
    logp = M.completion_logprobs(model, batch, ids, mask)          # (n, T)
    return -(torch.where(mask.bool(), logp, 0.0)).sum() / num_tokens


def sft(model, processor, next_rows, steps, lr=1e-3, warmup=20, schedule="constant", clip=1.0, weight_decay=0.0,
        micro_batch=None, rank=0, device="cpu", callback=None, desc="sft"):
    """Supervised fine-tuning on the rows `next_rows(step)` returns (a global batch; this rank trains on its
    slice). callback(step, loss) may return True to stop. Returns the number of steps taken."""
    W = world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=rank != 0, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 60)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, warmup, steps, schedule)
        rows = next_rows(step)
        local = rows[rank::W]  # may be empty when a batch has fewer rows than ranks
        mb = micro_batch or max(1, len(local))
        chunks = [(local[i:i + mb], sft_targets(processor, local[i:i + mb])) for i in range(0, len(local), mb)]
        num_tokens = all_reduce_sum(sum(mask.sum().item() for _, (_, mask) in chunks))  # global count
        loss_sum = 0.0
        for chunk, targets in chunks:
            loss = sft_loss(model, processor, chunk, targets, num_tokens, device) * W  # grads are averaged
            loss.backward()
            loss_sum += loss.item() / W
        all_reduce_grads(model)
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if torch.isfinite(norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum = all_reduce_sum(loss_sum)
        bar.set_postfix(loss=f"{loss_sum:.3f}", refresh=False)
        if callback is not None and callback(step, loss_sum):
            return step + 1
    return steps


# -----------------------------------------------------------------------------
# Phase 2: sample N answers per prompt, keep the best that passes, write an SFT file, fine-tune on it

class RuleScorer:
    """The RL stages' rule rewards: score = rewards.score(...)["total"] (accuracy + format); an answer passes
    when score >= bar. The default bar 2 means accuracy == 1 and format == 1; bar 0 passes every answer."""

    def __init__(self, bar=2.0, reward_options=None):
        self.bar, self.reward_options = bar, dict(reward_options or {})

    def __call__(self, row, answers):
        out = []
        for a in answers:
            s = rewards.score(a, row["solution"], row["task"], row.get("stage", "open"), **self.reward_options)
            out.append({"score": s["total"], "passed": s["total"] >= self.bar - 1e-9,
                        "accuracy": s["accuracy"], "format": s["format"]})
        return out

    def __str__(self):
        return f"rule rewards, accuracy + format >= {self.bar:g}"


JUDGE_PROMPT = ("Grade a candidate answer against the reference answer.\n"
                "Question: {question}\nReference answer: {reference}\nCandidate answer: {answer}\n"
                "How right is the candidate? Reply with one integer from 0 (wrong) to 100 (fully right).")
_JUDGE_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def parse_judge_score(text):
    """The first number a judge wrote (after its think block, if any) when it lies in [0, 100]; else 0.

    >>> parse_judge_score("90"), parse_judge_score("Score: 85/100"), parse_judge_score("I cannot tell")
    (90.0, 85.0, 0.0)
    >>> parse_judge_score("<think>3 of 4 right</think> 75"), parse_judge_score("850")
    (75.0, 0.0)
    """
    if not isinstance(text, str):
        return 0.0
    text = text[text.rfind("</think>") + len("</think>"):][:1000] if "</think>" in text else text[:1000]
    m = _JUDGE_NUMBER.search(text)
    if m is None:
        return 0.0
    value = float(m.group())
    return value if 0.0 <= value <= 100.0 else 0.0


class Judge:
    """A local Qwen-VL checkpoint as the judge: for each answer it is shown the image (when the row has one),
    the question, the reference and the answer, and asked for a 0-100 grade; the number is parsed from its
    greedy reply (0 when there is none). An answer passes at >= threshold (paper: 85)."""

    def __init__(self, model, processor, threshold=85.0, max_new_tokens=16, with_image=True):
        self.model, self.processor = model, processor
        self.threshold, self.max_new_tokens, self.with_image = threshold, max_new_tokens, with_image
        self.name = "judge"

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, max_pixels=None, **kw):
        judge = cls(*M.load(path, device=device, dtype=dtype, max_pixels=max_pixels), **kw)
        judge.name = f"judge {path}"
        return judge

    def prompt(self, row, answer):
        for token in M.VISION_TOKENS:  # only the processor may place vision tokens in a prompt
            answer = answer.replace(token, "")
        return JUDGE_PROMPT.format(question=row["problem"], reference=rewards.solution_text(row["solution"]),
                                   answer=answer.strip())

    @torch.no_grad()
    def __call__(self, row, answers):
        image = data.open_image(row) if self.with_image and row.get("image") is not None else None
        samples = [{"image": image, "problem": self.prompt(row, a)} for a in answers]
        was_training = self.model.training
        self.model.eval()
        replies = generate(self.model, self.processor, samples, max_new_tokens=self.max_new_tokens, greedy=True).texts
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


def unique_prompts(rows):
    """The rows with each prompt (image, problem) once, first occurrence kept; and how many were dropped."""
    seen, out = set(), []
    for row in rows:
        key = (image_key(row.get("image")), row["problem"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out, len(rows) - len(out)


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


def kept_row(row, index, answer, verdict):
    """An SFT row from a pool row and a kept answer: what write_sft_file stores and load_rows gives back."""
    text = clean_answer(answer)
    return {"image": row.get("image"), "problem": row["problem"], "solution": data.normalize_solution(text),
            "task": row["task"], "stage": row.get("stage", "open"), "answer": text,
            "score": float(verdict["score"]), "index": index}


@torch.no_grad()
def rejection_sample(model, processor, rows, n_samples=4, bar=2.0, scorer=None, per_prompt=1, batch_size=8,
                     max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, seed=0, rank=0, world=None):
    """Steps 1-4 of the top docstring on `rows`: returns (kept rows, report). Every rank gets the same kept
    rows, ordered by pool index. scorer(row, answers) -> [{"score", "passed", ...}] per answer; default
    RuleScorer(bar). world: number of shards (None: the torchrun world size); rank r samples pool[r::world]."""
    scorer = scorer if scorer is not None else RuleScorer(bar)
    W = world_size() if world is None else world
    t0 = time.time()
    pool, pool_duplicates = unique_prompts(rows)
    local = list(enumerate(pool))[rank::W]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kept, stats = [], Counter()
    chunks = range(0, len(local), batch_size)
    for start in tqdm(chunks, desc="rejection sampling", disable=rank != 0, dynamic_ncols=True,
                      mininterval=1 if sys.stderr.isatty() else 60):
        chunk = local[start:start + batch_size]
        gens = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i, _ in chunk]
        ro = generate(model, processor, data.samples_of([row for _, row in chunk]), group_size=n_samples,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      generator=gens)
        for b, (i, row) in enumerate(chunk):
            answers = ro.texts[b * n_samples:(b + 1) * n_samples]               # the group of prompt b
            verdicts = scorer(row, answers)
            chosen, repeats = select(answers, verdicts, per_prompt)
            kept += [kept_row(row, i, answers[j], verdicts[j]) for j in chosen]
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


P2 = Phase2Config()  # one set of phase-2 defaults, for train.py and this command line


def phase2(model, processor, pool_rows, out_dir, n_samples=P2.phase2_samples, lr=P2.phase2_lr,
           epochs=P2.phase2_epochs, batch_size=P2.phase2_batch, bar=P2.phase2_bar,
           scorer=None, per_prompt=1, sample_batch=8, max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0,
           warmup=0, schedule="constant", clip=1.0, weight_decay=0.0, micro_batch=None, seed=0, rank=0,
           device=None):
    """Rejection sampling, the SFT file (out_dir/sft.jsonl), then `epochs` passes of `sft` over the kept rows
    (global batches of batch_size). Fine-tunes `model` in place; writes out_dir/phase2_report.json and
    returns the report. With nothing kept the SFT is skipped and the model is left unchanged."""
    device = device or next(model.parameters()).device
    was_training = model.training
    kept, report = rejection_sample(model, processor, pool_rows, n_samples=n_samples, bar=bar, scorer=scorer,
                                    per_prompt=per_prompt, batch_size=sample_batch, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, rank=rank)
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

        sft(model, processor, next_rows, steps, lr=lr, warmup=warmup, schedule=schedule, clip=clip,
            weight_decay=weight_decay, micro_batch=micro_batch, rank=rank, device=device, callback=callback,
            desc="phase 2 sft")
        model.train(was_training)
    report["sft"] = {"skipped": steps == 0, "rows": len(kept), "steps": steps, "epochs": epochs,
                     "batch_size": batch_size, "lr": lr, "warmup": warmup, "schedule": schedule,
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                     "losses": losses}
    if rank == 0:
        with open(os.path.join(out_dir, "phase2_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


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


def load_pool(spec, pool_size=300, seed=0, image_size=112, image_root=None, default_task=None):
    """The prompt pool: 'synthetic' (pool_size synthetic train scenes, as phase2_prompts asks them) or a mixture
    spec of Curr-ReFT files (data.load_mixture; a problem without the instruction line gets its stage's)."""
    if spec == "synthetic":
        return phase2_prompts(data.make_split("train", pool_size, seed=seed, size=image_size), seed)
    rows = data.load_mixture(spec, seed=seed, image_root=image_root, default_task=default_task)
    return [curriculum.prepare_stage_rows([r], r.get("stage") or "open")[0] for r in rows]


def build_parser():
    p = argparse.ArgumentParser(description="Phase 2 of Curr-ReFT: rejection-sampling SFT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (required)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool, the sampling and the SFT order")
    p.add_argument("--lr", type=float, default=P2.phase2_lr, help="AdamW learning rate (the paper used 2e-7 for 3B)")
    g = p.add_argument_group("phase 2")
    g.add_argument("--model", default=None, help="the checkpoint to start from (a Qwen-VL folder, e.g. the open "
                                                 "stage's last checkpoint), or a preset: tiny, small (random)")
    g.add_argument("--data", default="synthetic", help="prompt pool: a mixture spec of Curr-ReFT files "
                                                       "('a.jsonl,b.jsonl:random:500', see data.py) or 'synthetic'")
    g.add_argument("--pool-size", type=int, default=P2.phase2_prompts, help="synthetic pool: scenes (one question each)")
    g.add_argument("--image-size", type=int, default=112, help="synthetic image side in pixels (multiple of 28)")
    g.add_argument("--image-root", default=None, help="folder that relative image paths in --data start from")
    g.add_argument("--default-task", default=None, choices=data.TASKS, help="task of rows that name none")
    g.add_argument("--n-samples", type=int, default=P2.phase2_samples, help="answers sampled per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    g.add_argument("--sample-batch", type=int, default=8, help="prompts per generation batch (memory only)")
    g.add_argument("--bar", type=float, default=P2.phase2_bar, help="rule scorer: keep an answer when accuracy + format >= "
                                                          "bar (2: both 1; 0: keep every prompt's best)")
    g.add_argument("--judge", default=None, help="score with this local Qwen-VL checkpoint (0-100) instead of "
                                                 "the rule rewards")
    g.add_argument("--judge-threshold", type=float, default=85.0, help="judge: keep an answer scored >= this")
    g.add_argument("--per-prompt", type=int, default=1, help="distinct passing answers kept per prompt, best first")
    g.add_argument("--epochs", type=int, default=P2.phase2_epochs, help="SFT passes over the kept rows")
    g.add_argument("--batch-size", type=int, default=P2.phase2_batch, help="SFT rows per optimizer step, over all ranks")
    g.add_argument("--micro-batch", type=int, default=None, help="SFT rows per forward/backward on one rank")
    g.add_argument("--warmup", type=int, default=0, help="SFT warm-up steps")
    g.add_argument("--schedule", default="constant", choices=("constant", "linear", "cosine"), help="SFT lr decay")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on GPU, float32 on CPU")
    g.add_argument("--max-pixels", type=int, default=401_408, help="images are resized to at most this many pixels")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def check_phase2_args(args):
    """One clear line for a bad flag, a missing model folder or a missing data file, before any work."""
    checks = [
        (args.out is not None, "--out: give the output folder"),
        (args.model is not None, "--model: give the checkpoint folder to start from (or 'tiny')"),
        (args.n_samples >= 1 and args.per_prompt >= 1, "--n-samples and --per-prompt must be >= 1"),
        (args.epochs >= 1 and args.batch_size >= 1 and args.sample_batch >= 1, "--epochs, --batch-size and "
                                                                                "--sample-batch must be >= 1"),
        (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0, "need temperature > 0, 0 < top-p <= 1"),
        (args.max_new_tokens >= 1 and args.pool_size >= 1, "--max-new-tokens and --pool-size must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    for flag, path in (("--model", args.model), ("--judge", args.judge)):
        if path is not None and path not in M.PRESETS and not os.path.isdir(path):
            raise SystemExit(f"error: {flag} {path!r}: no such folder (give a Qwen2.5-VL / Qwen2-VL checkpoint "
                             f"folder{', or tiny' if flag == '--model' else ''})")
    if args.data != "synthetic":
        try:
            for item in data.parse_mixture(args.data):
                if not os.path.isfile(item.path):
                    raise data.DataError(f"data file not found: {item.path}")
        except data.DataError as e:
            raise SystemExit(f"error: --data {args.data!r}: {e}")


def run_phase2(args):
    """`python reject_sample.py --model DIR --data SPEC|synthetic --out DIR`: phase 2 alone, then model.save."""
    check_phase2_args(args)
    rank, _, W, device = setup_dist(None if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)
    config = {**vars(args), "world_size": W, "device": str(device)}
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps(config, indent=1), flush=True)
    try:
        pool = load_pool(args.data, args.pool_size, args.seed, args.image_size, args.image_root,
                         args.default_task)
        model, processor = M.load(args.model, device=device, dtype=dtype, max_pixels=args.max_pixels, seed=args.seed)
        scorer = RuleScorer(args.bar)
        if args.judge:
            scorer = Judge.load(args.judge, device=device, dtype=dtype, max_pixels=args.max_pixels,
                                threshold=args.judge_threshold)
    except (data.DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(args.seed)
    report = phase2(model, processor, pool, args.out, n_samples=args.n_samples, lr=args.lr, epochs=args.epochs,
                    batch_size=args.batch_size, scorer=scorer, per_prompt=args.per_prompt,
                    sample_batch=args.sample_batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, warmup=args.warmup, schedule=args.schedule, clip=args.clip,
                    weight_decay=args.weight_decay, micro_batch=args.micro_batch, seed=args.seed, rank=rank,
                    device=device)
    if rank == 0:
        report["config"] = config
        with open(os.path.join(args.out, "phase2_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if report["sft"]["skipped"]:
            print(f"phase 2: nothing kept, no model written; report in {args.out}/phase2_report.json", flush=True)
        else:
            M.save(model, processor, os.path.join(args.out, "model"))
            print(f"phase 2: fine-tuned model written to {os.path.join(args.out, 'model')}", flush=True)
    barrier()
    return report


def main(argv=None):
    run_phase2(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
