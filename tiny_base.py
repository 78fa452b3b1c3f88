"""
tiny_base.py: the tiny base model, a supervised warm-start on the synthetic world that stands in for the instruct
model (Qwen2.5-VL-3B-Instruct in the paper). It built the shipped assets/tiny-base; train.py calls it only when
that folder is missing.

    python tiny_base.py --out DIR                # from scratch (default assets/tiny-base; about 32 min on a CPU)
    python tiny_base.py --init DIR --out NEW     # phase 3 alone, continuing a base built by phases 1-2

A random tiny Qwen2.5-VL is trained with reject_sample.sft on fresh synthetic scenes every step, in three phases,
each ended by a rule over a quick held-out evaluation (or by --max-minutes over all):
1. "open": open classification and counting on the base's world (2-3-cell shapes, the first six question kinds:
   data.BASE_*) until BREAKOUT holds: the tiny model first has to start using the image;
2. "all": every task in every form, equal weight, on the base's world until every BASE_RULE cell passes;
3. "full": the same on the full world (one-cell shapes, geometry questions) until every FULL_RULE cell passes,
   which leaves those skills half-learned: the RL stages' headroom (data.py says why). It is a second `sft` run
   (a fresh optimizer), so `--init DIR` (its base_card.json history kept) does what a build from scratch does.
The recipe, the rules and the evaluation history are written to base_card.json beside the weights.
"""
import argparse
import json
import os
import random
import time

import torch

import curriculum
import data
import eval as E
import model as M
from reject_sample import sft
from runtime import all_reduce_sum, save_atomically, setup_dist, world_size

def base_world(phase):
    """make_rows overrides of a phase: the base's world for "open" and "all", none (the full world) for "full"."""
    return {} if phase == "full" else dict(cells=data.BASE_CELLS, kinds=data.BASE_KINDS)

def base_rows(step, batch_size, phase, seed):
    """The global batch at `step`, fresh scenes of base_world(phase): "open" asks open classification and counting
    only (box digits would dominate the loss), the other phases every task in every form, in equal shares."""
    tasks = ("classify", "math") if phase == "open" else data.TASKS
    rows = data.make_rows("train", batch_size, seed=1_000_003 * seed + step, tasks=tasks, **base_world(phase))
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
# On the full world, 32 rows per cell; a box's chance is ~0.01. Multi-select classification (1-3 right letters of 4,
# exact set) is left out: it stays near chance, and waiting for it only erases the full world's headroom.
FULL_RULE = {**{k: v for k, v in BASE_RULE.items() if k != ("classify", "choice")}, ("detection", "open"): 0.25}

def build_base(out, seed=0, batch_size=32, lr=1e-3, eval_every=250, eval_n=48, max_minutes=60.0,
               max_new_tokens=48, preset="tiny", init=None, full_eval_every=125, full_eval_n=96,
               full_max_new_tokens=64):
    """The warm-start of the top docstring (init=DIR: phase "full" alone, continuing that base and its
    base_card.json history). Writes the model, the processor and base_card.json to `out`."""
    rank, _, _, device = setup_dist("cpu")
    torch.manual_seed(seed)
    model, processor = M.load(init) if init else M.load(preset, seed=seed)
    model.to(device)
    card = {"history": [], "steps": 0, "minutes": 0.0, "steps_open_phase": None}  # of the earlier runs
    if init:
        with open(os.path.join(init, "base_card.json")) as f:
            card = json.load(f)
    history, minutes_before, steps_open = card["history"], card["minutes"], card["steps_open_phase"]
    for h in history:
        h.setdefault("phase", "all")

    def eval_rows(phase):
        test = data.make_rows("test", full_eval_n if phase == "full" else eval_n, seed=seed, **base_world(phase))
        return [r for stage in curriculum.STAGES for r in curriculum.stage_rows(test, stage, seed=seed)]

    phase, t0 = "full" if init else "open", time.time()
    steps_all = card["steps"] if init else None
    offset = card["steps"]  # steps of the earlier sft runs
    test_rows = eval_rows(phase)

    def next_rows(step):
        return base_rows(offset + step, batch_size, phase, seed)

    def passes(acc, rule):
        return all(acc.get(cell, {}).get("accuracy", 0.0) >= need for cell, need in rule.items())

    def callback(step, loss):
        nonlocal phase, steps_open, steps_all
        # the ranks' mean clock: under torchrun every rank must stop at the same step (its collectives)
        minutes = minutes_before + all_reduce_sum((time.time() - t0) / 60) / world_size()
        if (step + 1) % (full_eval_every if phase == "full" else eval_every) and minutes < max_minutes:
            return False
        acc = E.evaluate(model, processor, test_rows,
                         max_new_tokens=full_max_new_tokens if phase == "full" else max_new_tokens)
        history.append({"step": offset + step + 1, "minutes": round(minutes, 2), "phase": phase,
                        "loss": round(loss, 4),
                        "accuracy": {f"{t}/{s}": round(v["accuracy"], 3) for (t, s), v in sorted(acc.items())}})
        if rank == 0:
            print(json.dumps(history[-1]), flush=True)
            save_atomically(out + ".snapshot", lambda tmp: M.save(model, processor, tmp))  # nothing lost on a kill
        if minutes >= max_minutes:
            return True
        if phase == "open" and passes(acc, BREAKOUT):
            phase, steps_open = "all", offset + step + 1
        elif phase == "all" and passes(acc, BASE_RULE):
            steps_all = offset + step + 1
            return True  # phase "full" starts a fresh optimizer, as a run from --init does
        elif phase == "full" and passes(acc, FULL_RULE):
            return True
        return False

    if not init:  # phases "open" and "all": one sft run (the optimizer state carries across the break-out)
        offset += sft(model, processor, next_rows, steps=10**9, lr=lr, warmup=20, rank=rank, device=device,
                      callback=callback, desc="warm-start")
        phase, test_rows = "full", eval_rows("full")
    if steps_all is not None:  # phase "full" (skipped when the time ran out before it)
        offset += sft(model, processor, next_rows, steps=10**9, lr=lr, warmup=20, rank=rank, device=device,
                      callback=callback, desc="warm-start (full world)")
    if rank == 0:
        kinds = sorted(k for v in data.BASE_KINDS.values() for k in v)
        rules = {key: {f"{t}/{s}": v for (t, s), v in rule.items()}
                 for key, rule in (("breakout_rule", BREAKOUT), ("stop_rule", BASE_RULE), ("full_rule", FULL_RULE))}
        card = {"recipe": dict(preset=preset, seed=seed, batch_size=batch_size, lr=lr, warmup=20, clip=1.0,
                               optimizer="AdamW(0.9, 0.95)", max_new_tokens=max_new_tokens,
                               full_max_new_tokens=full_max_new_tokens,
                               phases=f"open -> all (base world: cells {list(data.BASE_CELLS)}, kinds {kinds}) "
                                      f"-> full (the full world)",
                               eval_every=eval_every, eval_rows_per_cell=eval_n // len(data.TASKS),
                               full_eval_every=full_eval_every, full_eval_rows_per_cell=full_eval_n // len(data.TASKS),
                               **rules, init=init),
                "steps": offset, "steps_open_phase": steps_open, "steps_all_phase": steps_all,
                "minutes": round(minutes_before + (time.time() - t0) / 60, 2),
                "passed": history[-1]["accuracy"], "history": history,
                "torch": torch.__version__, "threads": torch.get_num_threads()}

        def write(folder):  # the weights, processor and card in one folder, which then replaces `out`
            M.save(model, processor, folder)
            with open(os.path.join(folder, "base_card.json"), "w") as f:
                json.dump(card, f, indent=1)
        save_atomically(out, write)  # train.py takes any `out` folder for a built base
        print(f"base written to {out} after {offset} steps, {card['minutes']} min")
    return model, processor

def main(argv=None):
    p = argparse.ArgumentParser(description="Build the tiny base: a supervised warm-start on the synthetic world.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="assets/tiny-base", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the scenes")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--max-minutes", type=float, default=60.0, help="time limit over all phases")
    p.add_argument("--eval-every", type=int, default=250, help="steps between quick evaluations (phases 1-2)")
    p.add_argument("--init", default=None, help="continue this base (built by the phases open and all, with its "
                                                "base_card.json) with the phase full only")
    build_base(**vars(p.parse_args(argv)))

if __name__ == "__main__":
    main()
