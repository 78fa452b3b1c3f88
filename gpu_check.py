"""
gpu_check.py: checks of this project on one or two GPUs, printed as ONE markdown table (under 10 min on an H100).

    python gpu_check.py                        # every check; exits 1 when any failed
    python gpu_check.py --quick                # checks 0-2 only (tiny runs); --skip-3b: no checks 3-5
    python gpu_check.py --device cpu --quick   # the same code paths on a CPU: gloo, float32 (and a 2-layer "3B")

0. transformers API: Qwen2.5-VL's forward takes the `cache=` and `mm_encoder_outputs=` that rollout.py and
   model.completion_logprobs pass (5.17 has `past_key_values` and no mm_encoder_outputs: unknown kwargs are dropped).
1. torchrun DDP: `torchrun --standalone --nproc_per_node=2 train.py` (tiny base, open stage, 3 steps; NCCL, gloo
   for CPU tensors) against `python train.py`: max abs difference of the final weights (float32: allclose as in
   tests/test_train.py; bf16: reported). One GPU: one process under torchrun (train.py puts rank r on cuda:r).
2. Kill + resume: 4 steps, a checkpoint each; SIGKILL to the process groups of torchrun and of each rank (torchrun
   gives each a session) once checkpoint 2 is written and step 3 logged (its checkpoint held back); then --resume:
   final weights against an uninterrupted run (float32: bit-identical on a CPU, within 1e-6 on CUDA, whose atomic
   adds may round apart), each step logged once, each rank's peak memory (train.py reports none: torchrun runs
   train_worker below, train.main and then the peak).
3. One GRPO step at the real Qwen2.5-VL-3B shape (bench.SHAPES["3B"], random weights made on the GPU, bf16 with fp32
   masters: optim.MasterAdamW), a frozen reference, one ~1,300-token prompt with a 401,408-pixel random image, 256
   new tokens, G = 4: train.grpo_step (rollout, rewards, loss, backward, optimizer step); peak memory and seconds,
   without and with gradient checkpointing (model.set_memory_options). model.encode lays the prompt out with the
   tiny base's processor, the config's vision token ids set to its tokenizer's (the vocabulary stays 151,936).
   Random weights score 0, so advantages and gradients are 0; the backward and the step still run in full.
4. Check 3's rollout in decode tokens/s (rows x decoded tokens / (rollout - prefill seconds)) against the HBM bound
   rows / (text-decoder parameter bytes / bandwidth); bandwidth by GPU name, else a timed device-to-device copy.
   Then at DECODE_ROWS rows (check 3's prompt, DECODE_ROWS / G prompts x G), greedy, check 3's new tokens:
   transformers' `generate` on the prompts repeated G times, rollout.generate, and rollout.generate with
   cuda_graphs=True (rollout.FixedStep; on a CPU its eager step), each in tok/s of the whole call and of its decode
   against the bound (which counts the weights' bytes, not the cache's); and the graphs' answers against the eager
   fixed step's (FixedStep.capture off: the same kernels, so equal or FAILED) and against the plain step's.
5. Where 2 GPUs exist (and on a CPU): check 3's GRPO step, with checkpointing, on 2 processes under each --shard mode
   (none, optimizer, fsdp), one prompt per rank; each rank's peak memory and the step's seconds.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

import bench
import config
import data
import fsdp
import model as M
import optim
import rollout
import train
from optim import MasterAdamW
from runtime import setup_dist

ROOT = os.path.dirname(os.path.abspath(__file__))
# HBM bandwidth in TB/s by GPU name: the first entry whose words all appear in the lower-case name.
BANDWIDTH_TB_S = [(("h200",), 4.8), (("h100", "pcie"), 2.0), (("h100",), 3.35), (("a100", "80gb"), 2.0),
                  (("a100",), 1.56)]
# Check 3's shape: the real one on a GPU; on a CPU 2 text layers and 2 vision blocks at the real widths.
DECODE_ROWS = 32  # check 4's batch (rows = prompts x G)
SHAPE = {"cuda": dict(text={}, vision={}, image=(448, 896), prompt=1300, new=256, G=4),
         "cpu": dict(text=dict(num_hidden_layers=2, vocab_size=4096), vision=dict(depth=2, fullatt_block_indexes=[1]),
                     image=(112, 112), prompt=120, new=8, G=4)}
ROWS, FAILED = [], []  # (check, setting, result, seconds); the names of the failed checks

class CheckFailed(Exception):
    pass

def log(msg):
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)

def attempt(check, setting, fn):
    """A table row of fn()'s text; an exception becomes a FAILED row, and the script goes on."""
    log(f"{check}: {setting}")
    t0 = time.time()
    try:
        text = fn()
    except Exception as e:  # noqa: BLE001 -- every failure is a row
        FAILED.append(check)
        text = f"**FAILED** {type(e).__name__}: {str(e)[:400]}"
        log(f"{check} failed: {type(e).__name__}: {e}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ROWS.append((check, setting, text, time.time() - t0))

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()

def gib(n):
    return f"{n / 2 ** 30:.2f} GiB"

# ---- Runs of train.py as subprocesses
def train_args(a, steps, extra=()):
    return (["--model", "assets/tiny-base", "--stages", "open", "--stage-steps", str(steps), "--prompts-per-step", "8",
             "--group-size", "4", "--max-new-tokens", "16", "--no-phase2", "--eval-n", "0", "--device", a.device,
             "--dtype", a.dtype] + (["--threads", "1"] if a.device == "cpu" else []) + list(extra))

def start(script, args, out, nproc, env=None):
    """`torchrun --standalone --nproc_per_node=nproc script args --out out` (nproc 0: python script ...) in its own
    process group, its output in out.log."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc else []) + [script] + args + ["--out", out]
    with open(out + ".log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    proc.log = out + ".log"
    return proc

def last_error(path):
    """The last exception line of a log (a rank's, before torchrun's summary), else its last line."""
    lines = [ln.strip() for ln in open(path, errors="replace") if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Exit)\b", ln)]
    own = [ln for ln in errors if "torch.distributed.elastic" not in ln]
    return (own or errors or lines or ["(no output)"])[-1]

def kill_tree(pid):
    """SIGKILL to the process groups of pid and its descendants (torchrun gives each rank a session of its own)."""
    ppid = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = open(f"/proc/{d}/stat").read()
            ppid[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree = {pid}
    while grown := {p for p, pp in ppid.items() if pp in tree} - tree:
        tree |= grown
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(p), signal.SIGKILL)

def run(script, args, out, nproc, env=None, timeout=420):
    proc = start(script, args, out, nproc, env)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        raise CheckFailed(f"no end after {timeout} s (log {proc.log})")
    if rc != 0:
        raise CheckFailed(f"exit {rc}: {last_error(proc.log)} (log {proc.log})")
    return out

def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))

def max_diff(a_dir, b_dir):
    """(max abs difference, tensors of a, tensors of b) of two saved models."""
    a, b = weights(a_dir), weights(b_dir)
    if a.keys() != b.keys():
        raise CheckFailed(f"{a_dir} and {b_dir} hold different tensors")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a), a, b

def same(diff):
    return "bit-identical" if diff == 0 else f"max abs diff {diff:.3g}"

def train_worker(argv):
    """torchrun's script in check 2: train.main(argv), then this rank's peak memory (CUDA allocated, else the
    resident set) into $GPU_CHECK_PEAK.rank<r>. With $GPU_CHECK_HOLD=k the run waits, before writing the checkpoint
    of global step k (that step logged), for the parent's SIGKILL."""
    hold, save = int(os.environ.get("GPU_CHECK_HOLD", 0)), train.save_checkpoint

    def save_or_hold(out, step, *args, **kwargs):
        if step == hold:
            time.sleep(900)   # the parent kills it within 420 s
        return save(out, step, *args, **kwargs)
    train.save_checkpoint = save_or_hold
    train.main(argv)
    if os.environ.get("GPU_CHECK_PEAK"):
        write_peak()

def write_peak(**extra):
    """This rank's peak memory (CUDA allocated, else the resident set) into $GPU_CHECK_PEAK.rank<r>."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = (torch.cuda.max_memory_allocated(int(os.environ.get("LOCAL_RANK", 0))) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    with open(f"{os.environ['GPU_CHECK_PEAK']}.rank{os.environ.get('RANK', 0)}", "w") as f:
        json.dump({"peak_bytes": peak, "kind": "CUDA allocated" if cuda else "resident set", **extra}, f)

def peaks(prefix, nproc):
    got = [json.load(open(f"{prefix}.rank{r}")) for r in range(nproc)]
    return ", ".join(gib(g["peak_bytes"]) for g in got) + f" ({got[0]['kind']})"

# ---- The checks
def check_api():
    C = Qwen2_5_VLForConditionalGeneration
    M.check_transformers()  # forward(cache=, mm_encoder_outputs=), which rollout and the log-probs rely on
    how = "activation" if hasattr(C, "activation_checkpointing_enable") else "gradient (older name)"
    return f"forward(cache=, mm_encoder_outputs=) ok; checkpointing via {how}_checkpointing_enable"

def check_ddp(a, nproc):
    one = run("train.py", train_args(a, 3), os.path.join(a.out, "ddp_one"), 0)
    many = run("train.py", train_args(a, 3), os.path.join(a.out, f"ddp_{nproc}"), nproc)
    diff, A, B = max_diff(os.path.join(one, "stages/1_final"), os.path.join(many, "stages/1_final"))
    begin = weights(os.path.join(one, "stages/0_open_start"))
    moved = any(not torch.equal(A[k], begin[k]) for k in A)
    text = f"{nproc} processes vs 1: {same(diff)} ({len(A)} tensors); the steps moved the weights: {moved}"
    if not moved or (a.dtype == "float32" and not all(torch.allclose(A[k], B[k], atol=1e-6, rtol=1e-4) for k in A)):
        raise CheckFailed(text + ("; float32 must match (atol 1e-6, rtol 1e-4)" if moved else ""))
    return text

def check_resume(a, nproc):
    args, worker = ["--as-train"] + train_args(a, 4, ["--ckpt-every", "1"]), os.path.join(ROOT, "gpu_check.py")
    full, out = os.path.join(a.out, "resume_full"), os.path.join(a.out, "resume_killed")
    run(worker, args, full, nproc, {"GPU_CHECK_PEAK": full + ".peak"})
    latest, metrics = os.path.join(out, "checkpoints", "latest"), os.path.join(out, "metrics.jsonl")
    proc, deadline = start(worker, args, out, nproc, {"GPU_CHECK_HOLD": "3"}), time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None and not (
                os.path.isfile(latest) and open(latest).read() == "step_000002"
                and os.path.isfile(metrics) and len(open(metrics).readlines()) >= 3):
            time.sleep(0.05)
        if proc.poll() is not None:
            raise CheckFailed(f"the run ended (exit {proc.returncode}) before the kill: {last_error(proc.log)}")
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    if not os.path.isfile(latest) or open(latest).read() != "step_000002":
        raise CheckFailed(f"not killed after checkpoint 2 (no step 2 and 3 within 420 s?): log {proc.log}")
    run(worker, args + ["--resume"], out, nproc, {"GPU_CHECK_PEAK": out + ".peak"})
    steps = [json.loads(line)["global_step"] for line in open(metrics)]
    diff, _, _ = max_diff(os.path.join(full, "stages/1_final"), os.path.join(out, "stages/1_final"))
    text = (f"resumed after checkpoint 2 (step 3 redone): {same(diff)} vs uninterrupted; logged steps {steps}; peak "
            f"per rank: uninterrupted {peaks(full + '.peak', nproc)}, resumed {peaks(out + '.peak', nproc)}")
    # float32: bit-identical on a CPU; CUDA's atomic adds (the embedding's backward) may round apart, as in check 1
    if steps != [1, 2, 3, 4] or (a.dtype == "float32" and diff > (0 if a.device == "cpu" else 1e-6)):
        raise CheckFailed(text)
    return text

def build_3b(a, processor, shape=None):
    """(policy, frozen reference) at check 3's shape, random weights made on the device in a.dtype."""
    shape, tid = shape or SHAPE[a.device], processor.token_id
    text = dict(shape["text"], bos_token_id=tid["<|endoftext|>"], eos_token_id=processor.eos_token_id)
    cfg = bench.qwen_config(bench.SHAPES["3B"], text=text, vision=shape["vision"])
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(cfg, key, tid[token])
    with torch.random.fork_rng(devices=[]), torch.device(a.device):
        torch.manual_seed(0)
        policy = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=getattr(torch, a.dtype))
    return policy, copy.deepcopy(policy).eval().requires_grad_(False)

def prompt_row(processor, shape):
    """A training row: a random image of shape['image'] (w, h) and a problem that makes it shape['prompt'] tokens."""
    w, h = shape["image"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    scaffold = M.encode(processor, [{"image": image, "problem": ""}])["input_ids"].shape[1]
    tok, unit = processor.tokenizer, "How many red circles and blue squares are there? Count, then answer. "
    ids = tok(unit * (shape["prompt"] // 4), add_special_tokens=False)["input_ids"][:max(0, shape["prompt"] - scaffold)]
    return {"image": image, "problem": tok.decode(ids), "solution": "<answer>3</answer>", "task": "math"}

def setup_3b(a, state):
    """Check 3's model, reference, prompt and config into state; a warm-up rollout, then the seconds of encode +
    prefill (a 1-token rollout) for check 4."""
    shape = SHAPE[a.device]
    processor = M.Processor.from_pretrained(os.path.join(ROOT, "assets/tiny-base"), max_pixels=401_408)
    row = prompt_row(processor, shape)
    policy, ref = build_3b(a, processor)
    rl = dataclasses.replace(config.RLConfig(**config.PRESETS["qwen2.5-vl-3b"]["rl"]), max_new_tokens=shape["new"])
    samples = data.samples_of([row])
    state.update(processor=processor, row=row, policy=policy, ref=ref, cfg=config.Config(rl=rl),
                 prompt_len=M.encode(processor, samples)["input_ids"].shape[1])
    rollout.generate(policy.eval(), processor, samples, group_size=shape["G"], max_new_tokens=2)
    sync(a.device)
    t = time.perf_counter()
    rollout.generate(policy, processor, samples, group_size=shape["G"], max_new_tokens=1)
    sync(a.device)
    state["prefill_s"] = time.perf_counter() - t
    held = f", {gib(torch.cuda.memory_allocated())} allocated" if a.device == "cuda" else ""
    return (f"{M.num_parameters(policy) / 1e9:.3f} B parameters{held}; prompt {state['prompt_len']} tokens; "
            f"encode + prefill {state['prefill_s']:.2f} s")

def grpo_step_3b(a, state, checkpointing):
    """train.grpo_step on check 3's prompt with a fresh MasterAdamW: peak memory and seconds."""
    cuda, policy, rl = a.device == "cuda", state["policy"], state["cfg"].rl
    M.set_memory_options(policy, "sdpa", checkpointing)
    opt = MasterAdamW(policy.parameters(), lr=rl.lr, betas=(0.9, 0.99))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    held, generate = torch.cuda.memory_allocated() if cuda else 0, rollout.generate

    def timed_generate(*args, **kwargs):  # the rollout and its seconds, for check 4
        t = time.perf_counter()
        ro = generate(*args, **kwargs)
        state.setdefault("rollout", (time.perf_counter() - t, ro))
        return ro
    rollout.generate = timed_generate
    try:
        stats, _ = train.grpo_step(policy, state["ref"], state["processor"], [state["row"]], "open",
                                   SHAPE[a.device]["G"], state["cfg"], opt, 0, a.device, 0)
    except torch.cuda.OutOfMemoryError as e:
        raise CheckFailed(f"out of memory at peak {gib(torch.cuda.max_memory_allocated())}: {str(e)[:110]}") from None
    finally:
        rollout.generate = generate
        policy.zero_grad(set_to_none=True)
    mem = f"peak {gib(torch.cuda.max_memory_allocated())} (held before: {gib(held)}); " if cuda else ""
    return (mem + f"rollout {stats['t_gen']:.1f} s, update {stats['seconds'] - stats['t_gen']:.1f} s, "
            f"grad norm {stats['grad_norm']:.3g}, skipped {stats['skipped']}")

def check_3b(a):
    """Check 3's rows: the model, then one GRPO step without and with checkpointing; returns check 4's state."""
    shape, state = SHAPE[a.device], {}
    small = "" if a.device == "cuda" else " (2 layers, 2 vision blocks, vocab 4096)"
    attempt("3 model + prefill", f"Qwen2.5-VL-3B shape{small}, random weights, {a.dtype}, + frozen reference",
            lambda: setup_3b(a, state))
    masters = " + fp32 masters" if a.dtype != "float32" else ""
    for ckpt in (False, True) if "prefill_s" in state else ():
        attempt("3 GRPO step", f"{'with' if ckpt else 'no'} grad checkpointing; 1 prompt of {state['prompt_len']} "
                f"tokens, {shape['image'][0]}x{shape['image'][1]} px image, {shape['new']} new tokens, G={shape['G']}, "
                f"{a.dtype}{masters}", lambda: grpo_step_3b(a, state, ckpt))
    return state

def shard_step_worker(mode, device, dtype):
    """torchrun's script in check 5: check 3's model on every rank, sharded by `mode`, one GRPO step of one prompt per
    rank; this rank's peak memory and seconds into $GPU_CHECK_PEAK.rank<r>."""
    rank, _, W, dev = setup_dist(device)
    a = argparse.Namespace(device=device, dtype=dtype)
    shape = json.loads(os.environ.get("GPU_CHECK_SHAPE", "null")) or SHAPE[device]
    processor = M.Processor.from_pretrained(os.path.join(ROOT, "assets/tiny-base"), max_pixels=401_408)
    row, (policy, ref) = prompt_row(processor, shape), build_3b(a, processor, shape)
    M.set_memory_options(policy, "sdpa", checkpointing=True)
    if mode == "fsdp":
        policy, ref = fsdp.shard(policy, getattr(torch, dtype)), fsdp.shard(ref, getattr(torch, dtype), master=False)
    rl = dataclasses.replace(config.RLConfig(**config.PRESETS["qwen2.5-vl-3b"]["rl"]), max_new_tokens=shape["new"])
    opt = optim.make(mode, policy.parameters(), lr=rl.lr, betas=(0.9, 0.99))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    train.grpo_step(policy, ref, processor, [row] * W, "open", shape["G"], config.Config(rl=rl), opt, rank, dev, 0)
    write_peak(seconds=time.perf_counter() - t)
    del policy, ref, opt  # FSDP's state holds the group: free it before the group goes
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a gloo group left at exit can abort the process

def check_shard(a, mode, shape=None):
    out = os.path.join(a.out, f"shard_{mode}")
    env = {"GPU_CHECK_PEAK": out + ".peak", "GPU_CHECK_SHAPE": json.dumps(shape)}
    run(os.path.join(ROOT, "gpu_check.py"), ["--as-shard-step", mode, a.device, a.dtype], out, 2, env)
    seconds = json.load(open(f"{out}.peak.rank0"))["seconds"]
    return f"peak per rank {peaks(out + '.peak', 2)}; step {seconds:.1f} s"

def bandwidth(device):
    """(bytes/s, where from): the table by GPU name, else a timed large device-to-device copy (read + write)."""
    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        for words, tb_s in BANDWIDTH_TB_S:
            if all(w in name for w in words):
                return tb_s * 1e12, f"{tb_s} TB/s ({' '.join(words).upper()} table)"
    x = torch.empty(2 ** (28 if device == "cuda" else 25), device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    bw = 10 * 2 * x.numel() * x.element_size() / (time.perf_counter() - t)
    return bw, f"{bw / 1e12:.3g} TB/s (measured copy)"

def check_decode(a, state):
    if "rollout" not in state:
        raise CheckFailed("no rollout from check 3")
    seconds, ro = state["rollout"]
    rows, steps, decode_s = ro.completion_ids.shape[0], ro.completion_ids.shape[1] - 1, seconds - state["prefill_s"]
    (bound, words), rate = hbm_bound(a, state["policy"], rows), rows * steps / decode_s
    return (f"{rate:,.0f} tok/s ({rows} rows x {steps} decoded tokens in {decode_s:.2f} s); HBM bound "
            f"{bound:,.0f} tok/s ({words}); fraction {rate / bound:.3f}")

def hbm_bound(a, policy, rows):
    """(tokens/s if each decode step read the text decoder's weights once at the full bandwidth, its words)."""
    n_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters()
                  if ".visual." not in f".{n}")   # text decoder: embeddings (tied head) + layers
    bw, where = bandwidth(a.device)
    return rows / (n_bytes / bw), f"{n_bytes / 1e9:.2f} GB text decoder / {where}"

def check_decode_batch(a, state):
    """Check 4's rows at DECODE_ROWS rows, into state["batch_rows"] (see the top docstring)."""
    policy, processor, shape = state["policy"].eval(), state["processor"], SHAPE[a.device]
    G, T = shape["G"], shape["new"]
    samples = data.samples_of([state["row"]] * (DECODE_ROWS // G))
    rows = len(samples) * G
    rep = M.repeat_batch({k: v.to(a.device) for k, v in M.encode(processor, samples).items()}, G)

    def timed(fn):  # (seconds, result) of a warmed-up call
        fn()
        sync(a.device)
        t = time.perf_counter()
        out = fn()
        sync(a.device)
        return time.perf_counter() - t, out

    def ours(n=T, **kw):
        return rollout.generate(policy, processor, samples, group_size=G, max_new_tokens=n, greedy=True, **kw)

    def theirs(n=T):
        with torch.no_grad():
            return policy.generate(**rep, max_new_tokens=n, do_sample=False, eos_token_id=processor.stop_token_ids,
                                   pad_token_id=processor.pad_token_id, suppress_tokens=processor.vision_token_ids)
    prefill_s = {"ours": timed(lambda: ours(1))[0], "theirs": timed(lambda: theirs(1))[0]}  # each a 1-token call
    bound, words = hbm_bound(a, policy, rows)
    lines, runs = {}, {}
    graphed = "rollout.generate, CUDA graphs" if a.device == "cuda" else "rollout.generate, fixed step (eager on a CPU)"
    for name, fn in (("transformers generate", theirs), ("rollout.generate", ours),
                     (graphed, lambda: ours(cuda_graphs=True))):
        seconds, out = timed(fn)
        hf = name == "transformers generate"
        new = out.shape[1] - rep["input_ids"].shape[1] if hf else out.completion_ids.shape[1]
        rate = rows * (new - 1) / (seconds - prefill_s["theirs" if hf else "ours"])
        lines[name] = (f"{rows * new / seconds:,.0f} tok/s whole call ({rows} rows x {new} tokens in {seconds:.2f} s); "
                       f"decode {rate:,.0f} tok/s = {rate / bound:.3f} of the HBM bound {bound:,.0f} ({words})")
        runs[name] = out
    FixedStep = rollout.FixedStep
    FixedStep.capture = False
    try:
        eager = ours(cuda_graphs=True)
    finally:
        FixedStep.capture = True
    graphs, plain = runs[graphed], runs["rollout.generate"]
    state["batch_rows"] = lines
    same = sum(x == y for x, y in zip(graphs.texts, eager.texts))
    if same != rows or not torch.equal(graphs.logp, eager.logp):
        raise CheckFailed(f"the graphs' answers differ from the eager fixed step's in {rows - same} of {rows} rows "
                          f"(log-probs at most {(graphs.logp - eager.logp).abs().max():.3g} apart)")
    agree = sum(x == y for x, y in zip(graphs.texts, plain.texts))
    return (f"the graphs' answers equal the eager fixed step's in {rows} of {rows} rows, log-probs equal; "
            f"equal to the plain step's in {agree} of {rows} ({a.dtype}: rounding may differ)")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quick", action="store_true", help="checks 0-2 only")
    p.add_argument("--skip-3b", action="store_true", help="skip checks 3-5 (the 3B shape)")
    p.add_argument("--out", help="work folder: runs and logs (default: a new temporary folder)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: torch sees no GPU (--device cpu runs the code paths on the CPU)")
    transformers.logging.set_verbosity_error()
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.out = os.path.abspath(a.out or tempfile.mkdtemp(prefix="gpu_check_"))
    if any(os.path.exists(os.path.join(a.out, d)) for d in ("ddp_one", "resume_full", "resume_killed")):
        raise SystemExit(f"error: {a.out} holds an earlier gpu_check run: give another --out")
    os.makedirs(a.out, exist_ok=True)
    t0, gpus = time.time(), torch.cuda.device_count() if a.device == "cuda" else 0
    where = f"{torch.cuda.get_device_name()} x{gpus}" if gpus else f"CPU, {os.cpu_count()} cores"
    nproc = 2 if a.device == "cpu" or gpus >= 2 else 1
    procs = f"{nproc} processes" + (" (1 GPU: 1 process under torchrun)" if nproc == 1 else "")
    log(f"{where}; work folder {a.out}")
    attempt("0 transformers API", f"transformers {transformers.__version__}", check_api)
    attempt("1 torchrun DDP", f"{procs}, {'NCCL + gloo' if gpus else 'gloo'}, {a.dtype}, tiny base, 3 steps x 8 "
            "prompts x G=4, vs `python train.py`", lambda: check_ddp(a, nproc))
    attempt("2 kill + resume", f"{procs}, {a.dtype}, 4 steps, --ckpt-every 1, SIGKILL to the process groups",
            lambda: check_resume(a, nproc))
    if not (a.quick or a.skip_3b):
        state = check_3b(a)
        attempt("4 rollout vs HBM bound", f"check 3's rollout (no checkpointing), {a.dtype}",
                lambda: check_decode(a, state))
        attempt("4 CUDA graphs = eager", f"{DECODE_ROWS} rows, greedy, {a.dtype}: FixedStep replayed and eager",
                lambda: check_decode_batch(a, state))
        for name, text in state.get("batch_rows", {}).items():
            ROWS.append((f"4 {DECODE_ROWS} rows", name, text, 0.0))
        del state
        gc.collect()  # check 3's model leaves the GPU before check 5's processes share it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for mode in ("none", "optimizer", "fsdp") if nproc == 2 else ():
            attempt("5 sharded GRPO step", f"2 processes, --shard {mode}, check 3's step with checkpointing, "
                    f"1 prompt per rank, {a.dtype}", lambda: check_shard(a, mode))
    cuda = f", CUDA {torch.version.cuda}" if gpus else ""
    print(f"## gpu_check: {where}, torch {torch.__version__}{cuda}, transformers {transformers.__version__}\n")
    print("| check | setting | result | seconds |\n|---|---|---|---:|")
    for row in ROWS:
        print("| " + " | ".join(" ".join(str(c).split()).replace("|", "\\|") for c in row[:3]) + f" | {row[3]:.1f} |")
    print(f"\ntotal {time.time() - t0:.0f} s; {len(FAILED)} failed{': ' + ', '.join(FAILED) if FAILED else ''}; "
          f"runs and logs in {a.out}", flush=True)
    return 1 if FAILED else 0

if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-train"]:  # torchrun's script in check 2
        train_worker(sys.argv[2:])
    elif sys.argv[1:2] == ["--as-shard-step"]:  # torchrun's script in check 5 (its --out is ignored)
        shard_step_worker(*sys.argv[2:5])
    else:
        sys.exit(main())
