"""
grpo.py: GRPO, the policy update of Curr-ReFT, as two pure tensor functions.

    adv = group_advantages(rewards, G)                              # (N,), N = B prompts * G completions
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask)    # logp etc. (N, T), mask (N, T)

The advantage is the reward relative to its group (no value network), A_i = (r_i - mean_g(r)) / (std_g(r) + eps),
std unbiased (G - 1), eps = 1e-4 as the release. The per-token loss is the PPO clipped surrogate plus a KL penalty
to the frozen reference, the k3 estimator (>= 0, unbiased under samples of pi; http://joschu.net/blog/kl-approx.html):

    ratio_t = exp(logp_t - old_logp_t)
    L_t     = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * KL_t
    KL_t    = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1

aggregated over the completion tokens (mask = 1), T_max = max_len or the mask width:

    seq      (paper)     1/N * sum_i ( 1/|o_i| * sum_t L_it )     per-completion mean (empty: 0), then mean over N
    token    (DAPO)      sum_it L_it / sum_i |o_i|                 every token weighs the same
    dr_grpo  (Dr. GRPO)  sum_it L_it / (N * T_max)                 no length normalisation

Micro-batches and ranks: given the GLOBAL counts (`num_seqs`, `num_tokens`, a fixed `max_len`) for the local ones,
the losses SUM to exactly the full-batch loss (all_reduce-mean gradients: scale each by the world size). Masking:
where mask = 0, logp, old_logp, ref_logp become 0 (torch.where) BEFORE any arithmetic: NaN or inf there change nothing.

Departures from the paper's release, and why:
- The ratio clip is kept so that several updates per rollout are possible (mu > 1); the release takes one
  (ratio = 1, the clip inert), and old_logp = logp.detach(), agg="seq", beta=0.04 give its loss exactly.
- agg token / dr_grpo: options, off by default, the published fixes of the sequence mean's length bias.
- A group whose rewards are all equal (G = 1 included) gets advantage exactly 0, never NaN: it holds no comparison.
"""

import torch

AGGS = ("seq", "token", "dr_grpo")

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, groups contiguous -> (N,) advantages (r - group mean) / (unbiased std + eps)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"N = {rewards.numel()} rewards cannot be split into groups of {group_size}")
    r = (rewards if rewards.is_floating_point() else rewards.float()).view(-1, group_size)  # (B, G)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])  # (B, 1), unbiased
    adv = (r - r.mean(dim=1, keepdim=True)) / (std + eps)  # (B, G)
    constant = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)  # (B, 1)
    return torch.where(constant, torch.zeros_like(adv), adv).view(-1)  # (N,), exactly 0 for equal rewards

def zero_variance_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (they give no policy gradient)."""
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"N = {rewards.numel()} rewards cannot be split into groups of {group_size}")
    r = rewards.detach().float().view(-1, group_size)  # (B, G)
    return (r.max(dim=1).values == r.min(dim=1).values).float().mean().item()

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04, agg: str = "seq",
              num_seqs: float | None = None, num_tokens: float | None = None,
              max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """(scalar loss, stats of floats): the clipped surrogate + beta * k3 KL, aggregated by `agg`.
    logp, old_logp, ref_logp (None when beta == 0), mask: (N, T); adv: (N,)."""
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if ref_logp is None and beta != 0:
        raise ValueError("ref_logp is required when beta != 0")
    if logp.dim() != 2 or mask.shape != logp.shape or adv.shape != logp.shape[:1]:
        raise ValueError(f"expected logp, mask (N, T) and adv (N,), got {tuple(logp.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(adv.shape)}")
    N, T = logp.shape

    keep = mask.bool()  # (N, T)
    zero = torch.zeros_like(logp)
    logp = torch.where(keep, logp, zero)  # garbage at masked positions can neither leak nor get gradient
    old_logp = torch.where(keep, old_logp.detach(), zero)
    A = adv.detach().to(logp.dtype).unsqueeze(1)  # (N, 1)

    ratio = torch.exp(logp - old_logp)  # (N, T), 1 at masked positions
    per_token = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # (N, T)
    kl = zero  # (N, T), 0 without a reference
    if ref_logp is not None:
        d = torch.where(keep, ref_logp.detach(), zero) - logp  # (N, T), 0 at masked positions
        kl = torch.exp(d) - d - 1  # (N, T), k3
        if beta != 0:
            per_token = per_token + beta * kl
    per_token = torch.where(keep, per_token, zero)  # (N, T)

    tokens_per_seq = keep.sum(dim=1)  # (N,)
    if agg == "seq":
        per_seq = per_token.sum(dim=1) / tokens_per_seq.clamp(min=1).to(per_token.dtype)  # (N,)
        loss = per_seq.sum() / (N if num_seqs is None else num_seqs)
    elif agg == "token":
        loss = per_token.sum() / (tokens_per_seq.sum().clamp(min=1).item() if num_tokens is None else num_tokens)
    else:
        loss = per_token.sum() / ((N if num_seqs is None else num_seqs) * (T if max_len is None else max_len))

    with torch.no_grad():
        n = max(int(keep.sum()), 1)

        def token_mean(x):  # masked token mean of a bool or float (N, T) tensor
            return (x * keep).sum().item() / n

        stats = {
            "loss": loss.item(),
            "kl": token_mean(kl),
            "ratio": token_mean(ratio),
            "clip_low": token_mean((ratio < 1 - clip_eps) & (A < 0)),
            "clip_high": token_mean((ratio > 1 + clip_eps) & (A > 0)),
            "adv_abs": adv.detach().abs().float().mean().item(),
        }
    return loss, stats
