"""rollout.py: the hand-written KV-cache group sampler against transformers and against the uncached loop."""
import pytest
import torch
from PIL import Image

import model as M
import rollout
from rollout import generate


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def any_tiny(request):
    model, processor = M.build_tiny(model_type=request.param, seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def tiny():
    model, processor = M.load("tiny", seed=0)
    return model.eval(), processor


def prompts():
    """Three images of different sizes and prompts of different lengths (so rows are left padded)."""
    return [{"image": Image.new("RGB", (112, 112), (220, 40, 40)), "problem": "How many shapes?"},
            {"image": Image.new("RGB", (56, 84), (40, 40, 220)), "problem": "Is there a blue square? Answer yes or no."},
            {"image": Image.new("RGB", (140, 112), (40, 200, 40)), "problem": "Name the colours you see in this image."}]


def test_greedy_matches_transformers_generate(any_tiny):
    model, processor = any_tiny
    T = 24
    ours = generate(model, processor, prompts(), max_new_tokens=T, greedy=True)
    batch = M.encode(processor, prompts())
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=T, do_sample=False, eos_token_id=processor.stop_token_ids,
                             pad_token_id=processor.pad_token_id, suppress_tokens=processor.vision_token_ids)
    ref = ref[:, batch["input_ids"].shape[1]:]
    for n in range(3):
        L = int(ours.lengths[n])
        assert ours.completion_ids[n, :L].tolist() == ref[n, :L].tolist(), \
            f"row {n}: greedy decoding must equal transformers' generate token for token"


def test_tiny_init_does_not_collapse(tiny):
    model, processor = tiny
    r = generate(model, processor, prompts(), max_new_tokens=24, greedy=True)
    for n in range(3):
        assert len(set(r.completion_ids[n].tolist())) >= 2, "a random init must not repeat one token forever"
    assert len({tuple(x) for x in r.completion_ids.tolist()}) == 3, "different prompts must give different answers"


def test_cached_equals_uncached(any_tiny):
    model, processor = any_tiny
    for greedy in (True, False):
        kw = dict(group_size=2, max_new_tokens=12, greedy=greedy)
        a = generate(model, processor, prompts(), generator=torch.Generator().manual_seed(3), **kw)
        b = generate(model, processor, prompts(), generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
        assert torch.equal(a.completion_ids, b.completion_ids), f"greedy={greedy}: KV cache must not change tokens"
        assert torch.allclose(a.logp, b.logp, atol=1e-5)


def test_group_equals_repeated_prompts(any_tiny):
    model, processor = any_tiny
    G = 3
    grouped = generate(model, processor, prompts(), group_size=G, max_new_tokens=10, greedy=True)
    repeated = generate(model, processor, [p for p in prompts() for _ in range(G)], max_new_tokens=10, greedy=True)
    assert torch.equal(grouped.completion_ids, repeated.completion_ids), "cache replication = repeating prompts"
    assert grouped.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_seeded_sampling_is_reproducible_and_groups_vary(tiny):
    model, processor = tiny
    kw = dict(group_size=4, max_new_tokens=12)
    a = generate(model, processor, prompts(), generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, processor, prompts(), generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, processor, prompts(), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids), "same seed must give the same samples"
    assert not torch.equal(a.completion_ids, c.completion_ids), "another seed must give other samples"
    for g in range(3):
        rows = {tuple(x) for x in a.completion_ids[g * 4:(g + 1) * 4].tolist()}
        assert len(rows) > 1, f"group {g}: sampled answers of one prompt must differ"
    # One generator per prompt: a prompt's samples do not depend on the other prompts of the batch.
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    full = generate(model, processor, prompts(), generator=gens(), **kw)
    alone = generate(model, processor, prompts()[1:2], generator=gens()[1:2], **kw)
    assert torch.equal(full.completion_ids[4:8, :alone.completion_ids.shape[1]], alone.completion_ids)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["plain", "tempered_filtered"])
def test_recorded_logprobs_equal_teacher_forced(any_tiny, sampling):
    """Temperature, top-k and top-p only shape the sampling: the recorded log-probs stay those of the
    unmodified model (temperature 1, no filtering), which completion_logprobs recomputes for the ratio."""
    model, processor = any_tiny
    r = generate(model, processor, prompts(), group_size=2, max_new_tokens=16,
                 generator=torch.Generator().manual_seed(0), **sampling)
    with torch.no_grad():
        lp = M.completion_logprobs(model, r.batch, r.completion_ids, r.mask)
    assert torch.allclose(lp * r.mask, r.logp, atol=1e-4), \
        f"{sampling}: log-probs recorded while decoding = teacher-forced log-probs of the unmodified model"


def force_token(model, token_id, at_step, row=None, bonus=1e4):
    """Hook on lm_head: make `token_id` the largest logit of every row from decode call `at_step` on, or of batch row
    `row` at that call only (the batch drops its ended rows later, so a row index names another row then)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] - 1 == at_step or (row is None and calls["n"] - 1 > at_step):
            output = output.clone()
            output[(slice(None) if row is None else row), ..., token_id] += bonus  # (n, 1, V) or (n, V)
            return output

    return model.lm_head.register_forward_hook(hook)


def test_first_eos_is_inside_the_mask_and_stops_the_row(tiny):
    model, processor = tiny
    eos = processor.eos_token_id
    handle = force_token(model, eos, at_step=3, row=0)  # call 0 is the prefill, so row 0 emits EOS as token 4
    try:
        r = generate(model, processor, prompts(), max_new_tokens=8, greedy=True)
    finally:
        handle.remove()
    assert r.completion_ids[0, 3] == eos and r.finished.tolist() == [True, False, False]
    assert r.mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0], "the first EOS is a real action inside the mask"
    assert (r.completion_ids[0, 4:] == processor.pad_token_id).all() and (r.logp[0, 4:] == 0).all()
    assert r.mask[1:].all() and r.lengths.tolist() == [4, 8, 8]
    assert torch.equal(r.lengths, r.mask.sum(1).long()), "lengths count the ones of the mask"
    assert "<|im_end|>" not in r.texts[0]
    assert r.texts[0] == processor.tokenizer.decode(r.completion_ids[0, :3])


def test_stops_early_when_every_row_is_done(tiny):
    model, processor = tiny
    handle = force_token(model, processor.eos_token_id, at_step=2)
    try:
        r = generate(model, processor, prompts(), group_size=2, max_new_tokens=50,
                     generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert r.completion_ids.shape[1] == 3 and r.finished.all(), "the loop ends once every row has stopped"


def test_vision_tokens_are_never_sampled(tiny):
    model, processor = tiny
    handles = [force_token(model, t, at_step=0) for t in processor.vision_token_ids]
    try:
        for greedy in (True, False):
            r = generate(model, processor, prompts(), group_size=4, max_new_tokens=6, greedy=greedy,
                         generator=torch.Generator().manual_seed(0))
            assert not torch.isin(r.completion_ids, torch.tensor(processor.vision_token_ids)).any(), \
                "vision special tokens must never be sampled, even as the largest logits"
    finally:
        for h in handles:
            h.remove()


def test_top_k_and_top_p_restrict_the_support():
    from rollout import sample_next
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(len(logits), generator=g)
    assert set(sample_next(logits, u(), top_k=2).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # p = 0.636, 0.234, 0.086, 0.032, 0.012: top two hold p0 + p1 = 0.87
    assert p[0] < 0.8 < p[0] + p[1]  # so top_p = 0.8 keeps exactly them
    assert set(sample_next(logits, u(), top_p=0.8).tolist()) == {0, 1}
    even = torch.zeros(2000, 4)  # four tokens of 0.25: two reach top_p = 0.5 exactly, and a third is not needed
    assert set(sample_next(even, u(), top_p=0.5).tolist()) == {0, 1}
    assert set(sample_next(logits, u(), temperature=100.0).tolist()) == {0, 1, 2, 3, 4}
    # Temperature divides the logits. At 1, token 0 has p0 = e^3 / (e^3 + e^2 + e + 1 + 1/e) = 0.636
    # (2000 draws: standard error 0.011); at 0.05 the gap of 1 becomes 20 (p1 / p0 = e^-20 = 2e-9), only
    # the argmax is drawn; at 100 the distribution is near uniform (p0 = 0.204).
    share0 = lambda t: (sample_next(logits, u(), temperature=t) == 0).float().mean().item()
    assert 0.60 < share0(1.0) < 0.67, "temperature 1 samples the softmax of the logits as they are"
    assert (sample_next(logits, u(), temperature=0.05) == 0).all(), "a low temperature gives the argmax"
    assert share0(100.0) < 0.3, "a high temperature flattens the distribution: token 0 falls from 0.64 to ~0.2"


def test_text_only_and_mixed_batches(tiny):
    model, processor = tiny
    mixed = prompts()[:1] + [{"image": None, "problem": "What is 2 plus 3?"}]
    a = generate(model, processor, mixed, max_new_tokens=8, greedy=True)
    b = generate(model, processor, mixed[1:], max_new_tokens=8, greedy=True)
    assert torch.equal(a.completion_ids[1], b.completion_ids[0]), "a text-only row is unaffected by an image row"


def test_bad_arguments(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="group_size"):
        generate(model, processor, prompts(), group_size=0)
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, processor, prompts(), generator=[torch.Generator()])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, processor, prompts(), temperature=0.0)


def test_the_cache_is_preallocated_and_written_in_place(any_tiny, monkeypatch):
    """Every decode step writes into the same buffers, sized for prompt + max_new_tokens, and attends to a view of
    them: no copy of the cache per step (transformers' DynamicLayer concatenates)."""
    import rollout
    model, processor = any_tiny
    seen, update = {}, rollout.PreallocatedLayer.update

    def spy(self, keys, values, *args, **kwargs):
        out = update(self, keys, values, *args, **kwargs)
        seen.setdefault(id(self), []).append((self.k_buf.data_ptr(), out[0].data_ptr(), out[1].data_ptr(),
                                              self.v_buf.data_ptr(), out[0].shape[2]))
        return out
    monkeypatch.setattr(rollout.PreallocatedLayer, "update", spy)
    T, G = 6, 2
    ro = generate(model, processor, prompts(), group_size=G, max_new_tokens=T, greedy=True)
    L = M.encode(processor, prompts())["input_ids"].shape[1]
    assert len(seen) == model.config.get_text_config().num_hidden_layers
    for steps in seen.values():
        assert len(steps) == ro.completion_ids.shape[1] - 1, "one write per decoded token after the first"
        assert all(k == ok and v == ov for k, ok, ov, v, _ in steps), "views of the buffers, not copies"
        assert len({k for k, *_ in steps}) == 1, "the same buffer at every step"
        assert [n for *_, n in steps] == list(range(L + 1, L + len(steps) + 1)), "the prefix grows by one a step"


def test_checking_for_the_end_every_k_steps_only_adds_padding(monkeypatch):
    """On a GPU the loop checks every 8 steps whether all rows ended: the answers, masks and log-probs are those of
    a check every step, followed by pad columns (the shipped base, whose answers end)."""
    import os
    import data
    import rollout
    model, processor = M.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-base"))
    rows = data.samples_of(data.make_rows("train", 4, seed=0))
    monkeypatch.setattr(rollout, "SHRINK_AT", 0)  # a batch that keeps its rows: the same sums in the same shapes
    every = generate(model.eval(), processor, rows, group_size=2, max_new_tokens=80, greedy=True)
    assert every.finished.all() and every.completion_ids.shape[1] < 64, "the rows must end well before the limit"
    monkeypatch.setitem(rollout.CHECK_EVERY, "cpu", 16)
    rare = generate(model, processor, rows, group_size=2, max_new_tokens=80, greedy=True)
    T = every.completion_ids.shape[1]
    assert rare.completion_ids.shape[1] % 16 == 0 and rare.completion_ids.shape[1] >= T
    assert rare.texts == every.texts and torch.equal(rare.lengths, every.lengths)
    assert torch.equal(rare.completion_ids[:, :T], every.completion_ids)
    assert (rare.completion_ids[:, T:] == processor.pad_token_id).all() and rare.mask[:, T:].sum() == 0
    assert torch.equal(rare.logp[:, :T], every.logp) and rare.logp[:, T:].abs().sum() == 0


def test_dropping_the_ended_rows_from_the_batch_changes_no_answer(monkeypatch):
    """The batch shrinks to its rows still going (rollout.SHRINK_AT): the same sampled answers, lengths and ends
    as a batch that keeps every row to the last step, log-probs equal to float rounding, and it did shrink."""
    import os
    import data
    import rollout
    model, processor = M.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-base"))
    rows = data.samples_of(data.make_rows("train", 6, seed=1))
    widths = []
    select = rollout.PreallocatedLayer.select
    monkeypatch.setattr(rollout.PreallocatedLayer, "select",
                        lambda self, r: (widths.append(len(r)), select(self, r))[1])

    def run():
        return generate(model.eval(), processor, rows, group_size=4, max_new_tokens=64,
                        generator=rollout.prompt_generators(0, 3, 0, len(rows), "cpu"))
    shrunk = run()
    assert widths and min(widths) < 24 / 2, f"the batch of 24 rows must shrink as they end (widths {widths})"
    monkeypatch.setattr(rollout, "SHRINK_AT", 0)
    n = len(widths)
    whole = run()
    assert len(widths) == n, "SHRINK_AT = 0 keeps every row"
    assert shrunk.texts == whole.texts and torch.equal(shrunk.completion_ids, whole.completion_ids)
    assert torch.equal(shrunk.lengths, whole.lengths) and torch.equal(shrunk.finished, whole.finished)
    assert torch.allclose(shrunk.logp, whole.logp, atol=1e-5) and torch.equal(shrunk.mask, whole.mask)


def test_the_decode_step_by_hand_equals_transformers_forward(any_tiny, monkeypatch):
    """On a CPU each decode step runs by hand (rollout.decode_step): the same sampled answers as transformers'
    forward, log-probs equal to float rounding, with left-padded prompts, groups, and a batch that shrinks."""
    import rollout
    model, processor = any_tiny
    calls, decode_step = [], rollout.decode_step
    monkeypatch.setattr(rollout, "decode_step", lambda *a: (calls.append(1), decode_step(*a))[1])
    monkeypatch.setattr(rollout, "SHRINK_AT", 1.0)  # shrink at the first row that ends
    eos = processor.eos_token_id
    runs = {}
    for by_hand in (True, False):
        monkeypatch.setattr(rollout, "decodes_by_hand", lambda m, b=by_hand: b)
        handle = force_token(model, eos, at_step=5, row=1)   # one row ends early: the batch then drops it
        try:
            runs[by_hand] = generate(model, processor, prompts(), group_size=3, max_new_tokens=16,
                                     generator=rollout.prompt_generators(0, 1, 0, 3, "cpu"))
        finally:
            handle.remove()
        assert bool(calls) == by_hand, "the step by hand runs where decodes_by_hand says so, and only there"
        calls.clear()
    hand, hf = runs[True], runs[False]
    assert hand.lengths[1] == 6 and hand.lengths.max() == 16, "a row must end early while the others go on"
    assert hand.texts == hf.texts and torch.equal(hand.completion_ids, hf.completion_ids)
    assert torch.allclose(hand.logp, hf.logp, atol=1e-5), (hand.logp - hf.logp).abs().max()


def test_the_decode_steps_pieces_compute_transformers_values_bit_for_bit(any_tiny):
    """rollout.rms_norm, decode_weights' projections (q/k/v fused) through rollout.linear and rotary with rotary_tables
    compute what the model's RMSNorm module, its projections and transformers' apply_rotary_pos_emb do, to the bit, at
    batch sizes on both sides of the BLAS's small-matrix path (random weights and biases: none is 0 or 1)."""
    import copy
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb
    import rollout
    g = torch.Generator().manual_seed(0)
    model = copy.deepcopy(any_tiny[0])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    lm = model.model.language_model
    layer, attn, hs = lm.layers[1], lm.layers[1].self_attn, lm.layers[1].self_attn.head_dim
    heads, kv = lm.config.num_attention_heads, lm.config.num_key_value_heads
    qkv_w, *others = rollout.decode_weights(model)[1]
    projs = (attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    for n in (1, 5, 32):
        x = torch.randn(n, lm.config.hidden_size, generator=g)
        h = rollout.rms_norm(layer.input_layernorm, x)
        assert torch.equal(h, layer.input_layernorm(x)), "rms_norm"
        q_k_v = rollout.linear(h, *qkv_w).view(n, -1, hs)
        q, k, v = (proj(h).view(n, -1, hs) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        assert torch.equal(q_k_v, torch.cat([q, k, v], dim=1)), "the fused projection"
        for proj, w in zip(projs, others):
            inp = torch.randn(n, proj.in_features, generator=g)
            assert torch.equal(rollout.linear(inp, *w), proj(inp)), proj
        positions = torch.randint(0, 300, (n, 2), generator=g)
        cos, sin = rollout.rotary_tables(model, positions)                      # (n, 2, hs)
        ref_cos, ref_sin = lm.rotary_emb(x, positions.expand(3, -1, -1))
        q_ref, k_ref = apply_rotary_pos_emb(q, k, ref_cos[:, 1], ref_sin[:, 1])
        rotated = rollout.rotary(q_k_v[:, :heads + kv], cos[:, 1], sin[:, 1])
        assert torch.equal(cos, ref_cos) and torch.equal(rotated, torch.cat([q_ref, k_ref], dim=1)), "rotary"


def test_decoding_is_by_hand_on_a_cpu_only_for_an_unsharded_model(tiny):
    from torch.distributed.fsdp import FSDPModule
    import rollout
    model, _ = tiny
    assert rollout.decodes_by_hand(model)
    assert not rollout.decodes_by_hand(torch.nn.Linear(2, 2, device="meta")), "not off a CPU"
    sharded = torch.nn.Linear(2, 2)
    sharded.__class__ = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})  # what fully_shard does to a module
    assert not rollout.decodes_by_hand(sharded), "not under FSDP"


def test_inverse_cdf_never_draws_a_zero_probability_token():
    """The uniforms at both ends, 0 and the largest float below 1, land on tokens of nonzero probability: never
    on a banned (-inf) token at either end of the vocabulary, nor past the last one."""
    from rollout import sample_next
    logits = torch.tensor([[float("-inf"), 1.0, 2.0, float("-inf")], [5.0, float("-inf"), float("-inf"), 30.0]])
    for u in (0.0, 0.5, 1.0 - 2 ** -24):
        token = sample_next(logits, torch.full((2,), u))
        assert torch.isfinite(logits.gather(1, token[:, None])).all(), f"u={u} drew a banned token: {token}"
    assert sample_next(logits, torch.tensor([0.0, 0.0])).tolist() == [1, 0], "u = 0: the first allowed token"
    assert sample_next(logits, torch.tensor([0.99, 0.99])).tolist() == [2, 3]


def test_a_zero_probability_token_is_never_drawn_where_the_cdf_rounds_up_at_it(monkeypatch):
    """CUDA's scan of a single row may sum in another order and give a zero-probability token a step of one
    rounding unit; emulated here on a CPU (a cumsum that adds 1e-7 at token 1): the draw that lands in that step
    takes the most probable token instead."""
    from rollout import sample_next
    monkeypatch.setattr(rollout, "CHECK_DRAWN_ON", ("cuda", "cpu"))  # the check CUDA runs, here on the CPU
    cumsum = torch.Tensor.cumsum
    monkeypatch.setattr(torch.Tensor, "cumsum", lambda x, dim: cumsum(x, dim) + 1e-7 * (torch.arange(x.shape[-1]) >= 1))
    logits = torch.tensor([[1.0, float("-inf"), 2.0]])
    p0 = logits.softmax(-1)[0, 0].item()
    token = sample_next(logits, torch.tensor([(p0 + 5e-8) / (1 + 1e-7)]))  # inside token 1's rounded-up step
    assert token.tolist() == [2], "the banned token 1 must not be drawn"


def test_bad_sampling_settings_are_refused(tiny):
    model, processor = tiny
    for kw in (dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1), dict(top_k=-1)):
        with pytest.raises(ValueError, match="need 0 < top_p <= 1 and top_k >= 0"):
            generate(model, processor, prompts()[:1], max_new_tokens=2, **kw)


def test_the_fixed_shape_step_gives_the_answers_of_the_step_by_hand(any_tiny, monkeypatch):
    """cuda_graphs=True decodes through rollout.FixedStep (eager on a CPU): every step attends over the whole buffer
    of prompt + max_new_tokens, and the batch shrinks to powers of two; the same sampled answers as the step by hand,
    log-probs equal to float rounding. A sharded model keeps the usual step."""
    import fsdp
    import rollout
    model, processor = any_tiny
    monkeypatch.setattr(rollout, "SHRINK_AT", 1.0)  # shrink as soon as a row ends
    widths, shapes = [], set()
    select, update = rollout.PreallocatedLayer.select, rollout.FixedShapeLayer.update
    monkeypatch.setattr(rollout.PreallocatedLayer, "select", lambda self, r: (widths.append(len(r)), select(self, r))[1])
    monkeypatch.setattr(rollout.FixedShapeLayer, "update",
                        lambda self, *a, **k: (lambda out: (shapes.add(out[0].shape[2]), out)[1])(update(self, *a, **k)))
    new_empty = torch.Tensor.new_empty   # memory as a fresh allocation may find it: NaN where nothing was written
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *size, **kw: new_empty(self, *size, **kw).fill_(torch.nan))
    eos, T = processor.eos_token_id, 16
    runs = {}
    for graph in (True, False):
        handle = force_token(model, eos, at_step=5, row=1)   # one row of nine ends early
        try:
            runs[graph] = generate(model, processor, prompts(), group_size=3, max_new_tokens=T, cuda_graphs=graph,
                                   generator=rollout.prompt_generators(0, 1, 0, 3, "cpu"))
        finally:
            handle.remove()
        if graph:
            L = M.encode(processor, prompts())["input_ids"].shape[1]
            assert shapes == {L + T}, f"every fixed step must attend over the whole buffer ({shapes} != {L + T})"
            assert widths and all(w & (w - 1) == 0 for w in widths), f"widths {widths}: powers of two only"
            widths.clear()
    fixed, by_hand = runs[True], runs[False]
    assert fixed.lengths[1] == 6 and fixed.lengths.max() == T, "a row must end early while the others go on"
    assert fixed.texts == by_hand.texts and torch.equal(fixed.completion_ids, by_hand.completion_ids)
    assert torch.equal(fixed.lengths, by_hand.lengths) and torch.equal(fixed.finished, by_hand.finished)
    assert torch.allclose(fixed.logp, by_hand.logp, atol=1e-5), (fixed.logp - by_hand.logp).abs().max()
    shapes.clear()
    monkeypatch.setattr(fsdp, "is_sharded", lambda m: True)
    generate(model, processor, prompts(), max_new_tokens=4, greedy=True, cuda_graphs=True)
    assert not shapes, "a sharded model must not take the fixed-shape step"


class FakeGraph:
    """A CUDA graph's contract on a CPU: recorded once, a replay reruns the step into the SAME output tensor, reading
    the tensors it read when recorded; so it fails where a new tensor took an old one's place without a new record."""

    def __init__(self, step):
        self.step, self.output = step, step._step()
        self.ptrs = self.read(step)

    @staticmethod
    def read(step):
        return [t.data_ptr() for t in (step.token, step.at, step.mask, step.cos, step.sin)] + \
            [b.data_ptr() for layer in step.cache.layers for b in (layer.k_buf, layer.v_buf)]

    def replay(self):
        assert self.read(self.step) == self.ptrs, "a replay would read tensors the graph was not recorded with"
        self.output.copy_(self.step._step())


def test_a_replayed_step_reads_only_the_tensors_it_was_recorded_with(monkeypatch):
    """FixedStep's graphs, played by FakeGraph on a CPU: the shipped base's sampled answers (a batch of 24 that
    shrinks as its rows end) equal those of the eager fixed step and of the step by hand; one graph per batch size."""
    import os
    import data
    import rollout
    model, processor = M.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-base"))
    rows = data.samples_of(data.make_rows("train", 6, seed=1))
    graphs, init = [], rollout.FixedStep.__init__

    def init_with_graphs(self, *args):
        init(self, *args)
        self.graphs = True
    monkeypatch.setattr(rollout.FixedStep, "_record",
                        lambda self: (lambda g: (graphs.append(len(self.token)), (g, g.output))[1])(FakeGraph(self)))

    def run(**kw):
        return generate(model.eval(), processor, rows, group_size=4, max_new_tokens=64,
                        generator=rollout.prompt_generators(0, 3, 0, len(rows), "cpu"), **kw)
    by_hand, eager = run(), run(cuda_graphs=True)
    monkeypatch.setattr(rollout.FixedStep, "__init__", init_with_graphs)
    replayed = run(cuda_graphs=True)
    assert len(graphs) >= 3 and graphs[0] == 24 and graphs == sorted(set(graphs), reverse=True), graphs
    for other in (eager, by_hand):
        assert replayed.texts == other.texts and torch.equal(replayed.completion_ids, other.completion_ids)
        assert torch.allclose(replayed.logp, other.logp, atol=1e-5)
    assert torch.equal(replayed.logp, eager.logp), "a replay computes what the eager step does"
