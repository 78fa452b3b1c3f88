"""optim.MasterAdamW: torch's AdamW exactly on fp32 parameters; on bf16 ones, real GRPO steps at the 3B preset's
lr move the fp32 master weights as a float32 run moves its weights."""
import os

import pytest
import torch

import model as M
import train
from optim import MasterAdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny-base")


def test_float32_parameters_are_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    ours = MasterAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.99))
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    for step in range(4):
        x = torch.randn(5, 6)
        for m in (a, b):
            (m(x) ** 2).sum().backward()
        norm = ours.step(max_norm=0.5)
        assert norm == torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        ref.step()
        ref.zero_grad(set_to_none=True)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), f"step {step}"
        assert all(p.grad is None for p in a.parameters())
    assert ours.state_dict()["master"] == [], "float32 parameters are their own master: nothing is copied"


def test_bf16_updates_below_half_an_ulp_accumulate_in_the_master():
    w = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))  # ulp of 1.0 in bf16: 2^-7
    opt = MasterAdamW([w], lr=1e-4)
    for _ in range(3):
        w.grad = torch.ones_like(w)
        opt.step(max_norm=1e9)
    assert torch.all(w == 1), "3 steps of 1e-4 are under half an ulp of 1.0: the bf16 weight has not moved yet"
    assert torch.allclose(opt.master[0], torch.full((1000,), 1 - 3e-4), atol=1e-6), "but the master has"
    for _ in range(40):
        w.grad = torch.ones_like(w)
        opt.step(max_norm=1e9)
    assert torch.all(w < 1), "once the master has moved by half an ulp, so does the weight"


def test_a_non_finite_gradient_skips_the_step():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = MasterAdamW([w], lr=1.0)
    w.grad = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.bfloat16)
    assert not torch.isfinite(opt.step(max_norm=1.0))
    assert torch.all(w == 1) and torch.all(opt.master[0] == 1) and w.grad is None


def test_the_masters_survive_a_state_dict_round_trip():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = MasterAdamW([w], lr=1e-4)
    w.grad = torch.ones_like(w)
    opt.step(max_norm=1e9)
    state = opt.state_dict()
    w2 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt2 = MasterAdamW([w2], lr=1e-4)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.master[0], opt.master[0]) and opt2.adamw.state_dict()["state"][0]["step"] == 1
    with pytest.raises(ValueError, match="--dtype"):
        MasterAdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-4).load_state_dict(state)


def trained_weights(out, step):
    """The fp32 weights a run trained: the masters of its last checkpoint where it has them, else the weights."""
    folder = os.path.join(out, "checkpoints", f"step_{step:06d}")
    state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=False)
    model, _ = M.load(folder)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    masters = state["optimizer"]["master"]
    if masters:
        return dict(zip(names, masters))
    return {n: p.detach().float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lr", [1e-6])
def test_bf16_mixed_grpo_steps_move_the_weights_as_float32_does(tmp_path, lr):
    """Real GRPO steps from the shipped base at the 3B preset's learning rate, in bfloat16 (fp32 masters) and in
    float32: the accumulated updates agree in direction and change as many elements. bf16 AdamW in place,
    without masters, changes about 0.3% of them at this lr."""
    flags = ["--model", BASE, "--stages", "open", "--stage-steps", "3", "--prompts-per-step", "4",
             "--group-size", "8", "--micro-batch", "4", "--max-new-tokens", "24", "--lr", str(lr), "--warmup", "0",
             "--schedule", "constant", "--no-phase2", "--eval-n", "0", "--ckpt-every", "3", "--pool-size", "60"]
    base = {n: p.detach().float() for n, p in M.load(BASE)[0].named_parameters()}
    updates = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        train.main(flags + ["--dtype", dtype, "--out", out])
        w = trained_weights(out, 3)
        start = {n: t.to(getattr(torch, dtype)).float() for n, t in base.items()}  # the weights it loaded
        updates[dtype] = torch.cat([(w[n] - start[n]).flatten() for n in base])
    a, b = updates["float32"], updates["bfloat16"]
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    changed = (b != 0).sum().item() / (a != 0).sum().item()
    assert cosine >= 0.9, f"the bf16-mixed update points where the float32 one does (cosine {cosine:.3f})"
    assert changed >= 0.9, f"and changes as many elements ({changed:.1%} of float32's)"
