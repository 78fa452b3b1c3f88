"""model.py: the tiny offline build, checkpoint folders, prompt encoding and teacher-forced log-probs."""
import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import model as M
import rollout


@pytest.fixture(scope="module")
def tiny():
    model, processor = M.load("tiny", seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def any_tiny(request):
    model, processor = M.build_tiny(model_type=request.param, seed=0)
    assert model.config.model_type == request.param, "build_tiny must build the model type asked for"
    return model.eval(), processor


def samples():
    return [{"image": Image.new("RGB", (112, 112), (200, 30, 30)), "problem": "How many shapes are there?"},
            {"image": Image.new("RGB", (56, 84), (30, 30, 200)), "problem": "Is there a blue square? Answer yes or no."},
            {"image": None, "problem": "What is 2 plus 3?"}]


BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-base")
BASE_TOKENIZER = os.path.join(BASE, "tokenizer.json")


def test_tiny_is_deterministic_and_small(tiny):
    model, processor = tiny
    # data.tokenizer_corpus: the BPE "stays the one the shipped base was built with" -- so the tokenizer built
    # in this process (whatever its hash seed) must be the one in the shipped base's tokenizer.json.
    with open(BASE_TOKENIZER) as f:
        shipped = json.load(f)
    shipped_vocab = {**shipped["model"]["vocab"], **{t["content"]: t["id"] for t in shipped["added_tokens"]}}
    assert processor.tokenizer.get_vocab() == shipped_vocab, \
        "the tiny tokenizer must not depend on the run: its vocab is that of assets/tiny-base/tokenizer.json"
    built = json.loads(processor.tokenizer.backend_tokenizer.to_str())
    assert built["model"]["merges"] == shipped["model"]["merges"], "and its BPE merges, in order, are the shipped ones"
    again, _ = M.load("tiny", seed=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name}: same seed must give the same initial weights"
    other, _ = M.load("tiny", seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight), "another seed must give other weights"
    assert len(processor.tokenizer) < 1024, "the tiny tokenizer is a BPE of a few hundred tokens"
    assert M.num_parameters(model) < 2e6


def test_bpe_tokenizer_is_compact(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    text = "<think>I count the shapes.</think><answer>3</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode()) / 2, f"BPE must be much shorter than one token per byte: {len(ids)}"
    assert tok.decode(ids) == text, "tokenizer must round-trip"
    assert tok.decode(tok("héllo wörld ✓")["input_ids"]) == "héllo wörld ✓", "byte-level BPE covers any text"
    for t in M.SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, f"{t} must be one token"


def test_encode_layout(tiny):
    _, processor = tiny
    batch = M.encode(processor, samples())
    ids, am, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    B, L = ids.shape
    assert B == 3 and am[:, -1].all(), "left padding: every prompt ends in the last column"
    n_img = (ids == processor.image_token_id).sum(1).tolist()
    assert n_img == [16, 6, 0], f"112x112 -> 16 image tokens, 56x84 -> 6, text-only -> 0; got {n_img}"
    assert torch.equal(mm.bool(), ids == processor.image_token_id), "mm_token_type_ids marks image tokens"
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 4]]  # PIL size is (width, height)
    assert batch["pixel_values"].shape[0] == 64 + 24, "pixel rows = patches of all images"
    text = processor.tokenizer.decode(ids[0][am[0].bool()])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>How many shapes are there?" in text


def test_encode_never_truncates(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="sample 0: prompt is .* over max_length=10"):
        M.encode(processor, samples()[:1], max_length=10)


def test_bad_input_names_the_sample_or_folder(tiny, tmp_path):
    _, processor = tiny
    with pytest.raises(ValueError, match="sample 1 needs a 'problem'"):
        M.encode(processor, [samples()[0], {"image": None}])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"sample 0: cannot open image .*broken.png"):
        M.encode(processor, [{"image": str(bad), "problem": "x"}])
    with pytest.raises(ValueError, match=re.escape("sample 0: its problem text must not contain <|image_pad|>")):
        M.encode(processor, [{"image": None, "problem": "a <|image_pad|> b"}])
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        M.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a Qwen-VL checkpoint folder: it has no config.json"):
        M.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        M.load(str(tmp_path))


def plain_logprobs(model, processor, sample, completion):
    """Reference: one plain forward of (prompt, completion) on its own, the model computing its own positions
    and running its vision tower on this one image; log-probs of the T completion tokens (T,)."""
    T = len(completion)
    one = M.encode(processor, [sample])
    full = torch.cat([one["input_ids"], completion[None]], dim=1)
    mm = torch.cat([one["mm_token_type_ids"], torch.zeros(1, T, dtype=torch.int)], dim=1)
    kw = {k: one[k] for k in ("pixel_values", "image_grid_thw") if k in one}
    logits = model(input_ids=full, mm_token_type_ids=mm, attention_mask=torch.ones_like(full), **kw).logits
    return logits[0, -T - 1:-1].log_softmax(-1).gather(1, completion[:, None]).squeeze(1)


def test_pixel_patches_equal_the_image_processor(tiny):
    """model.pixel_patches gives transformers' pixel values and grids bit for bit: noise images (every 0-255 value in
    every channel) square and not, at their size, enlarged to the minimum, shrunk to the maximum, resized in
    between; and with a processing step turned off, or grey images, it gives transformers' values too."""
    import copy
    import numpy as np
    _, processor = tiny
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(112, 112), (84, 140), (100, 150), (30, 30), (1000, 800), (57, 300)]]
    unnormalised = copy.deepcopy(processor.image_processor)
    unnormalised.do_normalize = False
    for ip in (unnormalised, processor.image_processor):
        want = ip(images=images, return_tensors="pt")
        pixels, grids = M.pixel_patches(ip, images)
        assert torch.equal(grids, want["image_grid_thw"]) and torch.equal(pixels, want["pixel_values"])
    assert grids[4].tolist() != [1, 1000 // 14, 800 // 14] and grids[3].tolist() == [1, 4, 4], "images were resized"
    grey = [image.convert("L") for image in images[:2]]   # not RGB: transformers converts it
    assert torch.equal(M.pixel_patches(processor.image_processor, grey)[0],
                       processor.image_processor(images=grey, return_tensors="pt")["pixel_values"])


def test_rope_positions_equal_transformers_get_rope_index(any_tiny):
    """model.rope_positions, one pass over the batch, gives get_rope_index's positions exactly: images of square and
    non-square grids at different offsets, text-only rows, left padding, a batch without any image; and it refuses
    a prompt with two images (get_rope_index's case that it does not cover)."""
    model, processor = any_tiny
    rows = samples() + [{"image": Image.new("RGB", (140, 56), (30, 200, 30)), "problem": "Name the colours " * 3}]
    assert (M.encode(processor, rows)["attention_mask"] == 0).any(), "rows of different lengths, left padded"
    for batch_rows in (rows, rows[2:3], rows[1:2]):
        batch = M.encode(processor, batch_rows)
        want, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                             image_grid_thw=batch.get("image_grid_thw"),
                                             attention_mask=batch["attention_mask"])
        pos, next_pos = M.rope_positions(model, batch)
        assert torch.equal(pos, want), f"positions of {len(batch_rows)} rows"
        assert torch.equal(next_pos, want.amax(dim=(0, 2)) + 1)
    two = M.encode(processor, rows[:1])
    two["mm_token_type_ids"][0, :2] = 1   # a second run of image tokens in the prompt
    with pytest.raises(ValueError, match="one image per prompt"):
        M.rope_positions(model, two)


def test_completion_logprobs_equal_plain_forward(any_tiny):
    """The grouped, vision-once path must equal a plain forward of each (prompt, completion) on its own,
    for Qwen2.5-VL and for Qwen2-VL (another vision tower and loss path in transformers)."""
    model, processor = any_tiny
    G, T = 2, 5
    comp = torch.randint(20, len(processor.tokenizer) - 1, (3 * G, T), generator=torch.Generator().manual_seed(0))
    batch = M.encode(processor, samples())
    with torch.no_grad():
        lp = M.completion_logprobs(model, batch, comp)
        for n in range(3 * G):
            ref = plain_logprobs(model, processor, samples()[n // G], comp[n])
            assert torch.allclose(lp[n], ref, atol=1e-5), f"row {n}: batched log-probs differ from a plain forward"


def test_the_prompt_once_per_group_gives_every_gradient_of_a_prompt_per_answer(any_tiny, monkeypatch):
    """completion_logprobs runs each prompt once and its G answers, in batches of similar length, on the prompt's
    cache: log-probs and the gradient of every parameter equal those of each answer after its own copy of the prompt
    (one answer token included), on every answer's own tokens."""
    model, processor = any_tiny
    G = 3
    batch = M.encode(processor, samples()[:2])
    monkeypatch.setattr(M, "LENGTH_BUCKETS", 3)
    for T, lengths in ((1, [1] * 6), (4, [4, 4, 4, 4, 4, 4]), (4, [2, 4, 1, 3, 4, 2])):
        comp = torch.randint(20, 200, (2 * G, T), generator=torch.Generator().manual_seed(T))
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
        out = []
        for per_answer in (False, True):
            model.zero_grad()
            lp = (M._logprobs_prompt_per_answer(model, batch, comp, G) if per_answer
                  else M.completion_logprobs(model, batch, comp, mask)) * mask
            (lp * torch.linspace(0.5, 2, lp.numel()).view_as(lp)).sum().backward()
            out.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad()
        (shared, shared_grads), (per_answer, grads) = out
        case = f"T={T}, lengths {lengths}"
        assert torch.allclose(shared, per_answer, atol=1e-5), f"{case}: the log-probs of the two paths differ"
        assert set(shared_grads) == set(grads) and len(grads) > 10, f"{case}: the same parameters get gradients"
        for name, g in grads.items():
            scale = float(g.abs().max())  # float rounding of sums in another order: relative to the largest entry
            assert torch.allclose(shared_grads[name], g, rtol=1e-4, atol=1e-5 * scale), f"{case}, {name}: gradients differ"


def test_under_fsdp_the_forwards_do_not_depend_on_the_answers_lengths(tiny):
    """Every FSDP rank must make the same forwards (each gathers the weights): with every_forward, a micro-batch of
    one-token answers runs the answers' forward too, weighted 0, and gets the same log-probs and gradients."""
    model, processor = tiny
    G, batch = 2, M.encode(processor, samples()[:2])
    calls, backwards = [], []
    hooks = [model.register_forward_pre_hook(lambda module, args: calls.append(1)),
             model.lm_head.register_full_backward_hook(lambda module, g_in, g_out: backwards.append(1))]
    try:
        for lengths in ([1, 1, 1, 1], [1, 3, 2, 3]):
            comp = torch.randint(20, 200, (2 * G, 3), generator=torch.Generator().manual_seed(0))
            out = {}
            for every in (False, True):
                calls.clear(), backwards.clear()
                model.zero_grad()
                lp = M._logprobs_prompt_per_group(model, batch, comp, G, torch.tensor(lengths), every_forward=every)
                mask = (torch.arange(3)[None] < torch.tensor(lengths)[:, None]).float()
                (lp * mask).sum().backward()
                out[every] = ((len(calls), len(backwards)), lp.detach() * mask,
                              {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            assert out[True][0] == (2, 2), f"lengths {lengths}: the prompts' forward and the answers', whatever " \
                                           "their length, each with its backward (FSDP reduces gradients in it)"
            assert out[False][0] == ((1, 1) if max(lengths) == 1 else (2, 2))
            assert torch.equal(out[True][1], out[False][1]), f"lengths {lengths}: the same log-probs"
            assert out[True][2].keys() == out[False][2].keys()
            assert all(torch.equal(out[True][2][n], g) for n, g in out[False][2].items()), "the same gradients"
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad()


def test_length_buckets_sort_the_answers_longest_first_and_trim_each_batch():
    lengths = torch.tensor([3, 9, 1, 9, 5, 2, 7, 4])
    order, buckets = M.length_buckets(lengths, 4)
    assert order.tolist() == [1, 3, 6, 4, 7, 0, 5, 2], "rows longest first, ties in their order"
    assert [b.tolist() for b in buckets] == [[1, 3], [6, 4], [7, 0], [5, 2]]
    same = M.length_buckets(torch.tensor([5, 5, 5, 5, 2, 2]), 3)[1]
    assert [b.tolist() for b in same] == [[0, 1, 2, 3], [4, 5]], "slices with the same longest answer are merged"
    assert len(M.length_buckets(torch.tensor([4, 1]), 4)[1]) == 2, "never more slices than rows"


def vision_grads(model, loss):
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.model.visual.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def test_logprob_loss_reaches_the_vision_tower(any_tiny):
    """The vision tower runs once per prompt and its features are repeated G times: the gradient of the loss
    must be the sum over all G copies, i.e. that of G separate plain forwards per prompt."""
    model, processor = any_tiny
    G = 2
    batch = M.encode(processor, samples()[:2])
    comp = torch.randint(20, 200, (2 * G, 3), generator=torch.Generator().manual_seed(1))
    grouped = vision_grads(model, M.completion_logprobs(model, batch, comp).sum())
    plain = vision_grads(model, sum(plain_logprobs(model, processor, samples()[n // G], comp[n]).sum()
                                    for n in range(2 * G)))
    assert plain and set(grouped) == set(plain), "every vision parameter that the plain forwards train gets a gradient"
    assert sum(g.abs().sum() for g in plain.values()) > 0, "a loss on completion log-probs reaches the vision tower"
    for name, g in plain.items():
        assert torch.allclose(grouped[name], g, rtol=1e-4, atol=1e-6), \
            f"{name}: the grouped loss's vision gradient must equal that of the per-row plain forwards (all G copies)"


def public_release_layout(model, processor, path):
    """Rewrite a save_pretrained folder into the layout of the public Qwen2.5-VL-3B-Instruct release:
    flat text fields and rope_scaling of type mrope in config.json, old weight names, min/max_pixels."""
    M.save(model, processor, path)
    cfg = json.loads((path / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")}, **cfg}
    flat.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    (path / "config.json").write_text(json.dumps(flat))
    weights = load_file(path / "model.safetensors")
    renamed = {}
    for k, v in weights.items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        renamed[k] = v
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    ip = processor.image_processor
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    assert "visual.patch_embed.proj.weight" in renamed and "model.layers.0.mlp.up_proj.weight" in renamed


def logits_of(model, processor):
    batch = M.encode(processor, samples())
    with torch.no_grad():
        return model(**batch).logits


def test_save_load_and_public_layout(tiny, tmp_path):
    model, processor = tiny
    ref = logits_of(model, processor)
    M.save(model, processor, tmp_path / "saved")
    loaded, proc = M.load(str(tmp_path / "saved"))
    assert torch.equal(logits_of(loaded.eval(), proc), ref), "save -> load must give identical logits"
    public_release_layout(model, processor, tmp_path / "public")
    loaded, proc = M.load(str(tmp_path / "public"), max_pixels=448 * 448)
    assert proc.image_processor.size["shortest_edge"] == 3136, "min_pixels read from preprocessor_config.json"
    assert torch.equal(logits_of(loaded.eval(), proc), ref), "the public-release layout must load the same model"


def test_weights_are_read_straight_onto_the_device(any_tiny, tmp_path, monkeypatch):
    """load() builds the model on its device and reads the safetensors there, without transformers'
    from_pretrained (whose device_map needs accelerate): the same weights, buffers and tying, on both types."""
    import safetensors
    model, processor = any_tiny
    tied = type(model)(model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True}))
    devices = []
    safe_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, device="cpu", **k: devices.append(device) or
                        safe_open(*a, device="cpu", **k))  # safetensors itself refuses "cpu:0"
    for name, m in (("plain", model), ("tied", tied)):
        M.save(m, processor, tmp_path / name)
        with monkeypatch.context() as mp:
            mp.setattr(type(m), "from_pretrained", None)  # calling it would fail
            loaded, _ = M.load(str(tmp_path / name), device="cpu:0")
        want, got = m.state_dict(), loaded.state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), name
        assert all(torch.equal(b, dict(m.named_buffers())[k]) for k, b in loaded.named_buffers()), name
        assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == (name == "tied")
        assert not loaded.training
    assert [d for d in devices if d != "cpu"] == ["cpu:0", "cpu:0"], \
        "each safetensors file is opened on the model's device (after check_checkpoint reads its header on the CPU)"
    # A checkpoint whose names do not map goes through from_pretrained; weights it cannot find are an error.
    weights = load_file(tmp_path / "plain" / "model.safetensors")
    save_file({"renamed." + k: v for k, v in weights.items()}, tmp_path / "plain" / "model.safetensors")
    with pytest.raises(ValueError, match=f"its weights lack {len(want)} of"):
        M.load(str(tmp_path / "plain"))  # every tensor left at its random init otherwise, silently
    del weights[next(k for k in weights if "up_proj" in k)]
    save_file(weights, tmp_path / "plain" / "model.safetensors")
    with pytest.raises(ValueError, match=r"lack 1 of .*up_proj"):
        M.load(str(tmp_path / "plain"))
    called = []
    monkeypatch.setattr(type(model), "from_pretrained",
                        lambda *a, **k: called.append(a) or (model, {"missing_keys": set()}))
    M.load(str(tmp_path / "plain"))
    assert called, "names that do not map must fall back to from_pretrained"


def test_a_bf16_preset_keeps_float32_rotary_tables_as_its_saved_copy(tmp_path):
    model, processor = M.load("tiny", dtype=torch.bfloat16)
    M.save(model, processor, tmp_path / "saved")
    loaded, _ = M.load(str(tmp_path / "saved"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert [(n, b.dtype) for n, b in model.named_buffers()] == [(n, b.dtype) for n, b in loaded.named_buffers()]
    assert torch.equal(logits_of(model.eval(), processor), logits_of(loaded.eval(), processor)), \
        "a bf16 preset computes what its saved and reloaded copy computes"


def test_gradient_checkpointing_gives_the_same_gradients(any_tiny):
    """--grad-checkpointing recomputes every decoder layer and vision block in backward: the same gradients,
    with each layer keeping only its input for backward."""
    import copy
    model, processor = any_tiny
    batch = M.encode(processor, samples()[:2])
    comp = torch.randint(20, 200, (4, 3), generator=torch.Generator().manual_seed(2))
    grads, saved = [], []
    for checkpointing in (False, True):
        m = M.set_memory_options(copy.deepcopy(model).train(), "sdpa", checkpointing)
        count = [0]

        def pack(t):
            count[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = M.completion_logprobs(m, batch, comp).sum()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        saved.append(count[0])
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), f"{name}: the same gradient"
    assert saved[1] < saved[0] / 2, f"checkpointing keeps far less for backward ({saved[1]} vs {saved[0]} bytes)"


def test_an_older_transformers_is_refused(monkeypatch):
    import transformers
    M.check_transformers()
    cls = transformers.Qwen2_5_VLForConditionalGeneration

    def old_forward(self, input_ids=None, past_key_values=None, pixel_values=None):  # 5.17's names
        pass
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    monkeypatch.setattr(cls, "forward", old_forward)
    with pytest.raises(ValueError, match="5.17.0 is too old"):
        M.load("tiny")


def test_the_gradient_of_the_log_probs_is_the_same_in_every_call():
    """At the default run's shape (the shipped base, 32 training prompts x G = 8, answers of many lengths, every
    thread) two backward passes of completion_logprobs give the same gradient to the bit, so that a run is
    deterministic for its seed. (Rows taken straight from their prompts scatter-add the G answers' gradients in an
    order that varies from call to call.)"""
    model, processor = M.load(BASE)
    rows = data.make_split("train", 32, size=112)
    ro = rollout.generate(model, processor, data.samples_of(rows), group_size=8, max_new_tokens=64,
                          generator=rollout.prompt_generators(0, 0, 0, len(rows), "cpu"))
    assert len(M.length_buckets(ro.lengths, M.LENGTH_BUCKETS)[1]) > 1, "answers of several lengths"
    model.train()
    grads = []
    for _ in range(3):
        model.zero_grad()
        (M.completion_logprobs(model, ro.batch, ro.completion_ids, ro.mask) * ro.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert all(torch.equal(grads[0], g) for g in grads[1:]), "the same gradient in every call"


def test_load_quiets_transformers_only_while_it_loads(tiny, tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging
    path, seen, load_weights = str(tmp_path / "ckpt"), [], M.load_weights
    M.save(*tiny, path)

    def watched(*args):  # transformers' logging as load_weights sees it
        seen.append((hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()))
        return load_weights(*args)
    monkeypatch.setattr(M, "load_weights", watched)
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    try:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        M.load(path)
        assert seen == [(hf_logging.ERROR, False)], "quiet while loading"
        assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (hf_logging.INFO, True), \
            "the caller's transformers logging as it was, after"
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()
