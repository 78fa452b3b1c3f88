"""
bench.py: rollout speed and memory, printed as a markdown table. Speed and memory targets live here, not in tests.

    python bench.py                                  # tiny and small presets at 112 and 448 px, + the training shape
    python bench.py --preset small --sizes 448 --repeats 9
    python bench.py --device cuda --dtype bfloat16   # on a GPU
    python bench.py --memory                         # the per-rank GPU memory plan of 3B / 7B training (no GPU)

Arms: (a) rollout.generate, B prompts x G samples: prompt and image prefilled once, the KV cache replicated to the
G samples, one torch.Generator per prompt seeded as in training; (b) transformers' model.generate on the B prompts
each repeated G times (as TRL-style trainers do): same max_new_tokens, sampling (temperature 1, no top-k / top-p),
stop and banned vision tokens, global RNG. Speed: new tokens/s (each row up to its first EOS) of --repeats timed
calls after --warmup untimed ones, the arms interleaved (a b, b a, ...) so a drift of the machine reaches both;
printed: the median (min-max) of each arm and of the ratio a/b of each pair. Memory: each arm in a fresh process,
the peak during one call minus the use before it (GPU: torch.cuda.max_memory_allocated; CPU: the resident set size
sampled every 2 ms). Rows: the tiny and small presets (random weights rarely stop early: both arms decode every
token) at --sizes px, B = --batch; and the training shape of `python train.py` (the shipped base, 32 synthetic
prompts at 112 px, G = 8, 64 new tokens, answers stopping at their EOS).
Targets (TARGETS, the median ratio a/b, printed with the verdict in the last column): >= 2.0 at 112 px (the default run's
images) and in the training row, >= 1.5 at 448 px (vision tower and prompt once per group), >= 1.0 elsewhere.
Then one line: the GRPO update of one default-run step (reference log-probs, policy log-probs, loss, backward) against
two forwards + backwards of the policy's log-probs of the same answers, as ratios of interleaved calls: "bare", the
prompt once per group as in the update (what the reference and the loss add), and "plain", every answer after its
own copy of the prompt, as a forward of each (prompt, answer) sequence runs (UPDATE_TARGET: <= 1.2 against plain).

--memory: GPU memory per rank of GRPO training of Qwen2.5-VL-3B / 7B, by component, under plain DDP, an optimizer
sharded over 8 ranks and FSDP over 8, with and without gradient checkpointing (see memory_plan). Measured here: the
parameter counts (the real configs built on the meta device) and the activation bytes per token / patch (a 2-layer
model at the real widths, bf16 on CPU); everything else is computed from them.
"""
import argparse
import multiprocessing
import os
import statistics
import threading
import time

import numpy as np
import torch
from PIL import Image

import data
import grpo
import model as M
import runtime
from config import RLConfig
from rollout import generate, prompt_generators

TRAINING = dict(model="assets/tiny-base", kind="training", size=112, batch=32, group=8, max_new_tokens=64)
TARGETS = {112: 2.0, 448: 1.5}  # image px -> the median a/b to reach (else 1.0)
UPDATE_TARGET = 1.2  # the most the GRPO update may take, as a ratio to a plain forward + backward of its tokens

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()

def load(job):
    """A row's model (eval mode), processor, prompts (random-noise images with a counting question for the presets,
    or synthetic training rows) and its two arms: {"a": call, "b": call}, each returning its new tokens."""
    B, size, G, T, device = job["batch"], job["size"], job["group"], job["max_new_tokens"], job["device"]
    model, processor = M.load(job["model"], device=device, dtype=getattr(torch, job["dtype"]), max_pixels=size ** 2)
    if job["kind"] == "training":
        samples = [{"image": r["image"], "problem": r["problem"]} for r in data.make_split("train", B, size=size)]
    else:
        rng = np.random.default_rng(0)
        samples = [{"image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                    "problem": "How many shapes are in the image? Think, then answer with a number."} for _ in range(B)]
    rep = M.repeat_batch({k: v.to(device) for k, v in M.encode(processor, samples).items()}, G)
    calls = {"n": 0}

    def ours():
        calls["n"] += 1                                   # a fresh training step's generators every call
        gens = prompt_generators(0, calls["n"], 0, len(samples), device)
        return int(generate(model, processor, samples, group_size=G, max_new_tokens=T, generator=gens).lengths.sum())

    def theirs():
        with torch.no_grad():
            ids = model.generate(**rep, max_new_tokens=T, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 eos_token_id=processor.stop_token_ids, pad_token_id=processor.pad_token_id,
                                 suppress_tokens=processor.vision_token_ids)[:, rep["input_ids"].shape[1]:]
        is_stop = torch.isin(ids, torch.tensor(processor.stop_token_ids, device=ids.device))   # (N, T)
        return int(torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, ids.shape[1]).sum())  # up to a stop

    return model.eval(), processor, samples, {"a": ours, "b": theirs}

def throughput(fns, device, warmup, repeats):
    """Tokens/s and seconds of each arm per repeat, interleaved (a b, b a, ...), after `warmup` untimed calls."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rates, seconds = {name: [] for name in fns}, {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t = time.perf_counter()
            n = fns[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - t)
            rates[name].append(n / seconds[name][-1])
    return rates, seconds

def update_arms(device, dtype, micro_batch=RLConfig.micro_batch):
    """The GRPO update of one default-run step against forwards + backwards of the same tokens: the shipped base,
    32 training prompts x G = 8, their sampled answers, micro-batches of `micro_batch` prompts (as train.grpo_step).
    {"grpo": call, "bare": call, "plain": call}, each returning the number of completion tokens. grpo: the frozen
    reference's log-probs, the policy's, grpo.grpo_loss, backward; bare: the policy's log-probs, summed, backward;
    plain: the same with every answer after its own copy of the prompt (the vision tower once per prompt), as a
    forward of each (prompt, answer) sequence runs them."""
    job = dict(TRAINING, device=device, dtype=dtype)
    policy, processor, samples, _ = load(job)
    ref = M.load(job["model"], device=device, dtype=getattr(torch, dtype))[0].eval().requires_grad_(False)
    G, T = job["group"], job["max_new_tokens"]
    ro = generate(policy, processor, samples, group_size=G, max_new_tokens=T,
                  generator=prompt_generators(0, 0, 0, len(samples), device))
    adv = grpo.group_advantages(torch.randn(len(ro.texts), generator=torch.Generator().manual_seed(0)), G).to(device)
    chunks = []
    for i in range(0, len(samples), micro_batch):
        rows = slice(i * G, (i + micro_batch) * G)
        n = int(ro.mask[rows].sum(1).max())
        batch = {k: v.to(device) for k, v in M.encode(processor, samples[i:i + micro_batch]).items()}
        chunks.append((batch, ro.completion_ids[rows, :n], ro.mask[rows, :n], adv[rows]))
    tokens, seqs = int(ro.mask.sum()), float(len(ro.texts))

    def grpo_update():
        for batch, ids, mask, a in chunks:
            with torch.no_grad():
                ref_logp = M.completion_logprobs(ref, batch, ids, mask)
            logp = M.completion_logprobs(policy, batch, ids, mask)
            loss, _ = grpo.grpo_loss(logp, logp.detach(), ref_logp, a, mask, num_seqs=seqs, num_tokens=tokens,
                                     max_len=T)
            loss.backward()
        policy.zero_grad(set_to_none=True)
        return tokens

    def bare():
        for batch, ids, mask, _ in chunks:
            (M.completion_logprobs(policy, batch, ids, mask) * mask).sum().backward()
        policy.zero_grad(set_to_none=True)
        return tokens

    def plain():
        for batch, ids, mask, _ in chunks:
            (M._logprobs_prompt_per_answer(policy, batch, ids, G) * mask).sum().backward()
        policy.zero_grad(set_to_none=True)
        return tokens
    policy.train()
    return {"grpo": grpo_update, "bare": bare, "plain": plain}

def print_update(args):
    """One line: the update's time against the two forwards + backwards, median (min-max) of interleaved calls."""
    _, seconds = throughput(update_arms(args.device, args.dtype), args.device, args.warmup, args.repeats)
    ratio = {arm: [a / b for a, b in zip(seconds["grpo"], seconds[arm])] for arm in ("bare", "plain")}
    met = "met" if statistics.median(ratio["plain"]) <= UPDATE_TARGET else "not met"
    print(f"\nGRPO update of one default-run step (32 prompts x G = 8, micro-batches of {RLConfig.micro_batch}; "
          f"reference log-probs + policy log-probs + loss + backward): {spread(seconds['grpo'], '.2f')} s. Against a "
          f"forward + backward of the same log-probs, the prompt once per group as in the update: "
          f"{spread(seconds['bare'], '.2f')} s, ratio {spread(ratio['bare'], '.2f')}. Against a plain forward + "
          f"backward of every (prompt, answer) sequence: {spread(seconds['plain'], '.2f')} s, ratio "
          f"{spread(ratio['plain'], '.2f')} (target <= {UPDATE_TARGET}: {met})", flush=True)

def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def _memory_child(job):
    """In a fresh process: one call of one arm; the peak memory above what was in use before it, in bytes."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if job["device"].startswith("cuda"):
        torch.cuda.set_device(job["device"])
    fn = load(job)[3][job["arm"]]
    fn()                                                  # the first call's one-off allocations are not the arm's
    if job["device"].startswith("cuda"):
        sync(job["device"])
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(job["device"])
        return torch.cuda.max_memory_allocated() - before
    before, peak, done = _resident_bytes(), [0], threading.Event()

    def poll():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _resident_bytes())
    watcher = threading.Thread(target=poll)
    watcher.start()
    fn()
    done.set()
    watcher.join()
    return max(peak[0], _resident_bytes()) - before

def peak_memory(job):
    """{"a": bytes, "b": bytes}, each arm measured in its own spawned process."""
    # A fixed mmap threshold for the spawned processes (glibc reads it at a process's start): glibc then returns
    # every large freed block to the system, so the warm-up call's memory cannot stay resident and hide the measured.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = {}
    for arm in ("a", "b"):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            out[arm] = pool.apply(_memory_child, ({**job, "arm": arm},))
    return out

# --- python bench.py --memory: the per-rank GPU memory plan of a training config (estimates) ---
# The fields of the public Qwen2.5-VL-3B / 7B-Instruct config.json files that set parameter counts and activation sizes.
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
SHAPES = {
    "3B": dict(text=dict(num_hidden_layers=36, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936),
               vision=dict(VISION, out_hidden_size=2048), tie_word_embeddings=True),
    "7B": dict(text=dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
               vision=dict(VISION, out_hidden_size=3584), tie_word_embeddings=False),
}
GIB = 2 ** 30
# GiB a card offers: an "80 GB" H100 has 81,559 MiB (an A100 80 GB: 81,920), an A100 40 GB 40,960, an L40S 46,068.
CARDS_GIB = {"40 GB": 40960 / 1024, "48 GB": 46068 / 1024, "80 GB": 81559 / 1024}
ALLOWANCE_GIB = 4                # CUDA context + allocator slack: an allowance, not a measurement
# Each component's phase: "held" for the whole step; the rollout's and the update's are never resident together.
PHASES = {"policy parameters, bf16": "held", "fp32 master weights": "held", "gradients, bf16": "held",
          "AdamW moments, fp32": "held", "frozen reference, bf16": "held",
          f"CUDA context + allocator slack ({ALLOWANCE_GIB} GiB allowance)": "held",
          "FSDP: other ranks' bf16 parameters, gathered": "rollout", "KV cache, bf16": "rollout",
          "activations, text layers": "update", "activations, vision blocks": "update",
          "checkpointing: 1 layer recomputed in backward": "update",
          "logits, fp32 log_softmax and its 2 gradients": "update",
          "optimizer step: fp32 gradient copies (less the bf16 ones freed)": "step"}

def qwen_config(shape, text=(), vision=()):
    """A Qwen2_5_VLConfig of `shape`, with fields of its text / vision part overridden."""
    from transformers import Qwen2_5_VLConfig
    t = {**shape["text"], **dict(text)}
    half = t["hidden_size"] // t["num_attention_heads"] // 2    # mrope splits head_dim/2 over (t, h, w): 16, 24, 24
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    v = {**shape["vision"], **dict(vision)}
    return Qwen2_5_VLConfig(text_config={**t, "rope_parameters": rope}, vision_config=v,
                            tie_word_embeddings=shape["tie_word_embeddings"])

def count_parameters(shape):
    """MEASURED: parameters {total, text, vision} of the full model built on the meta device (no weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen_config(shape))
    total, vision = M.num_parameters(model), M.num_parameters(model.model.visual)    # a tied head counts once
    return {"total": total, "text": total - vision, "vision": vision}

def truncated_model(shape, layers=2):
    """`shape` at its real widths with `layers` text layers and vision blocks (the last one full-attention) and a
    1,024-token vocabulary (the logits are planned apart): bf16, training mode, seeded."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    cfg = qwen_config(shape, text=dict(num_hidden_layers=layers, vocab_size=1024, bos_token_id=None, eos_token_id=None),
                      vision=dict(depth=layers, fullatt_block_indexes=[layers - 1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).train()

def _saved_bytes(model, layers, forward):
    """Bytes of the distinct tensors kept for backward while `forward()` runs, parameters left out: (those first kept
    inside the last of `layers`, all). Kept: what autograd saves, and under checkpointing the inputs of each
    checkpointed layer (kept for its recompute; autograd's saves inside it are the checkpoint's, dropped)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, inside, where, undo = set(), {}, [None], []

    def keep(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            inside[where[0]] = inside.get(where[0], 0) + storage.nbytes()
        return t

    def checkpoint_keeping(checkpoint):
        def run(fn, *args):          # fn: partial(forward, layer, **kwargs); the checkpoint keeps args and kwargs
            for a in [*args, *fn.keywords.values()]:
                for t in (a if isinstance(a, (tuple, list)) else [a]):
                    if torch.is_tensor(t):
                        keep(t)
            return checkpoint(fn, *args)
        return run

    originals = {layer: layer._gradient_checkpointing_func for layer in layers if layer.gradient_checkpointing}
    for i, layer in enumerate(layers):
        undo += [layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)),
                 layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, None))]
    for layer, checkpoint in originals.items():
        layer._gradient_checkpointing_func = checkpoint_keeping(checkpoint)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = forward()
    finally:
        for h in undo:
            h.remove()
        for layer, checkpoint in originals.items():
            layer._gradient_checkpointing_func = checkpoint
    del out
    return inside.get(len(layers) - 1, 0), sum(inside.values())

def activation_bytes(shape, checkpointing, model=None, tokens=128, grid=(16, 16)):
    """MEASURED (bf16, CPU, sdpa attention): bytes kept for backward per text token in each text layer and outside
    them, and per image patch in each vision block and outside them, in one forward of `tokens` tokens / one image.
    Without checkpointing, also the update's own forward (update_bytes)."""
    model = model if model is not None else truncated_model(shape)
    if checkpointing:
        M.set_memory_options(model, "sdpa", checkpointing=True)
    else:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()  # 5.2x: new name
    text, visual = model.model.language_model.layers, model.model.visual
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
    layer, total = _saved_bytes(model, text, lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits)
    patches = grid[0] * grid[1]
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, dtype=torch.bfloat16)        # channels x time x patch^2
    thw = torch.tensor([[1, *grid]])
    block, v_total = _saved_bytes(model, visual.blocks, lambda: visual(pixels, grid_thw=thw).pooler_output)
    out = {"text_layer": layer / tokens, "text_rest": (total - len(text) * layer) / tokens,
           "vision_block": block / patches, "vision_rest": (v_total - len(visual.blocks) * block) / patches}
    return out if checkpointing else {**out, **update_bytes(model)}

def update_layer_bytes(model, prompt_tokens, answer_tokens, group):
    """MEASURED: bytes kept for backward inside the last text layer by the update without checkpointing
    (model.completion_logprobs: the prompt once, then its `group` answers on the prompt's keys and values), for one
    text prompt of `prompt_tokens` and answers that forward `answer_tokens` tokens each."""
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1024, (1, prompt_tokens), generator=g),
             "attention_mask": torch.ones(1, prompt_tokens, dtype=torch.long),
             "mm_token_type_ids": torch.zeros(1, prompt_tokens, dtype=torch.long)}
    answers = torch.randint(0, 1024, (group, answer_tokens + 1), generator=g)   # the last token is only predicted
    text = model.model.language_model.layers
    return _saved_bytes(model, text, lambda: M.completion_logprobs(model, batch, answers))[0]

def update_bytes(model, P=64, A=16, G=2):
    """The update's bytes in each text layer, as update_layer_bytes = prompt * P + answer * G * A + prompt_kv * G * P:
    per prompt token (its own activations, once), per answer token, and per prompt token for each answer (the
    prompt's keys and values that the answer's attention keeps, its KV heads repeated to the query heads). Solved from
    a base measurement and three that double P, A and G in turn (at the 3B widths it predicts a setting 4x as large to
    0.2%)."""
    base = update_layer_bytes(model, P, A, G)
    d_prompt = update_layer_bytes(model, 2 * P, A, G) - base                   # prompt * P + prompt_kv * G * P
    d_answer = update_layer_bytes(model, P, 2 * A, G) - base                   # answer * G * A
    d_group = update_layer_bytes(model, P, A, 2 * G) - base                    # answer * G * A + prompt_kv * G * P
    prompt_kv = (d_group - d_answer) / (G * P)
    return {"update_prompt": d_prompt / P - prompt_kv * G, "update_answer": d_answer / (G * A),
            "update_prompt_kv": prompt_kv}

def text_activations(t, a, checkpointing, prompts, group, prompt_tokens, new_tokens):
    """Bytes kept for backward in and around the text layers by the update of `prompts` prompts x `group` answers.
    With checkpointing each answer runs after its own copy of its prompt (model._logprobs_prompt_per_answer); without,
    each prompt runs once and its answers attend to its keys and values (model._logprobs_prompt_per_group)."""
    rows, layers = prompts * group, t["num_hidden_layers"]
    if checkpointing:
        return (layers * a["text_layer"] + a["text_rest"]) * (prompt_tokens + new_tokens) * rows
    per_layer = (a["update_prompt"] * prompt_tokens * prompts + a["update_answer"] * new_tokens * rows
                 + a["update_prompt_kv"] * prompt_tokens * rows)
    return layers * per_layer + a["text_rest"] * (prompt_tokens * prompts + new_tokens * rows)

def memory_plan(shape, n_params, acts, checkpointing, opt_ranks=1, fsdp_ranks=1, prompts=1, group=4,
                prompt_tokens=1300, new_tokens=256, patches=2048, micro_batch=1):
    """COMPUTED: bytes per rank {component: bytes} (phases in PHASES) and the peak, held + max(rollout, update,
    step), of GRPO with `prompts` per rank, `group` samples each; acts = {False: activation_bytes(..), True: ..}."""
    t, P = shape["text"], n_params
    F, O = fsdp_ranks, opt_ranks * fsdp_ranks                  # FSDP shards everything, ZeRO-1 the optimizer only
    mb = min(micro_batch, prompts)                        # the update holds one micro-batch of mb prompts at a time
    rows, tokens = mb * group, prompt_tokens + new_tokens
    a, full = acts[checkpointing], acts[False]
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    kv_per_token = t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * head_dim * 2                 # K and V, bf16
    parts = [2 * P / F, 4 * P / O, 2 * P / F, 8 * P / O, 2 * P / F, ALLOWANCE_GIB * GIB,
             2 * P * (1 - 1 / F),                                                   # a rank holds its shard already
             kv_per_token * prompts * group * tokens,
             text_activations(t, a, checkpointing, mb, group, prompt_tokens, new_tokens) + (0 if checkpointing else
             kv_per_token * prompt_tokens * (mb + rows)),   # the prompts' caches, and their copies for the answers
             (shape["vision"]["depth"] * a["vision_block"] + a["vision_rest"]) * patches * mb,   # once per prompt
             max(full["text_layer"] * tokens * rows, full["vision_block"] * patches) if checkpointing else 0,
             rows * new_tokens * t["vocab_size"] * 12,  # completion tokens; at the backward's start the fp32
             # log_softmax kept for it, the gradient from gather and log_softmax's own: 12 B (measured, CPU)
             4 * P / O - (2 * P / F if O == F else 0)]   # optim.MasterAdamW.step: each bf16 gradient freed once copied
    plan = dict(zip(PHASES, parts))
    phase = {p: sum(v for k, v in plan.items() if PHASES[k] == p) for p in ("held", "rollout", "update", "step")}
    return {"parts": plan, **phase, "total": phase["held"] + max(phase["rollout"], phase["update"], phase["step"])}

def print_memory_plans(ranks=8, prompt_lengths=(1300, 600), new_tokens=256, group=4, patches=2048):
    """The measurements, then per prompt length a markdown table: GiB per rank by component, one column per
    model x (DDP, optimizer sharded over `ranks`, FSDP over `ranks`) x (without, with checkpointing)."""
    start, counts, acts = time.perf_counter(), {}, {}
    print("## Memory plan per rank, GRPO on Qwen2.5-VL (estimates)\n\nMeasured: parameter counts, the real configs "
          "built on the meta device\n")
    print("| model | parameters | text | vision | tied head |\n|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        counts[name] = count_parameters(shape)
        c = counts[name]
        print(f"| Qwen2.5-VL-{name}-Instruct | {c['total']:,} ({c['total'] / 1e9:.4f} B) | {c['text'] / 1e9:.4f} B | "
              f"{c['vision'] / 1e9:.4f} B | {shape['tie_word_embeddings']} |")
    print("\nMeasured: bytes kept for backward (bf16, on CPU, sdpa attention; a 2-layer model at the real widths, "
          "128 tokens, one 224x224 image = 256 patches); 'outside': the rest (rotary tables, final norm; patch "
          "embedding, merger)\n")
    print("| model | checkpointing | per token, each text layer | per token, outside | per patch, each vision block "
          "| per patch, outside |\n|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        model = truncated_model(shape)
        for ckpt in (False, True):
            acts.setdefault(name, {})[ckpt] = a = activation_bytes(shape, ckpt, model)
            print(f"| {name} | {'yes' if ckpt else 'no'} | {a['text_layer']:,.0f} | {a['text_rest']:,.0f} | "
                  f"{a['vision_block']:,.0f} | {a['vision_rest']:,.0f} |")
        del model
    print("\nMeasured: bytes kept for backward in each text layer by the update without checkpointing (the prompt "
          "once, then its answers on its keys and values; update_bytes), the same model\n")
    print("| model | per prompt token | per answer token | per prompt token, for each answer |\n|---|---|---|---|")
    for name, a in acts.items():
        a = a[False]
        print(f"| {name} | {a['update_prompt']:,.0f} | {a['update_answer']:,.0f} | {a['update_prompt_kv']:,.0f} |")
    setups = [("DDP", 1, 1), (f"opt/{ranks}", ranks, 1), (f"FSDP/{ranks}", 1, ranks)]
    columns = [(name, label, o, f, ckpt) for name in SHAPES for label, o, f in setups for ckpt in (False, True)]
    for prompt in prompt_lengths:
        plans = [memory_plan(SHAPES[n], counts[n]["total"], acts[n], ckpt, opt_ranks=o, fsdp_ranks=f, group=group,
                             prompt_tokens=prompt, new_tokens=new_tokens, patches=patches)
                 for n, _, o, f, ckpt in columns]
        print(f"\nComputed: GiB per rank; 1 prompt per rank (one micro-batch), G = {group}, prompt {prompt:,} tokens "
              f"(one image of {patches:,} patches = {patches // 4} tokens) + {new_tokens} new tokens. opt/{ranks}: "
              f"master weights and moments sharded over {ranks} ranks; FSDP/{ranks}: parameters, gradients, optimizer "
              f"and reference over {ranks}, the parameters gathered for the rollout; ckpt: gradient checkpointing (each "
              f"answer then re-runs its prompt; without it, the update runs a prompt once per group)\n")
        print("| component | phase | " + " | ".join(f"{n} {label}{' ckpt' if ckpt else ''}"
                                                    for n, label, _, _, ckpt in columns) + " |")
        print("|---|---|" + "---:|" * len(columns))
        for part, phase in PHASES.items():
            print(f"| {part} | {phase} | " + " | ".join(f"{p['parts'][part] / GIB:.2f}" for p in plans) + " |")
        for key, label in (("held", "held throughout"), ("rollout", "rollout phase"), ("update", "update phase"),
                           ("step", "optimizer step")):
            print(f"| *{label}* | | " + " | ".join(f"{p[key] / GIB:.2f}" for p in plans) + " |")
        print("| **peak = held + max(rollout, update, step)** | | "
              + " | ".join(f"**{p['total'] / GIB:.1f}**" for p in plans) + " |")
        for card, size in CARDS_GIB.items():
            print(f"| fits {card} ({size:.1f} GiB) | | " + " | ".join("yes" if p["total"] <= size * GIB else "no"
                                                                    for p in plans) + " |")
    print(f"\n({time.perf_counter() - start:.0f} s)")

def spread(xs, fmt):
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"

def check_args(args):
    """SystemExit naming the flag to fix, before any model is built."""
    try:
        runtime.check_device(args.device)
        runtime.require([
            (args.threads >= 0, "--threads must be >= 0 (0: torch's default)"),
            (args.repeats >= 1 and args.warmup >= 0, "--repeats must be >= 1 and --warmup >= 0"),
            (min(args.sizes) >= 1, "--sizes must be >= 1 pixel"),
            (min(args.batch, args.group, args.max_new_tokens) >= 1,
             "--batch, --group and --max-new-tokens must be >= 1"),
            (args.preset or args.training or args.memory, "nothing to run: give a --preset, or drop --no-training"),
        ])
    except ValueError as e:
        raise SystemExit(f"error: {e}")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=["tiny", "small"], choices=sorted(M.PRESETS), help="random models")
    p.add_argument("--sizes", nargs="+", type=int, default=[112, 448], help="square image sizes in pixels")
    p.add_argument("--batch", type=int, default=4, help="prompts B of the preset rows")
    p.add_argument("--group", type=int, default=8, help="samples per prompt G of the preset rows")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length of the preset rows")
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True, help="add the training row")
    p.add_argument("--warmup", type=int, default=2, help="untimed full-length calls of each arm first")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each arm, interleaved")
    p.add_argument("--no-memory", dest="peak_memory", action="store_false", help="skip the peak memory columns")
    p.add_argument("--memory", action="store_true", help="print the 3B / 7B training memory plan instead (no GPU)")
    p.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    check_args(args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return print_memory_plans()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(args.device)  # cuda:N: its syncs, memory counters and name, not cuda:0's
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"rollout throughput, new tokens/s: median (min–max) of {args.repeats} interleaved calls per arm after "
          f"{args.warmup} warm-up calls; {args.dtype} on {where}; torch {torch.__version__}\n")
    print(f"| model | params | image px | B x G | new tokens | prompt tokens | (a) ours | (b) HF generate x G | "
          f"a/b | (a) s | peak {'GPU memory allocated' if cuda else 'resident memory'}, MiB: (a) | (b) | target a/b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = [dict(model=preset, kind="preset", size=size, batch=args.batch, group=args.group,
                 max_new_tokens=args.max_new_tokens) for preset in args.preset for size in args.sizes]
    for job in jobs + ([dict(TRAINING)] if args.training else []):
        job.update(device=args.device, dtype=args.dtype, threads=args.threads)
        model, processor, samples, fns = load(job)
        rates, seconds = throughput(fns, args.device, args.warmup, args.repeats)
        ratios = [a / b for a, b in zip(rates["a"], rates["b"])]
        mem = peak_memory(job) if args.peak_memory else {"a": float("nan"), "b": float("nan")}
        name = "tiny base (training)" if job["kind"] == "training" else job["model"]
        target = TARGETS.get(job["size"], 1.0)
        print(f"| {name} | {M.num_parameters(model) / 1e6:.2f} M | {job['size']} | {job['batch']} x {job['group']} | "
              f"{job['max_new_tokens']} | {M.encode(processor, samples)['input_ids'].shape[1]} | "
              f"{spread(rates['a'], '.0f')} | {spread(rates['b'], '.0f')} | {spread(ratios, '.2f')} | "
              f"{statistics.median(seconds['a']):.2f} | {mem['a'] / 2**20:.0f} | {mem['b'] / 2**20:.0f} | "
              f"{target:.1f}: {'met' if statistics.median(ratios) >= target else 'not met'} |", flush=True)
    if args.training:
        print_update(args)

if __name__ == "__main__":
    main()
