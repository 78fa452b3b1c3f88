"""fsdp.py on 2 CPU processes (gloo) against 1 unsharded process: the same weights after 3 GRPO-like steps (fp32,
gradient checkpointing, tied embeddings), bf16 compute that trains, a rollout inside `gathered` that equals the
unsharded one and runs no collective, and save / optimizer state round trips.

One torchrun launch (this file's `__main__`, `worker`) runs every check and writes its results to a folder; the
tests below compare them with the unsharded model run here, in the pytest process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import model as M  # noqa: E402
import rollout  # noqa: E402
from optim import MasterAdamW  # noqa: E402

pytestmark = pytest.mark.slow  # one torchrun launch of 2 processes, about 20 s
BASE = os.path.join(ROOT, "assets", "tiny-base")
P, G, T, STEPS, LR, NEW = 4, 2, 12, 3, 3e-4, 8  # prompts, answers per prompt, completion length, steps, lr, decoded


def rows():
    return data.make_rows("train", P, seed=1)


def fixed_batch(processor):
    """P prompts with images, G fixed completions each (pieces of reference answers) and a weight per token and step."""
    rs = rows()
    batch = M.encode(processor, data.samples_of(rs))
    ids = [processor.tokenizer(data.reference_completion(rs[(b + g) % P]))["input_ids"][:T]
           for b in range(P) for g in range(G)]
    gen = torch.Generator().manual_seed(0)
    return batch, torch.tensor(ids), [torch.randn(P * G, T, generator=gen) for _ in range(STEPS + 1)]


def take(batch, ids, lo, hi):
    """Prompts lo..hi-1 of an encoded batch (one image each) and their G completions."""
    sub = {k: batch[k][lo:hi] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    ends = batch["image_grid_thw"].prod(-1).cumsum(0).tolist()
    sub["pixel_values"] = batch["pixel_values"][([0] + ends)[lo]:ends[hi - 1]]
    return sub, ids[lo * G:hi * G]


def grpo_like_step(model, opt, batch, ids, weights, lo, hi, world):
    """A weighted log-prob loss over rows lo..hi of P * G, divided by the global count (as train.py's grpo_step), then
    a no-grad forward (a logged log-prob, say) before the step: no gathered copy of it may outlive the step."""
    sub, sub_ids = take(batch, ids, lo, hi)
    logp = M.completion_logprobs(model, sub, sub_ids)
    loss = (logp * weights[lo * G:hi * G]).sum() / (P * G * T)
    (loss * world).backward()
    with torch.no_grad():
        M.completion_logprobs(model, sub, sub_ids)
    return float(opt.step(1.0))


def tie(model):
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def greedy(model, processor, lo, hi):
    r = rollout.generate(model.eval(), processor, data.samples_of(rows()[lo:hi]), group_size=G, max_new_tokens=NEW,
                         greedy=True)
    model.train()
    return r.completion_ids, r.logp


def count_collectives(fn):
    """fn()'s result and the number of c10d collectives (all-gather, reduce-scatter, all-reduce...) it ran."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.name.startswith("c10d::") for e in prof.events())


def worker(out):
    import torch.distributed as dist
    import fsdp
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = rank * P // world, (rank + 1) * P // world
    res = {}

    # a. fp32 with gradient checkpointing; then tied embeddings; each 3 steps on this rank's half of the rows.
    model, processor = M.load(BASE)
    batch, ids, weights = fixed_batch(processor)
    model = fsdp.shard(M.set_memory_options(model, "sdpa", checkpointing=True), torch.float32).train()
    opt = fsdp.ShardedParamsAdamW(model.parameters(), lr=LR, betas=(0.9, 0.99))
    res["sharded"] = fsdp.is_sharded(model) and all(p.dtype == torch.float32 for p in model.parameters())
    calls = []  # forward, recomputed in backward (checkpointing), the no-grad forward's prompt and answers
    hook = model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    res["norms"] = [grpo_like_step(model, opt, batch, ids, weights[0], lo, hi, world)]
    res["mlp_calls_per_step"] = len(calls)
    hook.remove()
    res["norms"].append(grpo_like_step(model, opt, batch, ids, weights[1], lo, hi, world))

    # b. a greedy rollout of this rank's prompts inside gathered (after 2 steps), and outside it (a control).
    ctx = fsdp.gathered(model)
    _, res["collectives_entry"] = count_collectives(ctx.__enter__)
    (ids_in, logp_in), res["collectives_in"] = count_collectives(lambda: greedy(model, processor, lo, hi))
    ctx.__exit__(None, None, None)
    res["resharded_after_exit"] = all(isinstance(p, DTensor) for p in model.parameters())
    (ids_out, logp_out), res["collectives_out"] = count_collectives(lambda: greedy(model, processor, lo, hi))
    torch.save({"ids_in": ids_in, "logp_in": logp_in, "ids_out": ids_out, "logp_out": logp_out},
               os.path.join(out, f"rollout{rank}.pt"))

    res["norms"].append(grpo_like_step(model, opt, batch, ids, weights[2], lo, hi, world))
    before = [p.to_local().clone() for p in model.parameters()]   # a non-finite gradient: no step, no gradient left
    res["nan_norm"] = grpo_like_step(model, opt, batch, ids, weights[2] * float("nan"), lo, hi, world)
    res["nan_skipped"] = all(torch.equal(a, p.to_local()) and p.grad is None
                             for a, p in zip(before, model.parameters()))
    full = fsdp.full_state_dict(model, torch.float32)

    # c. save -> M.load is the gathered state (fp32, and bf16); the optimizer's state gives an identical next step.
    fsdp.save(model, processor, os.path.join(out, "saved"), torch.float32, rank)
    fsdp.save(model, processor, os.path.join(out, "saved16"), torch.bfloat16, rank)
    full16 = fsdp.full_state_dict(model, torch.bfloat16)
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
        for name, ref, dtype in (("saved", full, torch.float32), ("saved16", full16, torch.bfloat16)):
            loaded = M.load(os.path.join(out, name), dtype=dtype)[0].state_dict()
            res[name + "_equal"] = sorted(loaded) == sorted(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
        with open(os.path.join(out, "saved16", "config.json")) as f:
            res["saved16_config_dtype"] = json.load(f).get("dtype")
    res["empty_elsewhere"] = rank == 0 or full == {}
    state = opt.state_dict()
    torch.save(state, os.path.join(out, f"opt{rank}.pt"))
    res["local_state"] = all(type(t) is torch.Tensor for t in state["master"]) and all(
        type(v) is torch.Tensor for s in state["adamw"]["state"].values() for v in s.values())
    res["local_numel"] = sum(t.numel() for t in state["master"])
    grpo_like_step(model, opt, batch, ids, weights[3], lo, hi, world)
    after = [p.to_local().clone() for p in model.parameters()]
    saved = torch.load(os.path.join(out, f"opt{rank}.pt"))
    opt.load_state_dict(saved)
    res["restored"] = all(torch.equal(p.to_local(), m) for p, m in zip(model.parameters(), saved["master"]))
    grpo_like_step(model, opt, batch, ids, weights[3], lo, hi, world)
    res["same_next_step"] = all(torch.equal(a, p.to_local()) for a, p in zip(after, model.parameters()))
    try:
        opt.load_state_dict({**state, "world_size": world + 1})
    except ValueError as e:
        res["world_size_error"] = str(e)
    base = M.load(BASE)[0].state_dict()
    fsdp.load_full_state_dict(model, base)
    full = fsdp.full_state_dict(model, torch.float32)
    res["load_full"] = rank > 0 or all(torch.equal(full[k], base[k]) for k in base)

    tied = tie(M.load(BASE)[0])
    tied = fsdp.shard(tied, torch.float32).train()
    res["tied_after_shard"] = tied.lm_head.weight is tied.model.language_model.embed_tokens.weight
    opt = fsdp.ShardedParamsAdamW(tied.parameters(), lr=LR, betas=(0.9, 0.99))
    for s in range(STEPS):
        grpo_like_step(tied, opt, batch, ids, weights[s], lo, hi, world)
    opt.step(1.0)  # no gradient at all: each counts as zeros (as MasterAdamW's), AdamW's moments still move the weights
    fsdp.save(tied, processor, os.path.join(out, "saved_tied"), torch.float32, rank)

    # bf16 compute from a model loaded in bf16: the shards are fp32 masters and they move.
    model16 = fsdp.shard(M.load(BASE, dtype=torch.bfloat16)[0], torch.bfloat16).train()
    res["bf16_masters"] = all(p.dtype == torch.float32 for p in model16.parameters())
    dtypes = []
    model16.model.language_model.layers[0].mlp.register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype)))
    sub, sub_ids = take(batch, ids, lo, hi)  # the mean of two bf16 gradients, reduced in fp32, is rarely a bf16
    M.completion_logprobs(model16, sub, sub_ids).sum().backward()
    grads = torch.cat([p.grad.to_local().flatten() for p in model16.parameters() if p.grad is not None])
    res["fp32_reduced"] = (grads != grads.bfloat16().float()).float().mean().item()
    model16.zero_grad(set_to_none=True)
    opt = fsdp.ShardedParamsAdamW(model16.parameters(), lr=LR, betas=(0.9, 0.99))
    for s in range(STEPS):
        grpo_like_step(model16, opt, batch, ids, weights[s], lo, hi, world)
    res["bf16_compute"] = sorted(set(dtypes))
    trained16 = fsdp.full_state_dict(model16, torch.float32)
    if rank == 0:
        torch.save(trained16, os.path.join(out, "bf16_run.pt"))
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.abspath(__file__), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    results = [json.load(open(out / f"result{k}.json")) for k in range(2)]
    return out, results


@pytest.fixture(scope="module")
def reference():
    """The unsharded model, float32, all rows, MasterAdamW: weights after each step and its rollout after step 2."""
    def train(tied_embeddings=False):
        model, processor = M.load(BASE)
        model = (tie(model) if tied_embeddings else model).train()
        batch, ids, weights = fixed_batch(processor)
        opt = MasterAdamW(model.parameters(), lr=LR, betas=(0.9, 0.99))
        norms, roll = [], None
        for s in range(STEPS):
            norms.append(grpo_like_step(model, opt, batch, ids, weights[s], 0, P, 1))
            if s == 1 and not tied_embeddings:
                roll = [greedy(model, processor, k * P // 2, (k + 1) * P // 2) for k in range(2)]
        if tied_embeddings:
            opt.step(1.0)  # the sharded run's step without gradients
        return model, norms, roll
    return train(), train(tied_embeddings=True)


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def test_sharded_steps_equal_one_unsharded_process(sharded_run, reference):
    out, results = sharded_run
    (ref, ref_norms, _), (ref_tied, _, _) = reference
    assert all(r["sharded"] for r in results), "parameters are fp32 DTensor shards"
    assert results[0]["mlp_calls_per_step"] == 4, "gradient checkpointing recomputes the layer inside FSDP"
    assert results[0]["norms"] == results[1]["norms"], "the clipped norm is global"
    assert results[0]["norms"] == pytest.approx(ref_norms, rel=1e-5)
    assert all(r["nan_norm"] != r["nan_norm"] and r["nan_skipped"] for r in results), "a NaN gradient skips the step"
    full = torch.load(out / "full.pt")
    assert max_diff(full, ref.state_dict()) <= 1e-5, "fp32 FSDP with gradient checkpointing != unsharded"
    assert max_diff(full, M.load(BASE)[0].state_dict()) > LR, "the steps moved the weights"
    tied = M.load(out / "saved_tied")[0]
    assert all(r["tied_after_shard"] for r in results)
    assert tied.lm_head.weight is tied.model.language_model.embed_tokens.weight, "the tie survives save / load"
    assert max_diff(tied.state_dict(), ref_tied.state_dict()) <= 1e-5, "tied embeddings train as unsharded"


def test_bf16_compute_trains_fp32_masters(sharded_run, reference):
    out, results = sharded_run
    ref = reference[0][0].state_dict()
    assert results[0]["bf16_masters"] and results[0]["bf16_compute"] == ["torch.bfloat16"]
    assert all(r["fp32_reduced"] > 0.1 for r in results), "gradients are reduce-scattered in fp32"
    trained16, base = torch.load(out / "bf16_run.pt"), M.load(BASE)[0].state_dict()
    update16 = torch.cat([(trained16[k] - base[k].bfloat16().float()).flatten() for k in base])
    update32 = torch.cat([(ref[k] - base[k]).flatten() for k in base])
    assert torch.isfinite(update16).all()
    assert (update16 != 0).sum() >= 0.99 * (update32 != 0).sum(), "bf16 compute moves the fp32 masters"
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.9


def test_rollout_inside_gathered_runs_no_collective(sharded_run, reference):
    out, results = sharded_run
    roll = reference[0][2]
    for k, r in enumerate(results):
        assert r["collectives_in"] == 0, "decoding inside gathered ran a collective"
        assert r["collectives_out"] > 0, "the control: outside gathered, every forward all-gathers"
        assert r["collectives_entry"] == 6, "one all-gather per unit at entry (2 layers, 2 blocks, tower, root)"
        assert r["resharded_after_exit"], "the exit frees the gathered weights"
        got = torch.load(out / f"rollout{k}.pt")
        assert torch.equal(got["ids_in"], roll[k][0]) and torch.equal(got["ids_out"], roll[k][0])
        torch.testing.assert_close(got["logp_in"], roll[k][1], atol=1e-4, rtol=0)


def test_save_and_optimizer_state_round_trip(sharded_run, reference):
    out, results = sharded_run
    assert results[0]["saved_equal"] and results[0]["saved16_equal"], "save() then M.load: the gathered weights"
    assert results[0]["saved16_config_dtype"] == "bfloat16", "config.json names the dtype of the files"
    assert all(r["empty_elsewhere"] for r in results)
    assert max_diff(M.load(out / "saved")[0].state_dict(), reference[0][0].state_dict()) <= 1e-5
    assert all(r["local_state"] for r in results), "the optimizer state is plain local tensors"
    assert sum(r["local_numel"] for r in results) == M.num_parameters(reference[0][0]), "each rank holds its half"
    assert all(r["restored"] and r["same_next_step"] for r in results), "load_state_dict: an identical next step"
    errors = [r.get("world_size_error", "") for r in results]
    assert all("saved by 3 ranks" in e and "has 2" in e for e in errors), "another world size is a clear error"
    assert all(r["load_full"] for r in results), "load_full_state_dict puts a whole state dict into the shards"


if __name__ == "__main__":
    worker(sys.argv[1])
