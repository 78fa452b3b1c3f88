"""
reject_sample.py (in progress): the supervised loop (SFT) and the tiny base's warm-start.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

import curriculum
import data
import model as M
from train import all_reduce_grads, all_reduce_sum, setup_dist, world_size


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


def sft_loss(model, processor, rows, num_tokens, device):
    """Summed negative log-likelihood of the rows' targets (assistant tokens only) / num_tokens."""
    from eval import samples_of
    batch = {k: v.to(device) for k, v in M.encode(processor, samples_of(rows)).items()}
    ids, mask = sft_targets(processor, rows)
    ids, mask = ids.to(device), mask.to(device)
    logp = M.completion_logprobs(model, batch, ids, mask)          # (n, T)
    return -(torch.where(mask.bool(), logp, 0.0)).sum() / num_tokens


def lr_factor(step, warmup, total, schedule="constant", floor=0.1):
    """Multiplier of the base learning rate: linear warm-up, then constant, linear or cosine decay to floor."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
        local = rows[rank::W]
        num_tokens = all_reduce_sum(sft_targets(processor, local)[1].sum().item())  # global count
        mb = micro_batch or len(local)
        loss_sum = 0.0
        for i in range(0, len(local), mb):
            loss = sft_loss(model, processor, local[i:i + mb], num_tokens, device) * W  # grads are averaged
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
# The tiny base: a supervised warm-start on the synthetic world, playing the part of the instruct model

def base_rows(step, batch_size, phase, seed):
    """The warm-start's global batch at `step`: fresh synthetic scenes every step (the world is unlimited).
    phase "open": open classification and counting only (how the tiny model first learns to use the image;
    box digits would dominate the loss, ../shared/TINY_WORLD.md). phase "all": every task in every form,
    equal weight."""
    tasks = ("classify", "math") if phase == "open" else data.TASKS
    rows = data.make_rows("train", batch_size, seed=1_000_003 * seed + step, tasks=tasks)
    rng = random.Random(f"base:{seed}:{step}")
    out = []
    for i, row in enumerate(rows):
        stage = "open" if phase == "open" else curriculum.STAGES[(i // len(tasks) + step) % 3]
        out.append(curriculum.make_stage_row(row, stage, rng))
    return out


BASE_RULE = {  # (task, stage) -> accuracy the quick evaluation must reach; chance in brackets
    ("classify", "judge"): 0.7, ("math", "judge"): 0.7, ("detection", "judge"): 0.65,        # (0.5)
    ("classify", "choice"): 0.45, ("math", "choice"): 0.5, ("detection", "choice"): 0.45,    # (<= 0.25)
    ("classify", "open"): 0.5, ("math", "open"): 0.4,                                        # (~0.2 / ~0.25)
}
BREAKOUT = {("classify", "open"): 0.7, ("math", "open"): 0.7}  # the image is in use


def build_base(out, seed=0, batch_size=32, lr=1e-3, eval_every=250, eval_n=48, max_minutes=60.0,
               max_new_tokens=48, preset="tiny"):
    """Warm-start a randomly initialised tiny model until the stop rule over a quick held-out evaluation holds:
    phase "open" until BREAKOUT, then phase "all" until every BASE_RULE cell passes (or max_minutes).
    Writes the model, the processor and base_card.json (recipe, time, per-form accuracy) to `out`."""
    rank, _, _, device = setup_dist("cpu")
    torch.manual_seed(seed)
    model, processor = M.load(preset, seed=seed)
    model.to(device)
    test = data.make_split("test", eval_n, seed=seed)
    eval_rows = [r for stage in curriculum.STAGES for r in curriculum.stage_rows(test, stage, seed=seed)]
    from eval import evaluate
    state = {"phase": "open", "t0": time.time(), "history": [], "steps_open": None}

    def next_rows(step):
        return base_rows(step, batch_size, state["phase"], seed)

    def passes(acc, rule):
        return all(acc.get(cell, {}).get("accuracy", 0.0) >= need for cell, need in rule.items())

    def callback(step, loss):
        minutes = (time.time() - state["t0"]) / 60
        if (step + 1) % eval_every and minutes < max_minutes:
            return False
        acc = evaluate(model, processor, eval_rows, max_new_tokens=max_new_tokens)
        state["history"].append({"step": step + 1, "minutes": round(minutes, 2), "phase": state["phase"],
                                 "loss": round(loss, 4),
                                 "accuracy": {f"{t}/{s}": round(v["accuracy"], 3) for (t, s), v in sorted(acc.items())}})
        if rank == 0:
            print(json.dumps(state["history"][-1]), flush=True)
        if state["phase"] == "open" and passes(acc, BREAKOUT):
            state["phase"], state["steps_open"] = "all", step + 1
        elif state["phase"] == "all" and passes(acc, BASE_RULE):
            return True
        return minutes >= max_minutes

    steps = sft(model, processor, next_rows, steps=10**9, lr=lr, warmup=20, rank=rank, device=device,
                callback=callback, desc="warm-start")
    if rank == 0:
        M.save(model, processor, out)
        card = {"recipe": dict(preset=preset, seed=seed, batch_size=batch_size, lr=lr, warmup=20, clip=1.0,
                               optimizer="AdamW(0.9, 0.95)", eval_every=eval_every, eval_n_per_cell=eval_n,
                               breakout_rule={f"{t}/{s}": v for (t, s), v in BREAKOUT.items()},
                               stop_rule={f"{t}/{s}": v for (t, s), v in BASE_RULE.items()}),
                "steps": steps, "steps_open_phase": state["steps_open"],
                "minutes": round((time.time() - state["t0"]) / 60, 2),
                "passed": state["history"][-1]["accuracy"], "history": state["history"],
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(os.path.join(out, "base_card.json"), "w") as f:
            json.dump(card, f, indent=1)
        print(f"base written to {out} after {steps} steps, {card['minutes']} min")
    return model, processor


def main():
    p = argparse.ArgumentParser(description="Phase 2 (rejection-sampling SFT) and the tiny base's warm-start.")
    p.add_argument("--warm-start", action="store_true", help="build the tiny base model (a supervised warm-start)")
    p.add_argument("--out", default="assets/tiny-base", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=60.0, help="warm-start time limit")
    p.add_argument("--eval-every", type=int, default=250, help="warm-start: steps between quick evaluations")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    if args.warm_start:
        build_base(args.out, seed=args.seed, max_minutes=args.max_minutes, eval_every=args.eval_every, lr=args.lr)


if __name__ == "__main__":
    main()
