"""runtime.py: the process group a GPU run asks for serves every tensor its collectives are handed."""
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
