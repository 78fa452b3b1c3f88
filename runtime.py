"""
What every entry point needs around the model, with no project imports:
- manual DDP, written out: `setup_dist()` reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE (gloo on CPU; on GPUs
  NCCL for CUDA tensors and gloo for CPU ones); without them it is one process, where `all_reduce_sum`,
  `all_reduce_grads` and `barrier` do nothing;
- `require` and `check_device` (flags checked before any work), `resolve_dtype`, atomic writes (`save_atomically`,
  `write_atomic`) and `lr_factor`, the learning-rate schedule;
- `forked_map`, work dealt to forked processes of one thread each (the evaluation on a CPU).
"""
import datetime
import math
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.distributed as dist

def setup_dist(device=None):
    """(rank, local_rank, world_size, device). gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo for CPU ones."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():  # NCCL serves CUDA tensors only: CPU ones (counts, objects) go over gloo
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=60))  # rank 0 may write a 50 GB checkpoint
    return rank, local_rank, world, device

def require(checks):
    """A ValueError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)

def check_device(device):
    """A ValueError naming --device unless it is auto, cpu, cuda, or cuda:N of a GPU that torch sees."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    if m is None:
        raise ValueError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no GPU (on a CPU machine use --device cpu)")
    if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:"
                         f"{torch.cuda.device_count() - 1}")

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def all_reduce_sum(x):
    """Sum a tensor (or a float) over ranks; the identity on one process."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if world_size() > 1:
        dist.all_reduce(t)
    return t if isinstance(x, torch.Tensor) else t.item()

def all_reduce_grads(params):
    """Average gradients over ranks. A missing gradient counts as zero, so every rank runs the same collectives,
    and one process steps such a parameter as N processes (and the sharded optimizers) do."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world_size() == 1:
        return
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world_size()

def barrier():
    if world_size() > 1:
        dist.barrier()

def resolve_dtype(name, device):
    """torch dtype of a --dtype value: auto is bfloat16 on a GPU and float32 on a CPU."""
    if name == "auto":
        name = "bfloat16" if str(device).startswith("cuda") else "float32"
    return getattr(torch, name)

def save_atomically(path, write):
    """write(tmp) fills a temporary folder that then replaces `path` by renames, so a kill never leaves half a
    folder at `path` (the old one moves aside whole, and goes only once the new one is in place). The new files reach
    the disk before the renames, and the renames before this returns: a power cut leaves the old folder or the new
    one, never a new name over files the disk has not written yet."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    sync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    sync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)

def write_atomic(path, text):
    """`text` as the file `path`, whole or not at all: written beside it, flushed to the disk, then renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(os.path.dirname(os.path.abspath(path)))

def sync_dir(folder):
    """fsync a folder: its entries (new names, renames) reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def sync_tree(folder):
    """fsync every file and folder under `folder`, itself included."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        sync_dir(root)

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

def cpu_workers(device):
    """How many forked processes of one thread each `forked_map` should use: one per thread torch would use, on a
    CPU, in a single process, where fork exists; else 1. A tiny model's many small operations use a second thread
    poorly and a second process well."""
    if str(device) != "cpu" or world_size() > 1 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return torch.get_num_threads()

_FORKED = None  # (fn, items): what forked workers inherit from forked_map

def forked_map(fn, items, workers):
    """[fn(x) for x in items], computed by `workers` forked processes that take the next item as they finish one
    (fn's results pickled back, in order). A forked process inherits the caller's memory, models included, and
    runs on one thread: an OpenMP thread pool does not survive a fork. workers <= 1, or one item, runs here."""
    global _FORKED
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    _FORKED = (fn, items)
    try:   # a process pool of futures: a worker that dies raises BrokenProcessPool here instead of hanging
        with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(_forked_item, range(len(items))))
    finally:
        _FORKED = None

def _forked_item(i):
    fn, items = _FORKED
    return fn(items[i])
