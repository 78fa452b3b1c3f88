"""
optim.py: AdamW with fp32 master weights, so that bf16 parameters really train.

A bf16 weight w changes only when its update exceeds half a bf16 ulp, |update| > 2^(floor(log2 |w|) - 8): at
lr 1e-6 an AdamW step (about lr in size) rounds away for every |w| > 2^-11, so AdamW on bf16 tensors in place
leaves the model almost unmoved. Here the model keeps computing in its own dtype (bf16 on a GPU: half the memory,
fast rollouts) while the optimizer holds an fp32 master copy of every such parameter, with fp32 moments:

    g32 = float(grad)                   gradients copied up, averaged over ranks and clipped in fp32
    w32 = AdamW(w32, g32)               the update accumulates in the master, however small
    w   = bf16(w32)                     the model's weights are the master, rounded, after each step

A float32 parameter is its own master: then this is torch.optim.AdamW, step for step and bit for bit.

    opt = MasterAdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99))
    loss.backward()
    grad_norm = opt.step(max_norm=1.0)       # all-reduce, clip, AdamW (skipped when the norm is not finite)

Why this design and not fp32 parameters under torch.autocast: the rollout, most of a GRPO step's time, then
reads bf16 weights instead of re-casting fp32 ones at every decoded token, and the master and moments (the 12
bytes a parameter of optimizer state) are what a sharded optimizer splits over ranks. The gradients of one
step accumulate in the parameters' dtype over micro-batches (as DeepSpeed's bf16 mode does by default).
"""
import torch

from runtime import all_reduce_grads

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
