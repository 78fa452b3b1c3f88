"""
train.py (in progress): the manual DDP helpers shared by every loop of the project.
"""
import os

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# Manual DDP: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; without them this is one process.

def setup_dist(device=None):
    """(rank, local_rank, world_size, device). gloo on CPU, NCCL on CUDA, one process when not under torchrun."""
    if "RANK" not in os.environ:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world, device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(x):
    """Sum a tensor (or a float) over ranks; the identity on one process."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if world_size() > 1:
        dist.all_reduce(t)
    return t if isinstance(x, torch.Tensor) else t.item()


def all_reduce_grads(model):
    """Average gradients over ranks after the micro-batches (every rank must own a gradient for each
    parameter, so missing ones count as zero); a no-op on one process."""
    W = world_size()
    if W == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= W
