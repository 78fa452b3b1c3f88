"""
optim.py: AdamW with fp32 master weights, so that bf16 parameters really train.

A bf16 weight w changes only when its update exceeds half a bf16 ulp, |update| > 2^(floor(log2 |w|) - 8): at
lr 1e-6 an AdamW step (about lr in size) rounds away for every |w| > 2^-11, so AdamW on bf16 tensors in place
leaves the model almost unmoved. Here the model keeps computing in its own dtype (bf16 on a GPU: half the memory,
fast rollouts) while the optimizer holds an fp32 master copy of every such parameter, with fp32 moments:

    g32 = float(grad)                   gradients copied up, averaged over ranks and clipped in fp32
    w32 = AdamW(w32, g32)               the update accumulates in the master, however small
    w   = bf16(w32)                     the model's weights are the master, rounded, after each step

A float32 parameter is its own master: then this is torch.optim.AdamW, step for step and bit for bit, except that
a parameter without a gradient (the vision tower on a text-only batch) counts as zeros, where torch's AdamW skips
it: so one process steps it as N processes, ShardedAdamW and FSDP do.

    opt = MasterAdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99))
    loss.backward()
    grad_norm = opt.step(max_norm=1.0)       # all-reduce, clip, AdamW (skipped when the norm is not finite)

Why this design and not fp32 parameters under torch.autocast: the rollout, most of a GRPO step's time, then
reads bf16 weights instead of re-casting fp32 ones at every decoded token, and the master and moments (the 12
bytes a parameter of optimizer state) are what a sharded optimizer splits over ranks. The gradients of one
step accumulate in the parameters' dtype over micro-batches (as DeepSpeed's bf16 mode does by default).

`ShardedAdamW` (--shard optimizer) is the same update with the masters, moments and fp32 gradients split over the
ranks; `make(shard, ...)` picks the optimizer of a --shard mode (fsdp: fsdp.ShardedParamsAdamW).
"""
import math

import torch
import torch.distributed as dist

import fsdp
from runtime import all_reduce_grads, world_size

class MasterAdamW:
    """torch.optim.AdamW over fp32 masters of `params`; `master` continues the masters of an earlier optimizer
    (a new stage: fresh moments, the same fp32 weights)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), weight_decay=0.0, master=None):
        self.params = [p for p in params if p.requires_grad]
        self.master = master or [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        fused = True if self.master and self.master[0].is_cuda else None  # no foreach temporaries of the moments' size
        self.adamw = torch.optim.AdamW(self.master, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)

    @property
    def param_groups(self):  # AdamW's own list: load_state_dict replaces it
        return self.adamw.param_groups

    def step(self, max_norm):
        """Average the gradients over ranks, clip them to max_norm and, when their norm is finite, update the
        masters and write them back into the parameters. Clears the gradients; returns the norm."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        all_reduce_grads(self.master)
        norm = torch.nn.utils.clip_grad_norm_(self.master, max_norm)
        if torch.isfinite(norm):
            self.adamw.step()
            self._write_back()
        self.adamw.zero_grad(set_to_none=True)  # the copies' own gradients were dropped above
        return norm

    def _copies(self):
        return [(p, m) for p, m in zip(self.params, self.master) if m is not p]

    @torch.no_grad()
    def _write_back(self):
        for p, m in self._copies():
            p.copy_(m)

    def state_dict(self, moments=True):
        """The masters that are copies (none for fp32 parameters) and, unless moments=False, AdamW's state."""
        return {"master": [m for _, m in self._copies()],
                "adamw": self.adamw.state_dict() if moments else None}

    def load_state_dict(self, state):
        copies = self._copies()
        if len(copies) != len(state["master"]):
            raise ValueError(f"the checkpoint holds {len(state['master'])} master tensors, this model needs "
                             f"{len(copies)}: was it saved with another --dtype?")
        with torch.no_grad():
            for (_, m), saved in zip(copies, state["master"]):
                m.copy_(saved)
        self._write_back()
        if state["adamw"] is not None:
            self.adamw.load_state_dict(state["adamw"])


# torch 2.13 renames the flat-tensor collectives (the old names warn); torch 2.11 has only the old ones.
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

def make(shard, params, lr, betas, master=None):
    """The optimizer of a --shard mode."""
    cls = {"none": MasterAdamW, "optimizer": ShardedAdamW, "fsdp": fsdp.ShardedParamsAdamW}[shard]
    return cls(params, lr=lr, betas=betas, master=master)

class ShardedAdamW:
    """MasterAdamW with its state split over the W ranks (ZeRO-1, and the fp32 gradient shards of ZeRO-2): the
    parameters are flattened into buckets of about `bucket_mb` MB of fp32, and rank r keeps the fp32 master, the
    gradient and AdamW's moments of the r-th 1/W of every bucket. A step, per bucket:

        grad shard = reduce_scatter(float(flat gradient)) / W     one collective instead of one per tensor
        master shard = AdamW(master shard, clipped grad shard)    the global norm from one all-reduce
        flat parameters = all_gather(dtype(master shard))         every rank gets the whole update

    The bf16 gradients stay whole during backward (accumulated over micro-batches) and are freed at the step."""
    sharded = True

    def __init__(self, params, lr, betas=(0.9, 0.999), weight_decay=0.0, master=None, bucket_mb=256):
        self.params, self.buckets = [p for p in params if p.requires_grad], []
        self.world, self.rank = world_size(), dist.get_rank() if dist.is_initialized() else 0
        for p in self.params:  # consecutive tensors of one dtype, up to bucket_mb
            b = self.buckets[-1] if self.buckets else None
            if b and b[-1].dtype == p.dtype and 4 * (sum(q.numel() for q in b) + p.numel()) <= bucket_mb * 2 ** 20:
                b.append(p)
            else:
                self.buckets.append([p])
        self.size = [math.ceil(sum(p.numel() for p in b) / self.world) for b in self.buckets]  # a shard's length
        self.master = master or [self._flat(b, n, [p.detach() for p in b])[self.rank * n:(self.rank + 1) * n].clone()
                                 for b, n in zip(self.buckets, self.size)]
        fused = True if self.master[0].is_cuda else None
        self.adamw = torch.optim.AdamW(self.master, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)

    def _flat(self, bucket, n, tensors):  # fp32, zero-padded to W shards; a missing tensor counts as zeros
        flat = torch.zeros(n * self.world, dtype=torch.float32, device=bucket[0].device)
        k = 0
        for p, t in zip(bucket, tensors):
            if t is not None:
                flat[k:k + p.numel()].copy_(t.reshape(-1))
            k += p.numel()
        return flat

    @property
    def param_groups(self):
        return self.adamw.param_groups

    def step(self, max_norm):
        """Reduce-scatter the gradients, clip them to max_norm by their global norm and, when it is finite, update
        the master shards and all-gather them into the parameters. Clears the gradients; returns the norm."""
        for b, n, m in zip(self.buckets, self.size, self.master):
            flat = self._flat(b, n, [p.grad for p in b])
            for p in b:
                p.grad = None
            m.grad = torch.empty_like(m)
            if self.world > 1:
                REDUCE_SCATTER(m.grad, flat)
            else:
                m.grad.copy_(flat)
            m.grad /= self.world
        norm = torch.stack([m.grad.pow(2).sum() for m in self.master]).sum()
        if self.world > 1:
            dist.all_reduce(norm)
        norm = norm.sqrt()
        if torch.isfinite(norm):
            torch._foreach_mul_([m.grad for m in self.master], (max_norm / (norm + 1e-6)).clamp(max=1.0))
            self.adamw.step()
            self._write_back()
        self.adamw.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def _write_back(self):
        for b, n, m in zip(self.buckets, self.size, self.master):
            flat = torch.empty(n * self.world, dtype=b[0].dtype, device=m.device)
            if self.world > 1:
                ALL_GATHER(flat, m.to(flat.dtype))
            else:
                flat.copy_(m)
            k = 0
            for p in b:
                p.copy_(flat[k:k + p.numel()].view_as(p))
                k += p.numel()

    def state_dict(self, moments=True):
        """This rank's shards: each rank saves its own."""
        return {"world": self.world, "size": self.size, "master": self.master,
                "adamw": self.adamw.state_dict() if moments else None}

    def load_state_dict(self, state):
        if (state.get("world"), state.get("size")) != (self.world, self.size):
            raise ValueError(f"the checkpoint's optimizer is sharded over {state.get('world', 1)} ranks, this run has "
                             f"{self.world}: resume with --nproc_per_node x --nnodes = {state.get('world', 1)}, or "
                             "with the same --shard as the run was saved with")
        with torch.no_grad():
            for m, saved in zip(self.master, state["master"]):
                m.copy_(saved)
        self._write_back()
        if state["adamw"] is not None:
            self.adamw.load_state_dict(state["adamw"])
