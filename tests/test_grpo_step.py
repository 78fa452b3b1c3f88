"""train.grpo_step, the wiring of one GRPO step, on the shipped tiny base with a fixed rollout: its gradient equals
grpo.grpo_loss built by hand on the whole batch for every micro-batch size, its statistics equal hand values, the
reference model sees the image, one SGD step moves each answer's log-probability with its advantage's sign, and
with mu > 1 the old log-probabilities are the policy's before the update, so the ratio moves and the clip acts."""
import copy
import dataclasses
import os
import random

import pytest
import torch

import curriculum
import data
import grpo
import model as M
import rewards
import rollout
import train
from config import make_config
from data import samples_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "assets", "tiny-base")
P, G, T_NEW = 4, 4, 24


@pytest.fixture(scope="module")
def base():
    policy, processor = M.load(BASE)
    return policy, processor


def choice_rows():
    """Three choice questions and one replayed open question (scored by the open rules)."""
    rows = data.make_split("train", P, seed=3)
    staged = [curriculum.make_stage_row(r, "choice", random.Random(i)) for i, r in enumerate(rows[:3])]
    return staged + [{**rows[3], "stage": "open", "replay": True}]


def fixed_rollout(policy, processor, rows):
    """A real sampled rollout whose first answer per group is replaced by the reference answer, so that every
    group holds a right answer and most groups have unequal rewards (non-zero advantages). The texts are what
    the rewards read; the log-probabilities are of the sampled token ids."""
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(rows))]
    ro = rollout.generate(policy.eval(), processor, samples_of(rows), group_size=G, max_new_tokens=T_NEW,
                          generator=gens)
    for b, row in enumerate(rows):
        ro.texts[b * G] = data.reference_completion(row)
    return ro


def config(**rl):
    cfg = make_config(["--group-size", str(G), "--prompts-per-step", str(P), "--max-new-tokens", str(T_NEW)])
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **{"grad_clip": 1e9, **rl}))  # no clip: exact grads


class GradientRecorder:
    """An optimizer that does not step: it keeps a copy of the gradient it was asked to apply."""

    def __init__(self, model):
        self.model, self.grads, self.param_groups = model, [], [{"lr": 0.0}]

    def step(self, max_norm):  # clips as optim.MasterAdamW.step does, records, clears
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})
        self.model.zero_grad(set_to_none=True)
        return norm


class SGD(torch.optim.SGD):
    """SGD with the interface of optim.MasterAdamW: step(max_norm) clips, steps when finite, clears, returns the norm."""

    def step(self, max_norm):
        norm = torch.nn.utils.clip_grad_norm_([p for group in self.param_groups for p in group["params"]], max_norm)
        if torch.isfinite(norm):
            super().step()
        self.zero_grad(set_to_none=True)
        return norm


def hand_scores(rows, texts, cfg, stage="choice"):
    """rewards.score of each answer in its row's form (a replayed row by the open rules), with cfg's options."""
    return [rewards.score(t, rows[n // G]["solution"], rows[n // G]["task"],
                          "open" if rows[n // G].get("replay") else stage,
                          choice_partial=cfg.rl.choice_partial, box_mode=cfg.rl.box_reward)
            for n, t in enumerate(texts)]


def hand_rewards(rows, texts, cfg, stage="choice"):
    return torch.tensor([s["total"] for s in hand_scores(rows, texts, cfg, stage)])


def hand_step(policy, ref, processor, rows, ro, cfg):
    """grpo_loss on the whole batch, encoded afresh: (loss, stats, gradient by name, advantages)."""
    batch = M.encode(processor, samples_of(rows))
    T = int(ro.mask.sum(1).max())
    ids, mask = ro.completion_ids[:, :T], ro.mask[:, :T]
    adv = grpo.group_advantages(hand_rewards(rows, ro.texts, cfg), G)
    policy.zero_grad(set_to_none=True)
    logp = M.completion_logprobs(policy.train(), batch, ids, mask)
    with torch.no_grad():
        ref_logp = M.completion_logprobs(ref, batch, ids, mask)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), ref_logp, adv, mask, beta=cfg.rl.beta, agg=cfg.rl.agg,
                                 max_len=cfg.rl.max_new_tokens)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    return loss.item(), stats, grads, adv


@pytest.fixture(scope="module")
def setup(base):
    policy, processor = base
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():                      # a reference away from the policy, so the KL term has a gradient
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = choice_rows()
    return policy, ref, processor, rows, fixed_rollout(policy, processor, rows)


def run_step(monkeypatch, policy, ref, processor, rows, ro, cfg, opt):
    monkeypatch.setattr(rollout, "generate", lambda *a, **kw: ro)
    return train.grpo_step(policy, ref, processor, rows, "choice", G, cfg, opt, 0, "cpu", 0)


@pytest.mark.parametrize("agg", ["seq", "token", "dr_grpo"])
def test_the_gradient_is_grpo_loss_on_the_whole_batch_for_every_micro_batch(setup, monkeypatch, agg):
    policy, ref, processor, rows, ro = setup
    cfg = config(agg=agg)
    loss, hand, want, adv = hand_step(policy, ref, processor, rows, ro, cfg)
    assert (adv > 0).any() and (adv < 0).any(), "the fixed rollout must have advantages of both signs"
    for mb in (P, P // 2, 1):   # P reuses the rollout's encoding; fewer prompts re-encode their own
        opt = GradientRecorder(policy)
        stats, _ = run_step(monkeypatch, policy, ref, processor, rows, ro, config(agg=agg, micro_batch=mb), opt)
        got = opt.grads[0]
        assert set(got) == set(want)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-7, rtol=1e-4), \
                f"{agg}, micro-batch {mb}: the gradient of {name} must equal grpo_loss's on the whole batch"
        norm = torch.cat([g.flatten() for g in want.values()]).norm().item()
        assert stats["grad_norm"] == pytest.approx(norm, rel=1e-4), "grad_norm is the norm of that gradient"
        assert stats["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-8), "the loss is the whole batch's"
        assert stats["kl"] == pytest.approx(hand["kl"], rel=1e-5), "the KL is the whole batch's token mean"


def test_the_step_statistics_are_hand_values(setup, monkeypatch):
    policy, ref, processor, rows, ro = setup
    cfg = config()
    stats, samples = run_step(monkeypatch, policy, ref, processor, rows, ro, cfg, GradientRecorder(policy))
    parts = hand_scores(rows, ro.texts, cfg)
    own, replayed = parts[:3 * G], parts[3 * G:]          # rows 0-2 are choice questions, row 3 replayed
    for key in ("total", "accuracy", "format"):
        assert stats[f"reward_{key}"] == pytest.approx(sum(s[key] for s in own) / len(own)), \
            f"reward_{key} is the mean over the stage's own answers, replayed ones apart"
    assert stats["replay_accuracy"] == pytest.approx(sum(s["accuracy"] for s in replayed) / len(replayed))
    assert replayed[0]["accuracy"] == 1.0, "the replayed reference answer is right by the open rules"
    r = torch.tensor([s["total"] for s in parts]).view(P, G)
    assert stats["zero_var"] == pytest.approx((r.max(1).values == r.min(1).values).float().mean().item())
    assert stats["length"] == pytest.approx(ro.mask.sum().item() / (P * G)), "mean answer length in tokens"
    assert stats["skipped"] == 0 and stats["clip_low"] == stats["clip_high"] == 0.0, "mu = 1: ratio 1, no clip"
    assert [s["answer"] for s in samples] == ro.texts[:2 * G] and samples[0]["total"] == parts[0]["total"]


@pytest.mark.parametrize("finite", [True, False])
def test_two_identical_ranks_log_one_ranks_statistics(setup, monkeypatch, request, finite):
    """Statistics are global: two ranks with the same prompts and answers (every sum over ranks twice one rank's)
    log what one rank alone logs, the skipped updates included (the gradient norm is already global)."""
    if not finite:
        request.getfixturevalue("non_finite_loss")
    policy, ref, processor, rows, ro = setup
    one, _ = run_step(monkeypatch, policy, ref, processor, rows, ro, config(), GradientRecorder(policy))
    monkeypatch.setattr(train, "world_size", lambda: 2)
    monkeypatch.setattr(train, "all_reduce_sum", lambda x: x * 2)
    two, _ = train.grpo_step(policy, ref, processor, rows + rows, "choice", G, config(), GradientRecorder(policy), 0,
                             "cpu", 0)                                   # rank 0 of 2 takes the first P prompts
    assert one["skipped"] == two["skipped"] == (0 if finite else 1)
    for key in ("reward_total", "reward_accuracy", "reward_format", "replay_accuracy", "zero_var", "length", "loss",
                "kl", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, nan_ok=True), f"{key}: a global statistic"


def test_a_mixed_stage_scores_each_answer_in_its_own_rows_form(base, monkeypatch):
    """--stages mixed: a batch of judge, choice and open rows; each answer is rewarded by its row's form."""
    policy, processor = base
    open_rows = data.make_split("train", P, seed=5)
    rows = [curriculum.make_stage_row(r, f, random.Random(i), truth=True)
            for i, (r, f) in enumerate(zip(open_rows, ("judge", "choice", "open", "judge")))]
    ro = fixed_rollout(policy, processor, rows)
    cfg = config()
    monkeypatch.setattr(rollout, "generate", lambda *a, **kw: ro)
    stats, _ = train.grpo_step(policy, copy.deepcopy(policy).eval(), processor, rows, "mixed", G, cfg,
                               GradientRecorder(policy), 0, "cpu", 0)
    want = [rewards.score(t, rows[n // G]["solution"], rows[n // G]["task"], rows[n // G]["stage"],
                          choice_partial=cfg.rl.choice_partial)["total"] for n, t in enumerate(ro.texts)]
    assert stats["reward_total"] == pytest.approx(sum(want) / len(want))
    assert want[0] == want[2 * G] == want[3 * G] == 2.0, "the reference answers are right in their own forms"


def test_the_reference_sees_the_image_and_starts_equal(base, monkeypatch):
    policy, processor = base
    rows = choice_rows()
    ro = fixed_rollout(policy, processor, rows)
    calls = []
    logprobs = M.completion_logprobs

    def spy(model, batch, *args, **kwargs):
        calls.append((model, batch))
        return logprobs(model, batch, *args, **kwargs)
    monkeypatch.setattr(M, "completion_logprobs", spy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)    # the stage's start: reference == policy
    stats, _ = run_step(monkeypatch, policy, ref, processor, rows, ro, config(), GradientRecorder(policy))
    (ref_model, ref_batch), = [(m, b) for m, b in calls if m is ref]
    policy_batch = next(b for m, b in calls if m is policy)
    assert torch.equal(ref_batch["pixel_values"], policy_batch["pixel_values"]) and \
        torch.equal(ref_batch["image_grid_thw"], policy_batch["image_grid_thw"]), "the reference is given the image"
    assert stats["kl"] < 1e-7, f"a reference equal to the policy has KL 0 at the first step, got {stats['kl']}"


def per_answer_logp(policy, processor, rows, ro):
    with torch.no_grad():
        batch = M.encode(processor, samples_of(rows))
        logp = M.completion_logprobs(policy.eval(), batch, ro.completion_ids, ro.mask)
    return (logp * ro.mask).sum(1)                                    # (N,) log pi(answer)


def test_one_sgd_step_moves_each_answer_with_its_advantage(base, monkeypatch):
    policy, processor = base
    policy = copy.deepcopy(policy)
    rows = choice_rows()
    ro = fixed_rollout(policy, processor, rows)
    cfg = config(beta=0.0)
    adv = grpo.group_advantages(hand_rewards(rows, ro.texts, cfg), G)
    before = per_answer_logp(policy, processor, rows, ro)
    run_step(monkeypatch, policy, None, processor, rows, ro, cfg, SGD(policy.parameters(), lr=1e-3))
    change = per_answer_logp(policy, processor, rows, ro) - before
    # Answers share tokens, so one answer's update can move another's against its sign; on average and weighted
    # by the advantage (the first-order change of the objective) the direction is fixed.
    assert change[adv > 0].mean() > 0, f"answers better than their group become likelier: {change[adv > 0]}"
    assert change[adv < 0].mean() < 0, f"answers worse than their group become less likely: {change[adv < 0]}"
    assert (adv * change).sum() > 0, "the step raises the advantage-weighted log-likelihood (the GRPO objective)"


def test_mu_above_one_uses_the_policy_before_the_update(base, monkeypatch):
    policy, processor = base
    policy = copy.deepcopy(policy)
    rows = choice_rows()
    ro = fixed_rollout(policy, processor, rows)
    T = int(ro.mask.sum(1).max())
    with torch.no_grad():
        before = M.completion_logprobs(policy.eval(), M.encode(processor, samples_of(rows)),
                                       ro.completion_ids[:, :T], ro.mask[:, :T])
    calls = []
    loss_fn = grpo.grpo_loss

    def spy(logp, old_logp, *args, **kwargs):
        loss, stats = loss_fn(logp, old_logp, *args, **kwargs)
        calls.append((logp.detach().clone(), old_logp.clone(), stats))
        return loss, stats
    monkeypatch.setattr(grpo, "grpo_loss", spy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    stats, _ = run_step(monkeypatch, policy, ref, processor, rows, ro, config(mu=3, micro_batch=P // 2),
                        SGD(policy.parameters(), lr=1.0))
    assert len(calls) == 3 * 2, "mu = 3 passes over 2 micro-batches"
    olds = torch.cat([old for _, old, _ in calls[:2]])
    for k, (_, old, _) in enumerate(calls):
        assert torch.allclose(old, olds[(k % 2) * (P // 2) * G:((k % 2) + 1) * (P // 2) * G]), \
            "every pass keeps the same old log-probabilities"
    assert torch.allclose(olds, before, atol=1e-5), "old log-probabilities are the policy's before the update"
    mask = ro.mask[:, :T].bool()
    first = torch.cat([logp for logp, _, _ in calls[:2]])
    assert torch.allclose(first[mask], olds[mask], atol=1e-5), "the first pass starts at ratio 1"
    last = torch.cat([logp for logp, _, _ in calls[4:]])
    assert (last - olds)[mask].abs().max() > 0.2, "after two updates the ratio has moved"
    assert sum(s["clip_low"] + s["clip_high"] for _, _, s in calls[2:]) > 0, "and the clip acts"
    assert stats["clip_low"] + stats["clip_high"] > 0, "the step reports the clipped fraction"


def test_a_non_finite_loss_skips_the_update(base, monkeypatch, non_finite_loss):
    policy, processor = base
    policy = copy.deepcopy(policy)
    rows = choice_rows()
    ro = fixed_rollout(policy, processor, rows)
    before = [p.detach().clone() for p in policy.parameters()]
    stats, _ = run_step(monkeypatch, policy, None, processor, rows, ro, config(beta=0.0),
                        SGD(policy.parameters(), lr=0.1))
    assert stats["skipped"] == 1, "a non-finite gradient is counted as a skipped update"
    assert all(torch.equal(a, p) for a, p in zip(before, policy.parameters())), "and the weights are left alone"
    assert all(p.grad is None for p in policy.parameters()), "and its gradient is dropped"


def test_the_rollout_is_sampled_as_the_config_says(base, monkeypatch):
    policy, processor = base
    rows = choice_rows()
    ro = fixed_rollout(policy, processor, rows)
    asked = {}

    def spy(model, processor_, samples, **kwargs):
        asked.update(kwargs, samples=samples, model=model)
        return ro
    monkeypatch.setattr(rollout, "generate", spy)
    cfg = config(temperature=0.7)
    train.grpo_step(policy, None, processor, rows, "choice", G, dataclasses.replace(cfg, rl=dataclasses.replace(
        cfg.rl, beta=0.0)), GradientRecorder(policy), 0, "cpu", 41)
    assert asked["model"] is policy and [s["problem"] for s in asked["samples"]] == [r["problem"] for r in rows]
    assert (asked["group_size"], asked["max_new_tokens"], asked["temperature"]) == (G, T_NEW, 0.7), \
        "the rollout samples with the configured G, length and temperature"
    want = [g.initial_seed() for g in rollout.prompt_generators(cfg.run.seed, 41, 0, P, "cpu")]
    assert [g.initial_seed() for g in asked["generator"]] == want, "one generator per prompt, seeded by the step"
    assert len(set(want)) == P


def test_the_configured_reward_options_and_gradient_clip_are_used(setup, monkeypatch):
    policy, ref, processor, rows, ro = setup
    assert rows[3]["task"] == "detection"
    x1, y1, x2, y2 = rows[3]["meta"]["answer"]
    ro = dataclasses.replace(ro, texts=list(ro.texts))     # a replayed box of IoU 1/3: hard reward 0, IoU 1/3
    shift = (x2 - x1) // 2
    ro.texts[3 * G + 1] = f"<think>a box</think><answer>[{x1 + shift}, {y1}, {x2 + shift}, {y2}]</answer>"
    rows = list(rows)                                        # a two-letter question answered by one right letter
    rows[1] = {**rows[1], "solution": "<answer>A, C</answer>"}
    ro.texts[G] = "<think>one of them</think><answer>C</answer>"
    cfg = config(choice_partial=0.5, box_reward="iou", grad_clip=0.01)
    opt = GradientRecorder(policy)
    stats, _ = run_step(monkeypatch, policy, ref, processor, rows, ro, cfg, opt)
    parts = hand_scores(rows, ro.texts, cfg)                # choice_partial 0.5, box_reward iou
    assert parts[G]["accuracy"] == 0.5, "the proper subset earns --choice-partial"
    assert stats["reward_total"] == pytest.approx(sum(s["total"] for s in parts[:3 * G]) / (3 * G))
    assert stats["replay_accuracy"] == pytest.approx(sum(s["accuracy"] for s in parts[3 * G:]) / G)
    assert 0 < stats["replay_accuracy"] < 1 and stats["replay_accuracy"] not in (0.25, 0.5, 0.75), \
        "the replayed box question is scored by IoU, not hit-or-miss"
    clipped = torch.cat([g.flatten() for g in opt.grads[0].values()]).norm().item()
    assert stats["grad_norm"] > 0.01 and clipped == pytest.approx(0.01, rel=1e-4), \
        "the update's gradient is clipped to --grad-clip; the log shows the norm before the clip"
