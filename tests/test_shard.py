"""--shard optimizer (optim.ShardedAdamW) and multi-node runs: the same weights as plain AdamW, one process or
two, one collective per bucket instead of one per tensor, and a kill + resume that is bit-identical."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gpu_check
import model as M
import optim
from optim import MasterAdamW, ShardedAdamW
from test_train import BASE, QUICK, ROOT, weights

TWO_STEPS = QUICK + ["--stage-steps", "2"]


def fake_gradients(named_params, seed, skip=""):
    """Random gradients; the parameters whose names start with `skip` get none (as the vision tower on text)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        p.grad = None if skip and name.startswith(skip) else torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_process_sharded_equals_master_adamw(dtype):
    a = M.load(BASE, dtype=dtype)[0]
    b = M.load(BASE, dtype=dtype)[0]
    plain = MasterAdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sharded = ShardedAdamW(b.parameters(), lr=1e-3, betas=(0.9, 0.99), bucket_mb=0.1)
    assert len(sharded.buckets) > 1
    for step in range(4):  # the third without gradients for the vision tower: they count as zeros in both
        skip = "model.visual." if step == 2 else ""
        fake_gradients(a.named_parameters(), step, skip)
        fake_gradients(b.named_parameters(), step, skip)
        assert torch.allclose(plain.step(0.5), sharded.step(0.5), rtol=1e-5), "the same clipped norm"
    masters = [torch.cat([m.detach().float().flatten() for m in plain.master]), torch.cat(sharded.master).detach()]
    assert torch.allclose(*masters, atol=1e-6), "the same fp32 masters (one process: no padding)"
    for (name, x), y in zip(a.named_parameters(), b.parameters()):  # bf16: one weight may round one ulp apart
        assert torch.allclose(x.float(), y.float(), atol=1e-6 if dtype == torch.float32 else 1e-4), name
        assert all(p.grad is None for p in b.parameters()), "the step clears the gradients"


def count_collectives(names, fn):
    """{name: calls} of the torch.distributed functions `names` while fn() runs."""
    counts = {}
    originals = {n: getattr(dist, n) for n in names}
    saved = optim.REDUCE_SCATTER, optim.ALL_GATHER

    def counted(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call
    for n in names:
        setattr(dist, n, counted(n))
    optim.REDUCE_SCATTER, optim.ALL_GATHER = (getattr(dist, f.__name__) for f in saved)
    try:
        fn()
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
        optim.REDUCE_SCATTER, optim.ALL_GATHER = saved
    return counts


def two_rank_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    names = ["all_reduce", optim.REDUCE_SCATTER.__name__, optim.ALL_GATHER.__name__]
    result = {}
    for mode, cls in (("plain", MasterAdamW), ("sharded", ShardedAdamW)):
        model = M.load(BASE)[0]
        opt = cls(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
        fake_gradients(model.named_parameters(), seed=rank)  # the ranks' gradients differ: they must be averaged
        norm = []
        result[mode] = {"counts": count_collectives(names, lambda: norm.append(float(opt.step(1.0)))), "norm": norm[0],
                        "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
                        "state": sum(t.numel() for t in opt.master) if mode == "sharded" else None,
                        "tensors": len(opt.params), "buckets": len(getattr(opt, "buckets", []))}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_one_collective_per_bucket_and_the_same_update(tmp_path):
    mp.spawn(two_rank_worker, args=(29647, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    plain, sharded = ranks[0]["plain"], ranks[0]["sharded"]
    n = plain["tensors"]
    assert plain["counts"] == {"all_reduce": n}, "plain DDP: one all-reduce per tensor"
    assert sharded["buckets"] < n and sharded["counts"] == {
        optim.REDUCE_SCATTER.__name__: sharded["buckets"], optim.ALL_GATHER.__name__: sharded["buckets"],
        "all_reduce": 1}, "sharded: a reduce-scatter and an all-gather per bucket, one all-reduce for the norm"
    total = sum(w.numel() for w in plain["weights"].values())
    assert sharded["norm"] == pytest.approx(plain["norm"], rel=1e-5), "the norm of the averaged gradient"
    assert sharded["state"] == pytest.approx(total / 2, abs=2 * sharded["buckets"]), "each rank holds half"
    start = dict(M.load(BASE)[0].named_parameters())
    assert any(not torch.equal(w, start[k]) for k, w in plain["weights"].items()), "the step moves the weights"
    for k, w in plain["weights"].items():
        assert torch.equal(ranks[0]["sharded"]["weights"][k], ranks[1]["sharded"]["weights"][k]), "ranks agree"
        assert torch.allclose(ranks[1]["sharded"]["weights"][k], w, atol=1e-6), f"{k}: the same update"


def test_a_resume_with_another_world_size_is_refused():
    model = M.load(BASE)[0]
    opt = ShardedAdamW(model.parameters(), lr=1e-3)
    state = {**opt.state_dict(), "world": 2}
    with pytest.raises(ValueError, match="sharded over 2 ranks, this run has 1"):
        opt.load_state_dict(state)


# -----------------------------------------------------------------------------
# Whole runs: torchrun, two "nodes" on localhost, SIGKILL

def torchrun(args, out, nproc=2, port=29651, nnodes=1, node_rank=0, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
           f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
           os.path.join(ROOT, "train.py")] + args + ["--out", str(out)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # gpu_check.kill_tree kills whole process groups
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


# Then phase 2 on 6 prompts, all kept (bar 0), in SFT batches of 5 rows: each epoch's second batch has 1 row, so
# one of 2 ranks has none (under FSDP it still runs the forward, its loss weighted 0).
PHASE2 = ["--phase2", "--phase2-prompts", "6", "--phase2-samples", "2", "--phase2-bar", "0", "--phase2-batch", "5"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + TWO_STEPS + PHASE2 + ["--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def assert_same_weights(one, other, what):
    start = weights(one / "stages/0_choice_start")
    # Phase 2 moves a weight by about 4e-4; on an AVX-512 CPU its 1- and 2-process weights differ by 4e-6 (rounding).
    for stage, atol in (("1_final", 1e-6), ("2_phase2", 1e-5)):
        a, b = weights(one / "stages" / stage), weights(other / "stages" / stage)
        assert any(not torch.equal(a[k], start[k]) for k in a), "the steps must change the weights"
        for k in a:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), f"{stage} {k}: {what} must match 1 process"
    # AdamW's first steps barely see a gradient's scale, so the phase-2 losses (4 decimals) are checked as well.
    sft = [json.load(open(d / "phase2" / "phase2_report.json"))["sft"]["losses"] for d in (one, other)]
    assert sft[0] == pytest.approx(sft[1], abs=2e-4), f"{what}: the phase-2 SFT losses must match 1 process"


@pytest.mark.slow
def test_two_nodes_with_a_sharded_optimizer_equal_one_process(one_process, tmp_path):
    two = torchrun(TWO_STEPS + PHASE2, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(one_process, tmp_path / "two", "2 processes")
    nodes = [torchrun(TWO_STEPS + PHASE2 + ["--shard", "optimizer"], tmp_path / "nodes", nproc=1, port=29653,
                      nnodes=2, node_rank=r, wait=False) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_same_weights(one_process, tmp_path / "nodes", "2 nodes with a sharded optimizer")


@pytest.mark.slow
def test_two_processes_with_fsdp_equal_one_process(one_process, tmp_path):
    r = torchrun(TWO_STEPS + PHASE2 + ["--shard", "fsdp"], tmp_path / "fsdp", port=29655)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(one_process, tmp_path / "fsdp", "2 processes with FSDP")


@pytest.mark.slow
def test_fsdp_with_micro_batches_of_one_row_equals_one_process(one_process, tmp_path):
    # Phase 2's batches of 5 rows on 2 ranks: 3 forwards on rank 0 and 2 on rank 1, which runs a third weighted 0
    # (without it rank 0 waits for its collectives until the timeout).
    r = torchrun(TWO_STEPS + PHASE2 + ["--shard", "fsdp", "--micro-batch", "1"], tmp_path / "mb", port=29657)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(one_process, tmp_path / "mb", "2 processes with FSDP, micro-batches of 1")


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["optimizer", "fsdp"])
def test_a_sharded_run_killed_and_resumed_is_bit_identical(tmp_path, shard):
    args = QUICK + ["--stage-steps", "4", "--ckpt-every", "1", "--shard", shard, "--dtype", "bfloat16"]
    full = torchrun(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    proc = torchrun(args, out, wait=False)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step_000002"):
        time.sleep(0.05)
    gpu_check.kill_tree(proc.pid)  # torchrun and each worker, which it starts in a session of its own
    proc.wait()
    time.sleep(1)
    assert latest.read_text() < "step_000004", "the run must be killed before it ends"
    assert sorted(os.listdir(out / "checkpoints" / latest.read_text() / "optimizer")) == ["rank0.pt", "rank1.pt"]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args + ["--resume", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode != 0 and f"saved with --shard {shard} on 2 processes" in one.stderr, one.stderr[-2000:]
    resumed = torchrun(args + ["--resume"], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "full/stages/1_final"), weights(out / "stages/1_final")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: kill + resume must end with the uninterrupted run's weights"
    masters = [[torch.load(run / "checkpoints/step_000004/optimizer" / f"rank{r}.pt", weights_only=False)["master"]
                for r in (0, 1)] for run in (tmp_path / "full", out)]
    assert all(torch.equal(x, y) for r in (0, 1) for x, y in zip(masters[0][r], masters[1][r])), "and the masters"


def test_fsdp_refuses_a_micro_batch_without_an_image(monkeypatch):
    import fsdp
    model = M.load(BASE)[0]
    fsdp.check_images(model, {"input_ids": None})  # an unsharded model has no collectives to keep in step
    monkeypatch.setattr(fsdp, "is_sharded", lambda m: True)
    fsdp.check_images(model, {"input_ids": None, "pixel_values": None})
    with pytest.raises(ValueError, match="needs an image in every micro-batch"):
        fsdp.check_images(model, {"input_ids": None})
