"""runtime.py: the process group a GPU run asks for serves every tensor its collectives are handed; forked_map
computes every item, in order, in one-thread processes."""
import os
import time

import pytest
import torch
import torch.distributed as dist

import runtime


def backends(spec):
    """'cpu:gloo,cuda:nccl' -> {"cpu": "gloo", "cuda": "nccl"}; a bare backend serves what it can ('nccl': cuda)."""
    if ":" not in spec:
        return {"nccl": {"cuda": "nccl"}, "gloo": {"cpu": "gloo", "cuda": "gloo"}}[spec]
    return dict(part.split(":") for part in spec.split(","))


def test_a_gpu_run_gives_cpu_tensors_a_backend(monkeypatch):
    asked = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: asked.update(backend=backend,
                                                                                            timeout=timeout))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    for k, v in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "8")):
        monkeypatch.setenv(k, v)
    assert runtime.setup_dist("cuda") == (1, 1, 8, "cuda:1")
    served = backends(asked["backend"])
    assert served.get("cuda") == "nccl", "CUDA tensors (gradients) go over NCCL"
    assert "cpu" in served, "the CPU tensors of all_reduce_sum and the object collectives need a backend too"
    assert asked["timeout"].total_seconds() >= 30 * 60, "long enough for rank 0 to write a 3B checkpoint"
    runtime.setup_dist("cpu")
    assert backends(asked["backend"]) == {"cpu": "gloo", "cuda": "gloo"}, "CPU runs: gloo"


def test_all_reduce_sum_hands_over_cpu_tensors(monkeypatch):
    """all_reduce_sum's tensor is a CPU one: the reason the process group must serve CPU (see above)."""
    seen = []
    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: seen.append(t.device.type))
    assert runtime.all_reduce_sum(1.5) == 1.5 and seen == ["cpu"]


def square_slowly(x):
    time.sleep(0.05)   # long enough for both workers to take items
    if x == 3 and os.getpid() != PARENT:
        raise ValueError(f"item {x} failed")
    return x * x, os.getpid(), torch.get_num_threads()


PARENT = os.getpid()


def test_forked_map_gives_each_item_in_order_from_one_thread_processes():
    out = runtime.forked_map(square_slowly, [0, 1, 2, 4, 5, 6], workers=2)
    assert [v for v, _, _ in out] == [0, 1, 4, 16, 25, 36], "fn of every item, in the items' order"
    pids = {pid for _, pid, _ in out}
    assert PARENT not in pids and len(pids) == 2, "two forked processes did the work"
    assert all(threads == 1 for *_, threads in out), "each on one thread"
    assert [pid for _, pid, _ in runtime.forked_map(square_slowly, [1, 2], workers=1)] == [PARENT] * 2
    with pytest.raises(ValueError, match="item 3 failed"):
        runtime.forked_map(square_slowly, range(5), workers=2)


def test_cpu_workers_one_per_thread_on_a_cpu_only(monkeypatch):
    assert runtime.cpu_workers("cpu") == torch.get_num_threads()
    assert runtime.cpu_workers("cuda:0") == 1
    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    assert runtime.cpu_workers("cpu") == 1, "torchrun ranks already share the machine"


def test_save_atomically_replaces_a_folder_by_renames(tmp_path, monkeypatch):
    path = str(tmp_path / "model")

    def write(text):
        def fill(folder):
            os.makedirs(folder)
            with open(os.path.join(folder, "weights"), "w") as f:
                f.write(text)
        return fill
    runtime.save_atomically(path, write("one"))
    renames, rename = [], os.rename

    def watched(src, dst):  # what `path` holds at each rename: never a folder half deleted
        renames.append((os.path.basename(dst), sorted(os.listdir(path)) if os.path.isdir(path) else None))
        rename(src, dst)
    monkeypatch.setattr(runtime.os, "rename", watched)
    runtime.save_atomically(path, write("two"))
    assert renames == [("model.old", ["weights"]), ("model", None)], "the old folder moves aside whole, then the new in"
    assert open(os.path.join(path, "weights")).read() == "two" and sorted(os.listdir(tmp_path)) == ["model"]

    def broken(folder):
        os.makedirs(folder)
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        runtime.save_atomically(path, broken)
    assert open(os.path.join(path, "weights")).read() == "two", "a write that dies leaves the folder as it was"


def test_atomic_writes_reach_the_disk_before_their_renames(tmp_path, monkeypatch):
    """A power cut must find the old files or the new ones: each new file, and its folder, fsynced before the rename
    that makes it current, and the parent folder (which holds the renames) after it."""
    events, fsync, rename, replace = [], os.fsync, os.rename, os.replace

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)
    monkeypatch.setattr(runtime.os, "fsync", synced)
    monkeypatch.setattr(runtime.os, "rename", lambda src, dst: (events.append(("rename", dst)), rename(src, dst)))
    monkeypatch.setattr(runtime.os, "replace", lambda src, dst: (events.append(("rename", dst)), replace(src, dst)))
    path, root = str(tmp_path / "model"), str(tmp_path)

    def fill(folder):
        os.makedirs(os.path.join(folder, "optimizer"))
        for name in ("weights", os.path.join("optimizer", "rank0.pt")):
            with open(os.path.join(folder, name), "w") as f:
                f.write("new")
    runtime.save_atomically(path, fill)
    tmp = path + ".tmp"
    assert events == [("fsync", os.path.join(tmp, "weights")), ("fsync", tmp),
                      ("fsync", os.path.join(tmp, "optimizer", "rank0.pt")), ("fsync", os.path.join(tmp, "optimizer")),
                      ("rename", path), ("fsync", root)]
    events.clear()
    runtime.write_atomic(os.path.join(root, "latest"), "step_000001")
    assert events == [("fsync", os.path.join(root, "latest.tmp")), ("rename", os.path.join(root, "latest")),
                      ("fsync", root)]
