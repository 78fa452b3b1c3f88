"""
train.py: Curr-ReFT in one command: curriculum GRPO (judge -> choice -> open), rejection-sampling SFT, evaluation.

    python train.py                                    # tiny preset: shipped tiny base, synthetic world, CPU
    python train.py --resume                           # continue the run in --out from its latest checkpoint
                                                       # (its flags; config.RESUME_MAY_CHANGE names those
                                                       # that may change)
    python train.py --preset qwen2.5-vl-3b --model /ckpt/Qwen2.5-VL-3B-Instruct --stage-data \\
        "judge=judge.jsonl;choice=choice.jsonl;open=open.jsonl" --eval-data "test=test.jsonl;ood=ood.jsonl"
    torchrun --nproc_per_node=8 train.py --preset qwen2.5-vl-3b ...   # manual DDP, one process per GPU

config -> setup -> policy + frozen reference -> for each stage -> for each step (grpo_step):
    1. rollout   G answers per prompt, sampled with the policy (rollout.generate, KV cache, no grad)
    2. reward    r = accuracy + format of each answer, in the stage's answer form (rewards.score)
    3. advantage A = (r - group mean) / (unbiased group std + 1e-4)        (grpo.group_advantages)
    4. update    mu passes of  -min(ratio A, clip(ratio) A) + beta KL_k3(pi || ref)   (grpo.grpo_loss), AdamW
    5. log (metrics.jsonl, samples.jsonl), checkpoint (out/checkpoints/step_XXXXXX; `latest` names the newest)
then phase 2 (reject_sample.phase2) and the table. A stage starts from the previous one's weights (saved as
out/stages/<k>_<name>_start) with a fresh optimizer and schedule; its reference is those weights or --ref base.
Distributed: rank r takes P/W prompts with all their G answers, from per-prompt generators seeded by (seed, step,
global index), so 1 and N processes give the same rollouts; gradients are averaged, counts and statistics global.
--shard optimizer splits the optimizer state over the ranks (optim.ShardedAdamW), --shard fsdp the weights too.

Departures from the paper's release, and why:
- One command runs the curriculum and resumes; the release chains three jobs by hand and saves weights only.
- qwen2.5-vl-3b preset: lr 1e-6 with linear decay and no warm-up, as the release's scripts (TRL's default).
- The ratio clip is kept so that mu > 1 passes per rollout are possible; with mu = 1 (the release) it is inert.
- The G answers of a prompt share its image features: the vision tower runs once per prompt, not per answer.
- Choice reward: a proper subset of the right letters earns 0.2 in the tiny preset (the release and the
  qwen2.5-vl-3b preset pay the exact set only): else a tiny base's multi-select groups all score 0. Eval: exact.
- tiny preset: own 0.4 M-parameter base, G = 8, 32 prompts/step, 100/100/200 steps, lr 3e-4: minutes on 2 CPU cores.
"""
import copy
import json
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import curriculum
import data
import eval as E
import fsdp
import grpo
import model as M
import optim
import reject_sample as R
import rewards
import rollout
import tiny_base
from config import ModelConfig, as_dict, check_resume, make_config, replay_ratios, reward_options, validate
from report import plot_rewards, stage_summary
from runtime import (all_reduce_sum, barrier, lr_factor, resolve_dtype, save_atomically,
                     setup_dist, world_size, write_atomic)

# ---- Checkpoints: atomic, complete, resumable
def save_checkpoint(out, step, policy, processor, state, keep, rank, dtype, shard=None):
    """Rank 0 writes checkpoints/step_XXXXXX (via a temporary folder + rename) and points `latest` at it; with a
    sharded optimizer every rank first writes its `shard` (on a file system that all nodes share)."""
    W, whole = world_size(), not fsdp.is_sharded(policy)  # under FSDP each rank holds other weights
    total = sum(fsdp.local(p).detach().double().sum().item() for p in policy.parameters())  # the weights' checksum
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    sums, all_rng = [total] * W, [rng] * W
    if W > 1:
        dist.all_gather_object(sums, total)
        if whole and max(sums) - min(sums) > 1e-6 * max(1.0, abs(total)):
            raise RuntimeError(f"ranks disagree on the weights at step {step} (checksums {sums}): "
                               "gradients were not synchronised")
        dist.all_gather_object(all_rng, rng)
    root = os.path.join(out, "checkpoints")
    final, shards = os.path.join(root, f"step_{step:06d}"), os.path.join(root, f"step_{step:06d}.shards")
    if shard is not None:
        os.makedirs(shards, exist_ok=True)
        torch.save(shard, os.path.join(shards, f"rank{rank}.pt"))
        barrier()
    weights = fsdp.full_state_dict(policy, dtype) if not whole else None  # gathered by every rank
    if rank == 0:
        def write(tmp):
            fsdp.write(policy, processor, tmp, weights, dtype)
            torch.save({**state, "rng": all_rng, "checksum": total}, os.path.join(tmp, "trainer_state.pt"))
            if shard is not None:
                os.rename(shards, os.path.join(tmp, "optimizer"))
        save_atomically(final, write)
        write_atomic(os.path.join(root, "latest"), os.path.basename(final))
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith((".tmp", ".shards")))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()

def missing(folder):
    """Whether `folder` does not exist yet, as every rank sees it before any rank writes it (fsdp.save is collective)."""
    gone = not os.path.isdir(folder)
    barrier()
    return gone

def latest_checkpoint(out):
    """The newest complete checkpoint's folder, or None."""
    path = os.path.join(out, "checkpoints", "latest")
    if os.path.isfile(path):
        with open(path) as f:
            name = f.read().strip()
        ckpt = os.path.join(out, "checkpoints", name)
        if not os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
            others = sorted(f for f in os.listdir(os.path.dirname(path)) if f.startswith("step_")
                            and os.path.isfile(os.path.join(os.path.dirname(path), f, "trainer_state.pt")))
            raise SystemExit(f"error: {path} names {name!r}, which is gone or incomplete: write the name of one that "
                             f"is there ({', '.join(others) or 'none is'}) into it, or give another --out")
        return ckpt

def read_json(path):
    """The JSON in `path`, or None where there is no such file."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)

def holds_run(out):
    """Whether `out` holds a run: a checkpoint, or the log and stage folders of one killed before its first."""
    left = (os.path.join(out, name) for name in ("metrics.jsonl", "stages"))
    return bool(latest_checkpoint(out)) or any(map(os.path.exists, left))

def trainer_state(ckpt):
    """A checkpoint's trainer state, memory-mapped on the CPU: ranks share the pages, and nothing lands on the device
    rank 0 saved from."""
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", mmap=True, weights_only=False)

def resume(ckpt, out, cur, policy, rank, device, dtype, shard="none"):
    """Load a checkpoint into the schedule, the policy and this rank's RNG; returns this rank's optimizer state (the
    masters, without moments at a stage boundary). Rank 0 drops the log lines of steps taken after the checkpoint."""
    state = trainer_state(ckpt)
    saved, W = state.get("shard", ["none", 1]), world_size()
    if saved[0] != shard or (shard != "none" and saved[1] != W):
        raise SystemExit(f"error: {ckpt} was saved with --shard {saved[0]} on {saved[1]} processes; resume it with "
                         f"the same (this run: --shard {shard} on {W})")
    if shard != "none":
        state["optimizer"] = torch.load(os.path.join(ckpt, "optimizer", f"rank{rank}.pt"), map_location="cpu",
                                        mmap=True, weights_only=False)
    try:
        cur.load_state_dict(state["curriculum"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    loaded, _ = M.load(ckpt, device=device, dtype=dtype)
    if fsdp.is_sharded(policy):
        fsdp.load_full_state_dict(policy, loaded.state_dict())  # each rank cuts its own shards
    else:
        policy.load_state_dict(loaded.state_dict())
    del loaded
    rng = state["rng"][min(rank, len(state["rng"]) - 1)]  # this rank's own generators
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    for name in ("metrics.jsonl", "samples.jsonl"):  # a step logged after the checkpoint is redone: log it once
        log = os.path.join(out, name)
        if rank == 0 and os.path.isfile(log):
            with open(log) as f:
                lines = [line for line in f if json.loads(line)["global_step"] <= cur.global_step]
            write_atomic(log, "".join(lines))
    if rank == 0:
        where = f"stage {cur.stages[cur.stage_index].name}, step {cur.step}" if not cur.done else "after the last stage"
        print(f"resumed from {ckpt}: {where}", flush=True)
    return state["optimizer"]

# ---- One GRPO step
def grpo_step(policy, ref, processor, rows, stage, G, cfg, opt, rank, device, global_step):
    """One GRPO step on this rank's share of `rows`: (stats, global means equal on every rank; a few samples)."""
    rl, W, t0 = cfg.rl, world_size(), time.time()
    P = len(rows) // W
    local = rows[rank * P:(rank + 1) * P]                                    # this rank's P prompts

    # 1. Rollout: G answers per prompt from the current policy, each prompt from its own seeded generator.
    gens = rollout.prompt_generators(cfg.run.seed, global_step, rank * P, P, device)
    with fsdp.gathered(policy):  # FSDP: the whole model gathered once, not at every decoded token
        ro = rollout.generate(policy.eval(), processor, data.samples_of(local), group_size=G, generator=gens,
                              max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                              cuda_graphs=cfg.model.cuda_graphs)                              # N = P * G answers
    t_gen = time.time() - t0

    # 2. Reward, each answer in its row's form (a replayed open question, curriculum.StageSpec.replay, by open rules;
    #    a mixed stage's rows each in their own).
    row_of = [local[n // G] for n in range(len(ro.texts))]                  # (N,) the row of each answer
    scores = [rewards.score(text, row["solution"], row["task"], row.get("stage", stage), **reward_options(rl))
              for text, row in zip(ro.texts, row_of)]
    r = torch.tensor([s["total"] for s in scores], dtype=torch.float32)     # (N,)

    # 3. Advantage, relative to the group.
    adv = grpo.group_advantages(r, G).to(device)                          # (N,)

    # 4. Update: mu passes over micro-batches of whole groups, losses divided by global counts, gradients
    #    averaged over ranks, clipped, one optimizer step per pass (skipped when not finite).
    chunks = micro_batches(policy, ref, processor, local, ro, adv, G, rl, device)
    num_seqs = all_reduce_sum(float(len(ro.texts)))
    num_tokens = all_reduce_sum(float(ro.mask.sum()))
    t_ref = time.time() - t0 - t_gen
    policy.train()
    sums = dict.fromkeys(("loss", "kl", "clip_low", "clip_high"), 0.0)   # this rank's, over the passes
    grad_norm, skipped = 0.0, 0                     # the global norm: the same on every rank
    for _ in range(rl.mu):
        for batch, ids, mask, a, ref_logp, old_logp in chunks:
            logp = M.completion_logprobs(policy, batch, ids, mask)                                  # (n, T)
            loss, st = grpo.grpo_loss(logp, logp.detach() if old_logp is None else old_logp, ref_logp, a, mask,
                                      clip_eps=rl.clip_eps, beta=rl.beta, agg=rl.agg, num_seqs=num_seqs,
                                      num_tokens=num_tokens, max_len=rl.max_new_tokens)
            (loss * W).backward()                                  # gradients are averaged over ranks below
            sums["loss"] += st["loss"] / rl.mu
            for k in ("kl", "clip_low", "clip_high"):              # token means of the whole batch
                sums[k] += st[k] * float(mask.sum()) / num_tokens / rl.mu
        norm = opt.step(rl.grad_clip)               # all-reduce, clip, AdamW on the fp32 masters (optim.py)
        skipped += 0 if torch.isfinite(norm) else 1
        grad_norm += float(norm) / rl.mu

    # 5. Statistics: sums over ranks by name, then means; replayed open questions apart (replay_accuracy).
    own = [s for s, row in zip(scores, row_of) if not row.get("replay")]
    sums = reduce_by_key({**sums, **{f"reward_{k}": sum(s[k] for s in own) for k in ("total", "accuracy", "format")},
                          "own": float(len(own)), "zero_var_groups": grpo.zero_variance_fraction(r, G) * P,
                          "replay_right": sum(s["accuracy"] for s, row in zip(scores, row_of) if row.get("replay"))})
    stats = {k: sums[k] / max(sums["own"], 1) for k in ("reward_total", "reward_accuracy", "reward_format")}
    stats.update(length=num_tokens / num_seqs, **{k: sums[k] for k in ("loss", "kl", "clip_low", "clip_high")},
                 zero_var=sums["zero_var_groups"] / (P * W), skipped=skipped, grad_norm=grad_norm,
                 t_gen=t_gen, t_ref=t_ref, seconds=time.time() - t0)
    if num_seqs > sums["own"]:
        stats["replay_accuracy"] = sums["replay_right"] / (num_seqs - sums["own"])
    samples = [{"problem": row["problem"], "solution": row["solution"], "answer": text, "total": s["total"]}
               for text, row, s in list(zip(ro.texts, row_of, scores))[:2 * G]]
    return stats, samples

def micro_batches(policy, ref, processor, local, ro, adv, G, rl, device):
    """Micro-batches of whole groups, trimmed to their longest answer: (batch, ids, mask, adv, ref_logp, old_logp),
    the reference's (beta > 0) and old policy's (mu > 1, else the ratio is 1) log-probabilities without gradient."""
    P, mb = len(local), min(rl.micro_batch, len(local))
    chunks = []
    for i in range(0, P, mb):
        sl = slice(i * G, (i + mb) * G)
        T = int(ro.mask[sl].sum(1).max())
        batch = ro.batch if mb == P else \
            {k: v.to(device) for k, v in M.encode(processor, data.samples_of(local[i:i + mb])).items()}
        ids, mask = ro.completion_ids[sl, :T], ro.mask[sl, :T]                                    # (mb * G, T)
        fsdp.check_images(policy, batch)
        with torch.no_grad():
            ref_logp = M.completion_logprobs(ref, batch, ids, mask) if rl.beta > 0 else None
            old_logp = M.completion_logprobs(policy, batch, ids, mask) if rl.mu > 1 else None
        chunks.append((batch, ids, mask, adv[sl], ref_logp, old_logp))
    return chunks

def reduce_by_key(sums):
    """{name: float} summed over ranks, name by name (one all-reduce); the identity on one process."""
    total = all_reduce_sum(torch.tensor(list(sums.values())))
    return {k: total[i].item() for i, k in enumerate(sums)}

# ---- The run
def log_line(stage, step, steps, s, lr):
    return (f"{stage:6s} {step:4d}/{steps} | reward {s['reward_total']:.3f} acc {s['reward_accuracy']:.3f} "
            f"fmt {s['reward_format']:.3f} | kl {s['kl']:.4f} | clip {s['clip_low'] + s['clip_high']:.3f} | "
            f"zero-var {s['zero_var']:.2f} | len {s['length']:.1f} | lr {lr:.2e} | {s['seconds']:.2f}s"
            + (f" | replay acc {s['replay_accuracy']:.3f}" if "replay_accuracy" in s else ""))

def make_curriculum(cfg, stages, groups, steps, pool):
    """The schedule, its stage files opened and every row and image in them checked."""
    specs = [curriculum.StageSpec(name, group_size=g, steps=n, replay=r)
             for name, g, n, r in zip(stages, groups, steps, replay_ratios(cfg.rl, stages))]
    stage_data = curriculum.parse_stage_data(cfg.data.stage_data) if cfg.data.stage_data else {}
    if curriculum.MIXED in stages and stage_data:  # the mixed stage reads each form's files
        stage_data = {**{k: v for k, v in stage_data.items() if k in stages}, curriculum.MIXED: stage_data}
    specs = curriculum.assign_stage_data(specs, stage_data)   # a file for a stage not in the run is an error
    return curriculum.Curriculum(specs, pool=pool, seed=cfg.run.seed, image_root=cfg.data.image_root or None)

def run_rl(cfg, cur, out, rank, device, dtype, policy, processor, base):
    """The curriculum GRPO loop; returns the folders of every stage's starting model, then of the final one."""
    rl, specs = cfg.rl, cur.stages
    ckpt = latest_checkpoint(out) if cfg.run.resume else None
    resumed_opt = resume(ckpt, out, cur, policy, rank, device, dtype, cfg.model.shard) if ckpt else None
    # Every stage's starting model, whichever stages this process runs (a resumed run starts past some).
    stage_dirs = [os.path.join(out, "stages", f"{k}_{s.name}_start") for k, s in enumerate(specs)]
    bad_in_row, opt = 0, None
    for k in range(cur.stage_index, len(specs)):
        spec, start_dir = specs[k], stage_dirs[k]
        if cur.step == 0 and missing(start_dir):
            fsdp.save(policy, processor, start_dir, dtype, rank)
        ref = base if rl.ref == "base" else M.set_memory_options(M.load(start_dir, device=device, dtype=dtype)[0],
                                                                 cfg.model.attn)
        if cfg.model.shard == "fsdp" and not fsdp.is_sharded(ref):
            ref = fsdp.shard(ref, dtype, master=False)
        ref.eval().requires_grad_(False)
        # A fresh AdamW each stage; the fp32 master weights (the policy's true weights in bf16) carry over.
        opt = optim.make(cfg.model.shard, policy.parameters(), lr=rl.lr, betas=(0.9, 0.99),
                         master=opt.master if opt else None)
        if resumed_opt is not None:  # the masters, and the moments when resumed inside this stage
            opt.load_state_dict(resumed_opt)
            resumed_opt = None
        bar = tqdm(total=spec.steps, initial=cur.step, desc=f"stage {k + 1}/{len(specs)} {spec.name}",
                   disable=rank != 0, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 60)
        advanced = False
        while not advanced:
            lr = rl.lr * lr_factor(cur.step, rl.warmup, spec.steps, rl.schedule,
                                   floor=0.0 if rl.schedule == "linear" else 0.1)
            for g in opt.param_groups:
                g["lr"] = lr
            rows = cur.next_batch(rl.prompts_per_step)
            stats, samples = grpo_step(policy, ref, processor, rows, spec.name, spec.group_size, cfg, opt, rank,
                                       device, cur.global_step)
            bad_in_row = bad_in_row + 1 if stats["skipped"] else 0
            step, global_step = cur.step + 1, cur.global_step + 1
            if rank == 0:
                if stats["skipped"]:
                    bar.write(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_row} in a row)")
                bar.update(1)
                bar.write(log_line(spec.name, step, spec.steps, stats, lr))
                tag = {"stage": spec.name, "step": step, "global_step": global_step}
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({**tag, "lr": lr, **stats}) + "\n")
                if cfg.run.sample_every and (step - 1) % cfg.run.sample_every == 0:  # steps 1, 1 + n, ...
                    with open(os.path.join(out, "samples.jsonl"), "a") as f:
                        f.writelines(json.dumps({**tag, **s}) + "\n" for s in samples)
            if bad_in_row >= cfg.run.max_bad_steps:   # after the log, so the step that stops the run is in it
                raise RuntimeError(f"{bad_in_row} steps in a row had a non-finite loss or gradient (stage "
                                   f"{spec.name}, step {step}): lower --lr, check --dtype, and look at samples.jsonl")
            advanced = cur.record()
            if advanced or global_step % cfg.run.ckpt_every == 0:  # at a stage's end the next starts afresh
                own = opt.state_dict(moments=not advanced)  # this rank's shard, or all of it without sharding
                sharded = cfg.model.shard != "none"
                state = {"curriculum": cur.state_dict(), "optimizer": None if sharded else own,
                         "shard": [cfg.model.shard, world_size()], "config": as_dict(cfg)}
                save_checkpoint(out, global_step, policy, processor, state, cfg.run.keep, rank, dtype,
                                shard=own if sharded else None)
        bar.close()
    final_dir = os.path.join(out, "stages", f"{len(specs)}_final")
    if missing(final_dir):
        fsdp.save(policy, processor, final_dir, dtype, rank)
    return stage_dirs + [final_dir]

def evaluate_stages(cfg, sets, named_dirs, out, rank, device, dtype):
    """The table: every stage's model on the held-out in-domain and out-of-domain sets."""
    eval_stages = cfg.data.eval_stages.split(",")
    records = {}
    results = E.evaluate_models(named_dirs, sets, max_new_tokens=cfg.rl.max_new_tokens, device=device, dtype=dtype,
                                max_pixels=cfg.model.max_pixels, verbose=rank == 0, records_out=records,
                                cuda_graphs=cfg.model.cuda_graphs)
    base = next(iter(records))  # the first model: the base
    changes = E.changes_from_first(records, sets, reduce=all_reduce_sum)

    def only(results, stages):  # the results of some answer forms, for one table each
        return {name: {split: {task: {s: c for s, c in forms.items() if s in stages} for task, forms in tasks.items()}
                       for split, tasks in per_model.items()} for name, per_model in results.items()}

    forms = any(s != "open" for s in eval_stages)
    table = "Open answers (the paper's evaluation):\n\n" + E.markdown_table(only(results, {"open"}))
    if forms:
        table += "\n\nYes/no and multiple-choice forms:\n\n" + E.markdown_table(only(results, {"judge", "choice"}))
    if changes:
        table += (f"\n\nChange from the {base} model, paired over the same rows (open answers):\n\n"
                  + E.markdown_table(only(changes, {"open"}), differences=True))
        if forms:
            table += (f"\n\nChange from the {base} model, paired (yes/no and multiple-choice forms):\n\n"
                      + E.markdown_table(only(changes, {"judge", "choice"}), differences=True))
    if rank == 0:
        print("\n" + table, flush=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump({"models": dict(named_dirs), "results": results, "changes": changes, "table": table}, f, indent=1)
    return results, table

def load_base(cfg, device, dtype, rank):
    """The base policy and processor; the shipped tiny base is built first when it is missing."""
    path = cfg.model.model
    if path == ModelConfig.model and not os.path.isdir(path):
        if world_size() > 1:  # its warm-start runs in one process: the other ranks would wait in its collectives
            raise SystemExit(f"error: {path} is missing: build it first, in one process (python tiny_base.py "
                             f"--out {path}), then start torchrun")
        print(f"{path} is missing: building the tiny base (python tiny_base.py)", flush=True)
        tiny_base.build_base(path, seed=0)
    with torch.random.fork_rng(devices=[]):
        policy, processor = M.load(path, device=device, dtype=dtype, seed=cfg.run.seed, max_pixels=cfg.model.max_pixels)
    return M.set_memory_options(policy, cfg.model.attn, cfg.model.grad_checkpointing), processor

def main(argv=None):
    try:  # a bad config: one clear line before any work, no traceback
        cfg = make_config(argv)
        stages, groups, steps = validate(cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    rank, _, W, device = setup_dist(None if cfg.model.device == "auto" else cfg.model.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dtype = resolve_dtype(cfg.model.dtype, device)
    out, ckpt = cfg.run.out, latest_checkpoint(cfg.run.out)
    if ckpt and cfg.run.resume:  # before config.json is written: a refused resume leaves the run as it was
        try:
            check_resume(trainer_state(ckpt).get("config", {}), cfg)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if not cfg.run.resume and holds_run(out):
            raise SystemExit(f"error: {out} already holds a run: pass --resume to continue it, or another --out")
        if cfg.run.resume and not ckpt and holds_run(out):  # killed before its first checkpoint: nothing to keep
            print(f"{out} holds no checkpoint yet: the run starts again from its first step", flush=True)
            for name in ("metrics.jsonl", "samples.jsonl"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
            shutil.rmtree(os.path.join(out, "stages"), ignore_errors=True)
        print(json.dumps({"world_size": W, "device": str(device), **as_dict(cfg)}, indent=1), flush=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(as_dict(cfg), f, indent=1)
    barrier()
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    try:  # every input opened and checked before the first step: a typo must not cost the hours of training
        policy, processor = load_base(cfg, device, dtype, rank)
        pool = data.make_split("train", cfg.data.pool_size, seed=cfg.run.seed, size=cfg.data.image_size)
        cur = make_curriculum(cfg, stages, groups, steps, pool)
        eval_sets = (E.load_eval_sets(cfg.data.eval_data or "synthetic", n=cfg.data.eval_n, seed=cfg.run.seed,
                                      image_root=cfg.data.image_root or None, size=cfg.data.image_size,
                                      stages=cfg.data.eval_stages.split(","), flag="--eval-data")
                     if cfg.data.eval_n > 0 else None)
        phase2_pool = R.load_pool(cfg, pool) if cfg.phase2.phase2 else None
    except (ValueError, FileNotFoundError) as e:  # data.DataError is a ValueError
        raise SystemExit(f"error: {e}")
    base = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.rl.ref == "base" else None
    if cfg.model.shard == "fsdp":  # each rank keeps 1/W of the fp32 weights (fsdp.py)
        policy = fsdp.shard(policy, dtype)
        if base is not None:
            base = fsdp.shard(base, dtype, master=False)

    # Phase 1: curriculum GRPO.
    t0 = time.time()
    dirs = run_rl(cfg, cur, out, rank, device, dtype, policy, processor, base)
    timings = {"rl": time.time() - t0}
    named = list(zip(["base"] + [f"after {s}" for s in stages], dirs))

    # Phase 2: rejection-sampling SFT on the RL model's own best answers.
    if cfg.phase2.phase2:
        t0 = time.time()
        final_dir = os.path.join(out, "stages", f"{len(stages) + 1}_phase2")
        trained_with = os.path.join(out, "phase2", "flags.json")   # the phase-2 flags of final_dir's model
        if not missing(final_dir) and read_json(trained_with) != as_dict(cfg)["phase2"]:   # changed on a resume
            if rank == 0:
                print(f"phase 2's flags differ from those of {final_dir}: phase 2 runs again", flush=True)
                shutil.rmtree(final_dir)
            barrier()
        if missing(final_dir):
            R.phase2_of_run(cfg, policy, processor, phase2_pool, os.path.join(out, "phase2"), rank=rank, device=device)
            fsdp.save(policy, processor, final_dir, dtype, rank)
            if rank == 0:
                write_atomic(trained_with, json.dumps(as_dict(cfg)["phase2"]))
        named.append(("final (+ phase 2)", final_dir))
        timings["phase2"] = time.time() - t0

    if rank == 0:
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        plot_rewards(metrics, os.path.join(out, "rewards.png"))
        print(stage_summary(metrics), flush=True)
    if cfg.data.eval_n > 0:
        t0 = time.time()
        evaluate_stages(cfg, eval_sets, named, out, rank, device, dtype)
        timings["eval"] = time.time() - t0
    if rank == 0:
        print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
        with open(os.path.join(out, "timings.json"), "w") as f:
            json.dump(timings, f)
    if dist.is_initialized():
        del policy, base  # FSDP's state holds the process group: free it first, or gloo may abort at exit
        barrier()
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
