"""
fsdp.py: FSDP2 (torch's `fully_shard`) for the policy: each of W ranks holds 1/W of the fp32 weights, gradients
and AdamW moments, and all-gathers one unit at a time, in the compute dtype, to run it.

    model = fsdp.shard(model, torch.bfloat16)      # every rank, after M.set_memory_options
    with fsdp.gathered(model):                     # no-grad forwards: one all-gather per unit, then none
        ro = rollout.generate(model, processor, samples, ...)
    (loss * W).backward()                          # FSDP reduce-scatters the gradients and averages them
    opt = fsdp.ShardedParamsAdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99))
    norm = opt.step(max_norm=1.0)                  # global-norm clip, AdamW on this rank's shards
    fsdp.save(model, processor, path, torch.bfloat16, rank)   # every rank; rank 0 writes a from_pretrained folder

Units (one all-gather in forward, one reduce-scatter in backward each): every text decoder layer, every vision
block, the vision tower's own patch_embed and merger, and the root (embeddings, final norm, lm_head: tied
embeddings stay in one unit). The parameters are fp32 DTensor shards, the master weights: MixedPrecisionPolicy
gathers them in the compute dtype and reduces gradients in fp32 (no MasterAdamW copies). Every unit, the root
too, reshards after each forward, so no gathered copy outlives an optimizer step.

Rules for callers:
- All ranks run the same units in the same order: a rank whose batch has no image must still run the vision
  tower in a training forward, or the others wait on its all-gather. Inside `gathered` nothing is collective.
- model.visual runs before the root's forward (M.image_features): shard() makes the root FSDP's root at once,
  since FSDP otherwise takes the first unit to run forward for the root, then refuses the real one.
- A checkpoint is `save()` (all ranks) plus each rank's own `opt.state_dict()`, resumed on as many ranks.
"""
import copy
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import model as M
from runtime import barrier, save_atomically

# The root returns logits[:, -T-1:] (a view); FSDP warns about in-place ops on it, which this code never does.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

def local(t):
    """This rank's part of a sharded tensor; a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t

def _like(t, p):  # a saved local shard as a DTensor placed like parameter p
    return DTensor.from_local(t.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

def is_sharded(model):
    return isinstance(model, FSDPModule)

def shard(model, dtype=torch.bfloat16, master=True):
    """Shard a Qwen2.5-VL / Qwen2-VL policy over all ranks in place, unit by unit, each cast to float32 just before
    (a bf16 model never exists whole in float32; master=False keeps the model's dtype: a frozen reference);
    computes in `dtype`. Returns the model."""
    if not dist.is_initialized():  # one process without torchrun: a group of one, so that the same code runs
        cuda = next(model.parameters()).is_cuda
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    inner = model.model
    for unit in [*inner.language_model.layers, *inner.visual.blocks, inner.visual, model]:
        for p in unit.parameters():
            if master and not isinstance(p, DTensor):  # not yet taken by an inner unit
                p.data = p.data.float()         # in place: a tied lm_head stays the embeddings' parameter
        fully_shard(unit, mp_policy=policy, reshard_after_forward=True)
    model._get_fsdp_state()._lazy_init()        # the root is the root, whichever unit runs forward first
    return model

def check_images(model, batch):
    """Under FSDP every rank runs the vision tower's collectives in a training forward: refuse a batch with no image."""
    if is_sharded(model) and "pixel_values" not in batch:
        raise ValueError("--shard fsdp needs an image in every micro-batch (this one has none): drop the rows "
                         "without an image, or use --shard optimizer")

@contextmanager
def gathered(model):
    """Every unit all-gathered once at entry and kept for the no-grad forwards inside (the rollout's decode loop,
    evaluation), which run no collective; resharded at exit. Costs the whole model in the compute dtype. All ranks
    enter together; on an unsharded model it does nothing."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()

class ShardedParamsAdamW:
    """MasterAdamW's interface for a sharded model: torch.optim.AdamW on this rank's fp32 shards, which are the
    master weights. `master` is accepted and unused (a new stage's optimizer continues from the parameters)."""
    sharded = True

    def __init__(self, params, lr, betas=(0.9, 0.999), weight_decay=0.0, master=None):
        self.params = [p for p in params if p.requires_grad]
        self.master = self.params
        fused = True if self.params and self.params[0].is_cuda else None
        self.adamw = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)

    @property
    def param_groups(self):
        return self.adamw.param_groups

    def step(self, max_norm):
        """Clip the (already reduce-scattered, averaged) gradients to max_norm by their global norm and, when it is
        finite, update the shards. Clears the gradients; returns the norm (a plain tensor, equal on every rank)."""
        for p in self.params:  # a missing gradient counts as zero, as in optim.MasterAdamW and ShardedAdamW
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)   # one all-reduce of the squared norms
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if torch.isfinite(norm):
            self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        return norm

    def state_dict(self, moments=True):
        """This rank's own state, plain local tensors (live views): its fp32 shards and, unless moments=False,
        AdamW's state."""
        sd = self.adamw.state_dict() if moments else None
        adamw = sd and {"state": {i: {k: local(v) for k, v in s.items()} for i, s in sd["state"].items()},
                        "param_groups": sd["param_groups"]}
        return {"world_size": dist.get_world_size(), "master": [p.to_local() for p in self.params], "adamw": adamw}

    def load_state_dict(self, state):
        if state.get("world_size") != dist.get_world_size():
            raise ValueError(f"this optimizer state was saved by {state.get('world_size')} ranks and this run has "
                             f"{dist.get_world_size()}: a sharded checkpoint resumes on the same number of ranks")
        if len(state["master"]) != len(self.params):
            raise ValueError(f"the checkpoint holds {len(state['master'])} shards, this model has {len(self.params)}")
        with torch.no_grad():
            for p, saved in zip(self.params, state["master"]):
                p.to_local().copy_(saved)
        if state["adamw"] is not None:  # AdamW's moments of a DTensor parameter are DTensors like it
            self.adamw.load_state_dict({
                "state": {i: {k: v if k == "step" else _like(v, self.params[i]) for k, v in s.items()}
                          for i, s in state["adamw"]["state"].items()},
                "param_groups": state["adamw"]["param_groups"]})

def full_state_dict(model, dtype):
    """The whole state dict, on rank 0 on the CPU in `dtype` ({} on the other ranks). Collective: every rank calls
    it, outside `gathered`. One tensor is gathered at a time: rank 0's peak is the model in `dtype` on the CPU."""
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()                 # an all-gather
        if dist.get_rank() == 0:
            out[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)
    return out

@torch.no_grad()
def load_full_state_dict(model, state_dict):
    """Copy a whole state dict (every rank holds it, e.g. from M.load(checkpoint)) into the shards; no collective."""
    for name, t in model.state_dict().items():
        full = state_dict[name].to(t.device, t.dtype)
        if isinstance(t, DTensor):              # this rank's chunk, cut locally (src_data_rank=None: no scatter)
            full = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
            t = t.to_local()
        t.copy_(full)

def save(model, processor, path, dtype, rank):
    """A folder that M.load(path) and from_pretrained open, sharded model or not (then in `dtype`), written by rank 0
    through a temporary folder. Every rank calls it; it returns when the folder is complete."""
    state_dict = full_state_dict(model, dtype) if is_sharded(model) else None
    if rank == 0:
        save_atomically(path, lambda tmp: write(model, processor, tmp, state_dict, dtype))
    barrier()

def write(model, processor, path, state_dict, dtype):
    """Rank 0: the folder of a model, from its full_state_dict when sharded (state_dict None: M.save)."""
    if state_dict is None:
        return M.save(model, processor, path)
    config = copy.deepcopy(model.config)        # its dtype is the fp32 shards': say what the files hold
    for c in [config] + [getattr(config, k) for k in config.sub_configs]:
        c.dtype = dtype
    with M.quiet_transformers():
        model.save_pretrained(path, state_dict={M.checkpoint_name(k): v for k, v in state_dict.items()})
        config.save_pretrained(path)
        processor.save_pretrained(path)
