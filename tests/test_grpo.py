"""GRPO advantages and loss: hand-computed values, closed-form gradients, masking, clipping, and the
equivalence with the official Curr-ReFT objective."""

import math

import pytest
import torch

from grpo import group_advantages, grpo_loss, zero_variance_fraction

D = torch.float64
NAN, INF = float("nan"), float("inf")


def close(a, b, tol=1e-9):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_two_groups_by_hand():
    # group 1: [1, 0, 0, 0], mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25 -> std 0.5
    # group 2: [2, 2, 0, 0], mean 1, unbiased var 4 / 3 -> std 2 / sqrt(3); advantages +-sqrt(3) / 2
    r = torch.tensor([1.0, 0, 0, 0, 2, 2, 0, 0], dtype=D)
    h = math.sqrt(3) / 2
    assert close(group_advantages(r, 4, eps=0.0), [1.5, -0.5, -0.5, -0.5, h, h, -h, -h]), "(r - mean) / std per group"
    assert close(group_advantages(r, 4)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=D) / (0.5 + 1e-4)), \
        "eps = 1e-4 is added to the std, as in the release"


def test_unbiased_std():
    # [1, 2, 3, 4]: mean 2.5, squared deviations sum 5; unbiased std sqrt(5/3) = 1.29099, biased sqrt(5/4) = 1.11803
    adv = group_advantages(torch.tensor([1.0, 2, 3, 4], dtype=D), 4, eps=0.0)
    assert close(adv[3], 1.5 / math.sqrt(5 / 3)), "the std divides by G - 1 (torch.std default, official code, TRL)"
    assert not close(adv[3], 1.5 / math.sqrt(5 / 4)), "not the biased std"


def test_degenerate_groups():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 5.0]), 1), torch.zeros(3)), \
        "group size 1: no comparison, advantage 0 and never NaN"
    assert torch.equal(group_advantages(torch.tensor([2.0, 2.0]), 2), torch.zeros(2)), "equal rewards: advantage 0"
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0]), 3, eps=0.0)
    assert torch.all(adv[:3] == 0), "a constant group is exactly 0 (mean rounding, eps=0 too)"
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32, "integer rewards are accepted"
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    assert zero_variance_fraction(torch.tensor([1.0, 0, 3, 3, 2, 2]), 2) == pytest.approx(2 / 3), \
        "two of three groups have all-equal rewards"


# ----------------------------------------------------------------------------- loss: hand example


def hand_batch():
    """Two groups of two. Rewards [1, 0 | 1, 1] -> adv [a, -a, 0, 0], a = 0.5 / std([1, 0]) = 1 / sqrt(2).
    Seq 0 ratios [1.1, 1.3], seq 1 ratio [0.7] (one token), seq 2 [1, 1], seq 3 [1] (one token).
    NaN / inf garbage at the masked positions."""
    adv = group_advantages(torch.tensor([1.0, 0, 1, 1], dtype=D), 2, eps=0.0)
    old = torch.tensor([[-1.0, -2.0], [-1.5, INF], [-0.5, -0.7], [-2.0, NAN]], dtype=D)
    ratio = torch.tensor([[1.1, 1.3], [0.7, NAN], [1.0, 1.0], [1.0, -INF]], dtype=D)
    logp = (old + torch.log(ratio)).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_loss_hand_example_three_aggregations():
    logp, old, adv, mask = hand_batch()
    a = 1 / math.sqrt(2)
    assert close(adv, [a, -a, 0, 0])
    # per-token losses with eps = 0.2:
    #   seq 0 (A = a > 0):  -min(1.1a, 1.1a) = -1.1a;  -min(1.3a, 1.2a) = -1.2a   (clipped high)
    #   seq 1 (A = -a < 0): -min(-0.7a, -0.8a) = 0.8a                            (clipped low)
    #   seqs 2, 3 (A = 0):  0
    per_seq_mean = [-1.15 * a, 0.8 * a, 0, 0]
    token_sum, n_tokens = -1.5 * a, 6
    expected = {
        "seq": sum(per_seq_mean) / 4,  # -0.0875 a
        "token": token_sum / n_tokens,  # -0.25 a
        "dr_grpo": token_sum / (4 * 2),  # -0.1875 a
    }
    for agg, value in expected.items():
        loss, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0, agg=agg)
        assert close(loss, value), f"{agg}: expected {value}, got {loss.item()}"
        assert stats["loss"] == pytest.approx(value)
    _, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    assert stats["clip_high"] == pytest.approx(1 / 6), "one of six tokens has ratio > 1.2 with A > 0"
    assert stats["clip_low"] == pytest.approx(1 / 6), "one of six tokens has ratio < 0.8 with A < 0"
    assert stats["ratio"] == pytest.approx((1.1 + 1.3 + 0.7 + 3) / 6), "masked token mean of the ratio"
    assert stats["adv_abs"] == pytest.approx(a / 2) and stats["kl"] == 0


def test_kl_k3_by_hand():
    # one sequence, logp = old, A = 0; ref - logp = [ln 2, 0] -> k3 = [2 - ln 2 - 1, 0] = [0.306853, 0]
    logp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    ref = logp.detach() + torch.tensor([[math.log(2), 0.0]], dtype=D)
    mask = torch.ones(1, 2, dtype=D)
    loss, stats = grpo_loss(logp, logp.detach(), ref, torch.zeros(1, dtype=D), mask, beta=0.04)
    k3 = 1 - math.log(2)
    assert close(loss, 0.04 * k3 / 2), "beta * mean over the completion's tokens of the k3 estimate"
    assert stats["kl"] == pytest.approx(k3 / 2), "kl is the masked token mean"


# ----------------------------------------------------------------------------- loss: gradients


def random_batch(N=6, T=5, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, T, generator=g, dtype=D) * 3).requires_grad_()
    old = logp.detach() + (torch.rand(N, T, generator=g, dtype=D) * 2 - 1) * spread  # ratios in [e^-0.1, e^0.1]
    ref = logp.detach() + torch.randn(N, T, generator=g, dtype=D) * 0.5
    adv = torch.randn(N, generator=g, dtype=D)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[:, 0] = True  # every completion has at least one token
    return logp, old, ref, adv, mask


def test_gradient_matches_closed_form():
    """Inside the clip range:
    d loss / d logp_it = m_it / (N |o_i|) * (-A_i ratio_it + beta (1 - exp(ref_it - logp_it)))."""
    logp, old, ref, adv, mask = random_batch()
    beta = 0.04
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=beta)
    loss.backward()
    N = logp.shape[0]
    lengths = mask.sum(1, keepdim=True).to(D)
    ratio = torch.exp(logp.detach() - old)
    expected = mask / (N * lengths) * (-adv[:, None] * ratio + beta * (1 - torch.exp(ref - logp.detach())))
    assert close(logp.grad, expected), "gradient of the seq-mean clipped surrogate + k3 KL"


def test_zero_variance_group_gives_no_policy_gradient():
    logp, old, ref, _, mask = random_batch(N=4)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.7, 0.7], dtype=D), 2)  # second group all equal
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.0)
    loss.backward()
    assert torch.all(logp.grad[2:] == 0), "a group with equal rewards has advantage 0 and gives no policy gradient"
    assert torch.any(logp.grad[:2] != 0), "the group with a reward difference does"


def test_kl_vanishes_when_policy_equals_reference():
    logp, _, _, _, mask = random_batch()
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach().clone(), torch.zeros(6, dtype=D), mask, beta=0.04)
    loss.backward()
    assert loss.item() == 0 and stats["kl"] == 0, "k3(0) = e^0 - 0 - 1 = 0"
    assert torch.all(logp.grad == 0), "and its gradient 1 - e^0 = 0"


@pytest.mark.parametrize("A,ratio,clipped", [
    (1.0, 1.1, False), (1.0, 1.3, True), (1.0, 0.5, False),  # A > 0: only ratio > 1 + eps is clipped
    (-1.0, 0.9, False), (-1.0, 0.7, True), (-1.0, 1.5, False),  # A < 0: only ratio < 1 - eps is clipped
])
def test_clipping_engages_only_outside_the_range_in_the_right_direction(A, ratio, clipped):
    old = torch.tensor([[-1.0]], dtype=D)
    logp = (old + math.log(ratio)).requires_grad_()
    loss, stats = grpo_loss(logp, old, None, torch.tensor([A], dtype=D), torch.ones(1, 1), clip_eps=0.2, beta=0.0)
    loss.backward()
    expected_grad = 0.0 if clipped else -A * ratio  # d(-ratio A)/d logp = -A ratio
    assert logp.grad.item() == pytest.approx(expected_grad), f"A={A}, ratio={ratio}: clipped={clipped}"
    assert stats["clip_high" if A > 0 else "clip_low"] == float(clipped), "the clip fraction counts it"
    assert stats["clip_low" if A > 0 else "clip_high"] == 0


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
def test_masked_tokens_never_contribute(agg):
    logp, old, ref, adv, mask = random_batch(seed=1)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, agg=agg)
    (grad,) = torch.autograd.grad(loss, logp)
    for garbage in (123.0, -1e4, NAN, INF, -INF):
        logp2 = torch.where(mask, logp.detach(), torch.full_like(logp, garbage)).requires_grad_()
        old2 = torch.where(mask, old, torch.full_like(old, -garbage))
        ref2 = torch.where(mask, ref, torch.full_like(ref, garbage))
        loss2, stats = grpo_loss(logp2, old2, ref2, adv, mask, agg=agg)
        (grad2,) = torch.autograd.grad(loss2, logp2)
        assert close(loss2, loss), f"{agg}: garbage {garbage} at masked positions changed the loss"
        assert close(grad2, grad), f"{agg}: garbage {garbage} changed the gradient"
        assert torch.all(grad2[~mask] == 0), "masked positions get exactly zero gradient"
        assert all(math.isfinite(v) for v in stats.values()), "stats stay finite"


def test_equals_official_objective_with_one_update_per_batch():
    """Release: per_token = exp(logp - logp.detach()) * A; loss = -(per_token - beta * k3), masked mean per
    sequence, then mean over sequences. Same value and same gradient."""
    logp, _, ref, adv, mask = random_batch(seed=2)
    m = mask.to(D)
    beta = 0.04
    d = ref - logp
    kl = torch.exp(d) - d - 1
    per_token = -(torch.exp(logp - logp.detach()) * adv[:, None] - beta * kl)
    official = ((per_token * m).sum(1) / m.sum(1)).mean()
    (grad_official,) = torch.autograd.grad(official, logp)

    ours, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, clip_eps=0.2, beta=beta, agg="seq")
    (grad_ours,) = torch.autograd.grad(ours, logp)
    assert close(ours, official), "loss value equals the official objective"
    assert close(grad_ours, grad_official), "gradient equals the official objective's"


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
def test_global_normaliser_makes_micro_batches_add_up(agg):
    """Split the batch into micro-batches (or ranks), pass the global counts: the summed losses equal the full loss."""
    logp, old, ref, adv, mask = random_batch(N=6, T=5, seed=3, spread=0.5)
    full, _ = grpo_loss(logp, old, ref, adv, mask, agg=agg)
    counts = dict(num_seqs=6, num_tokens=int(mask.sum()), max_len=5)
    parts = [grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], agg=agg, **counts)[0]
             for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    assert close(sum(parts), full), f"{agg}: micro-batch losses with global counts must sum to the full loss"


def test_argument_errors():
    logp, old, ref, adv, mask = random_batch()
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(logp, old, ref, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="expected"):
        grpo_loss(logp, old, ref, adv[:3], mask)
    loss, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    assert stats["kl"] == 0, "no reference, no KL"
