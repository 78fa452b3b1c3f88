"""
gpu_check.py: checks of this project on one or two GPUs, printed as ONE markdown table (under 10 min on an H100).

    python gpu_check.py                    # every check; exits 1 when any failed
    python gpu_check.py --quick            # checks 0-2 only (tiny runs)
    python gpu_check.py --skip-3b --out /tmp/gc
    python gpu_check.py --device cpu --quick   # the same code paths on a CPU: gloo, float32, a 2-layer "3B"

0. transformers API: the installed transformers' Qwen2.5-VL forward takes `cache=` and `mm_encoder_outputs=`,
   which rollout.py and model.completion_logprobs pass (older releases name the cache `past_key_values`).
1. torchrun DDP: `torchrun --standalone --nproc_per_node=2 train.py` (tiny base, open stage, 3 steps; NCCL with
   gloo for CPU tensors) against `python train.py` on one process: max abs difference of the final weights
   (float32 on a CPU: allclose as tests/test_train.py, bit-identical expected; bf16 on CUDA: reported). With one
   GPU it runs one process under torchrun (train.py puts rank r on cuda:r) and says so.
2. Kill + resume: the same run with 4 steps and a checkpoint every step, SIGKILLed (its process group) after the
   checkpoint of step 2 while step 3 is logged and its checkpoint held back, then --resume: the final weights
   against an uninterrupted run, the log holds each step once, and each rank's peak memory (train.py reports
   none, so torchrun runs this file's train_worker: train.main, then torch.cuda.max_memory_allocated).
3. One GRPO step at the real Qwen2.5-VL-3B shape (bench.SHAPES["3B"], random weights built on the GPU, bf16 with
   fp32 masters, optim.MasterAdamW), a frozen reference copy, one prompt of about 1,300 tokens with a 401,408-pixel
   random image, 256 new tokens, G = 4: train.grpo_step (rollout.generate, rewards, grpo loss with the k3 KL,
   backward, MasterAdamW.step); peak memory and seconds without, then with gradient checkpointing
   (model.set_memory_options). The prompt is encoded by model.encode with the shipped tiny base's processor, the
   config's image/vision token ids set to its tokenizer's (the vocabulary stays 151,936).
4. The rollout of check 3 in decode tokens/s (rows x decoded tokens / (rollout - prefill seconds)) against the HBM
   bound rows / (text-decoder parameter bytes / memory bandwidth); bandwidth by GPU name, or measured by a large
   device-to-device copy when the name is unknown.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
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

ROOT = os.path.dirname(os.path.abspath(__file__))
# HBM bandwidth in TB/s by GPU name (all the lower-case words must appear in torch.cuda.get_device_name()).
BANDWIDTH_TB_S = [(("h200",), 4.8), (("h100", "pcie"), 2.0), (("h100",), 3.35), (("a100", "80gb"), 2.0),
                  (("a100",), 1.56)]
# Check 3's shape: the real one on a GPU; on a CPU 2 text layers and 2 vision blocks at the real widths.
SHAPE = {"cuda": dict(text={}, vision={}, image=(448, 896), prompt=1300, new=256, G=4),
         "cpu": dict(text=dict(num_hidden_layers=2, vocab_size=4096), vision=dict(depth=2, fullatt_block_indexes=[1]),
                     image=(112, 112), prompt=120, new=8, G=4)}
ROWS = []      # (check, setting, result, seconds)
FAILED = []


class CheckFailed(Exception):
    pass


def log(msg):
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def attempt(check, setting, fn):
    """A table row from fn() -> result text; an exception becomes a FAILED row and the script goes on."""
    log(f"{check}: {setting}")
    t0 = time.time()
    try:
        text = fn()
    except Exception as e:  # noqa: BLE001 -- every failure is a row
        FAILED.append(check)
        text = f"**FAILED** {type(e).__name__}: {e}"
        log(f"{check} failed: {type(e).__name__}: {e}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ROWS.append((check, setting, text, time.time() - t0))


def cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")[:600]


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
    """Popen of `torchrun --standalone --nproc_per_node=nproc script args --out out` (nproc 0: plain python), in
    its own process group, its output in out + '.log'."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc else []) + [script] + args + ["--out", out]
    logf = open(out + ".log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    proc.log = out + ".log"
    return proc


def last_error(path):
    lines = [ln.strip() for ln in open(path, errors="replace") if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Exit)\b", ln)]
    return (errors or lines or ["(no output)"])[-1]


def finish(proc, timeout=420):
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise CheckFailed(f"no end after {timeout} s (log {proc.log})")
    if rc != 0:
        raise CheckFailed(f"exit {rc}: {last_error(proc.log)} (log {proc.log})")


def run(script, args, out, nproc, env=None):
    finish(start(script, args, out, nproc, env))
    return out


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def max_diff(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    if a.keys() != b.keys():
        raise CheckFailed(f"{a_dir} and {b_dir} hold different tensors")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a), a, b


def train_worker(argv):
    """torchrun's script in check 2: train.main(argv), then this rank's peak memory (CUDA allocated, else the
    resident set) in $GPU_CHECK_PEAK.rank<r>. With $GPU_CHECK_HOLD=k the run waits, unsaved, at the checkpoint of
    global step k (its step logged), so the parent's SIGKILL lands after checkpoint k - 1 and before the end."""
    import train
    hold = int(os.environ.get("GPU_CHECK_HOLD", 0))
    save = train.save_checkpoint

    def save_or_hold(out, step, *args, **kwargs):
        if step == hold:
            time.sleep(3600)
        return save(out, step, *args, **kwargs)
    train.save_checkpoint = save_or_hold
    train.main(argv)
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = torch.cuda.max_memory_allocated(local) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if os.environ.get("GPU_CHECK_PEAK"):
        with open(f"{os.environ['GPU_CHECK_PEAK']}.rank{rank}", "w") as f:
            json.dump({"peak_bytes": peak, "kind": "CUDA allocated" if cuda else "resident set"}, f)


def peaks(prefix, nproc):
    got = [json.load(open(f"{prefix}.rank{r}")) for r in range(nproc)]
    return f"peak {got[0]['kind']} per rank: " + ", ".join(gib(g["peak_bytes"]) for g in got)


# ---- The checks
def check_api():
    from transformers import Qwen2_5_VLForConditionalGeneration as C
    params = inspect.signature(C.forward).parameters
    missing = [p for p in ("cache", "mm_encoder_outputs") if p not in params]
    ckpt = "activation_checkpointing_enable" if hasattr(C, "activation_checkpointing_enable") else \
        "gradient_checkpointing_enable (old name)"
    if missing:
        raise CheckFailed(f"forward lacks {missing}: rollout.generate reads `out.cache` and completion_logprobs "
                          f"passes mm_encoder_outputs= (unknown kwargs are ignored: logprobs without the image)")
    return f"forward(cache=, mm_encoder_outputs=) ok; checkpointing via {ckpt}"


def check_ddp(a, nproc):
    one = run("train.py", train_args(a, 3), os.path.join(a.out, "ddp_one"), 0)
    many = run("train.py", train_args(a, 3), os.path.join(a.out, f"ddp_{nproc}"), nproc)
    diff, A, B = max_diff(os.path.join(one, "stages/1_final"), os.path.join(many, "stages/1_final"))
    start_w = weights(os.path.join(one, "stages/0_open_start"))
    moved = any(not torch.equal(A[k], start_w[k]) for k in A)
    text = (f"{nproc} vs 1 process: " + ("bit-identical" if diff == 0 else f"max abs diff {diff:.3g}")
            + f" ({len(A)} tensors); the steps moved the weights: {moved}")
    if not moved:
        raise CheckFailed(text)
    if a.dtype == "float32" and not all(torch.allclose(A[k], B[k], atol=1e-6, rtol=1e-4) for k in A):
        raise CheckFailed(text + "; float32 must match (atol 1e-6, rtol 1e-4)")
    return text


def check_resume(a, nproc):
    args = train_args(a, 4, ["--ckpt-every", "1"])
    full = os.path.join(a.out, "resume_full")
    run(ROOT + "/gpu_check.py", ["--as-train"] + args, full, nproc, {"GPU_CHECK_PEAK": full + ".peak"})
    out = os.path.join(a.out, "resume_killed")
    proc = start(ROOT + "/gpu_check.py", ["--as-train"] + args, out, nproc, {"GPU_CHECK_HOLD": "3"})
    latest, metrics, deadline = os.path.join(out, "checkpoints", "latest"), os.path.join(out, "metrics.jsonl"), \
        time.time() + 420
    while time.time() < deadline and proc.poll() is None and not (
            os.path.isfile(latest) and open(latest).read().strip() == "step_000002"
            and os.path.isfile(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.05)
    if proc.poll() is not None:
        raise CheckFailed(f"the run ended (exit {proc.returncode}) before the kill: {last_error(proc.log)}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if open(latest).read().strip() != "step_000002":
        raise CheckFailed(f"killed at {open(latest).read().strip()}, not after step 2")
    run(ROOT + "/gpu_check.py", ["--as-train"] + args + ["--resume"], out, nproc, {"GPU_CHECK_PEAK": out + ".peak"})
    steps = [json.loads(line)["global_step"] for line in open(metrics)]
    diff, _, _ = max_diff(os.path.join(full, "stages/1_final"), os.path.join(out, "stages/1_final"))
    text = (f"killed after checkpoint 2 (step 3 logged), resumed: " + ("bit-identical" if diff == 0 else
            f"max abs diff {diff:.3g}") + f" vs uninterrupted; logged steps {steps}; uninterrupted "
            + peaks(full + ".peak", nproc) + "; resumed " + peaks(out + ".peak", nproc).split(": ")[1])
    if steps != [1, 2, 3, 4] or (a.dtype == "float32" and diff != 0):
        raise CheckFailed(text)
    return text


def build_3b(a, processor):
    """(policy, frozen reference) at check 3's shape, random weights made on the device in a.dtype."""
    import bench
    from transformers import Qwen2_5_VLForConditionalGeneration
    shape, tid = SHAPE[a.device], processor.token_id
    text = dict(shape["text"], bos_token_id=tid["<|endoftext|>"], eos_token_id=processor.eos_token_id)
    cfg = bench.qwen_config(bench.SHAPES["3B"], text=text, vision=shape["vision"])
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(cfg, key, tid[token])       # the tiny tokenizer's ids: model.encode then lays the prompt out
    with torch.random.fork_rng(devices=[]), torch.device(a.device):
        torch.manual_seed(0)
        policy = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=getattr(torch, a.dtype))
    return policy, copy.deepcopy(policy).eval().requires_grad_(False)


def prompt_row(processor, shape):
    """One rows-format prompt: a random image of shape['image'] (w, h) and a problem padded to shape['prompt']."""
    import model as M
    from PIL import Image
    w, h = shape["image"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    base = M.encode(processor, [{"image": image, "problem": ""}])["input_ids"].shape[1]
    tok, unit = processor.tokenizer, "How many red circles and blue squares are there? Count, then answer. "
    ids = tok(unit * (shape["prompt"] // 4), add_special_tokens=False)["input_ids"][:max(0, shape["prompt"] - base)]
    return {"image": image, "problem": tok.decode(ids), "solution": "<answer>3</answer>", "task": "math"}


@contextlib.contextmanager
def timed_calls(module, name, record):
    """Wrap module.name so that each call appends (seconds, result) to record."""
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        record.append((time.perf_counter() - t, out))
        return out
    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, fn)


def setup_3b(a, state):
    """Check 3's model, reference, prompt and optimizer settings into state; an untimed warm-up rollout, then the
    time of encode + prefill (a 1-token rollout) for check 4."""
    import config
    import data
    import model as M
    import rollout
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    shape = SHAPE[a.device]
    processor = M.Processor.from_pretrained(os.path.join(ROOT, "assets/tiny-base"), max_pixels=401_408)
    row = prompt_row(processor, shape)
    policy, ref = build_3b(a, processor)
    rl = dataclasses.replace(config.RLConfig(**config.PRESETS["qwen2.5-vl-3b"]["rl"]), max_new_tokens=shape["new"])
    samples = data.samples_of([row])
    state.update(processor=processor, row=row, policy=policy, ref=ref, cfg=config.Config(rl=rl),
                 prompt_len=M.encode(processor, samples)["input_ids"].shape[1])
    rollout.generate(policy.eval(), processor, samples, group_size=shape["G"], max_new_tokens=2)   # warm-up
    sync(a.device)
    t = time.perf_counter()
    rollout.generate(policy, processor, samples, group_size=shape["G"], max_new_tokens=1)
    sync(a.device)
    state["prefill_s"] = time.perf_counter() - t
    held = f", {gib(torch.cuda.memory_allocated())} allocated" if a.device == "cuda" else ""
    return (f"{M.num_parameters(policy) / 1e9:.3f} B parameters{held}; prompt {state['prompt_len']} tokens; "
            f"encode + prefill {state['prefill_s']:.2f} s")


def grpo_step_3b(a, state, checkpointing):
    """train.grpo_step on check 3's prompt with a fresh MasterAdamW: its peak memory and seconds."""
    import model as M
    import rollout
    import train
    from optim import MasterAdamW
    cuda, policy, rl = a.device == "cuda", state["policy"], state["cfg"].rl
    M.set_memory_options(policy, "sdpa", checkpointing)
    opt = MasterAdamW(policy.parameters(), lr=rl.lr, betas=(0.9, 0.99))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    held, calls = torch.cuda.memory_allocated() if cuda else 0, []
    with timed_calls(rollout, "generate", calls):
        stats, _ = train.grpo_step(policy, state["ref"], state["processor"], [state["row"]], "open", SHAPE[a.device]["G"],
                                   state["cfg"], opt, 0, a.device, 0)
    state.setdefault("rollout", calls[0])
    mem = f"peak {gib(torch.cuda.max_memory_allocated())} (held before: {gib(held)}); " if cuda else ""
    return (mem + f"rollout {stats['t_gen']:.1f} s, update {stats['seconds'] - stats['t_gen']:.1f} s, "
            f"grad norm {stats['grad_norm']:.3g}, skipped {stats['skipped']}")


def check_3b(a):
    """Check 3's rows (model, then one GRPO step without and with checkpointing); returns what check 4 needs."""
    shape, state = SHAPE[a.device], {}
    small = "" if a.device == "cuda" else " (2 layers, 2 vision blocks, vocab 4096)"
    attempt("3 model + prefill", f"Qwen2.5-VL-3B shape{small}, random weights, {a.dtype}, + frozen reference",
            lambda: setup_3b(a, state))
    if "prefill_s" in state:
        for ckpt in (False, True):
            attempt("3 GRPO step", f"{'with' if ckpt else 'no'} grad checkpointing; 1 prompt of {state['prompt_len']} "
                    f"tokens, {shape['image'][0]}x{shape['image'][1]} px image, {shape['new']} new tokens, "
                    f"G={shape['G']}, {a.dtype} + fp32 masters", lambda: grpo_step_3b(a, state, ckpt))
    return state


def bandwidth(device):
    """(bytes/s, where from): the table by GPU name, else a timed large device-to-device copy."""
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
    bw = 10 * 2 * x.numel() * x.element_size() / (time.perf_counter() - t)  # read + write
    return bw, f"{bw / 1e12:.3g} TB/s (measured copy)"


def check_decode(a, measured):
    if not measured or "rollout" not in measured:
        raise CheckFailed("no rollout from check 3")
    seconds, ro = measured["rollout"]
    rows, steps = ro.completion_ids.shape[0], ro.completion_ids.shape[1] - 1
    rate = rows * steps / (seconds - measured["prefill_s"])
    policy = measured["policy"]
    n_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if ".visual." not in f".{n}")
    bw, where = bandwidth(a.device)
    bound = rows / (n_bytes / bw)
    return (f"{rate:,.0f} tok/s ({rows} rows x {steps} decoded tokens in {seconds - measured['prefill_s']:.2f} s); "
            f"HBM bound {bound:,.0f} tok/s ({n_bytes / 1e9:.2f} GB text decoder / {where}); "
            f"fraction {rate / bound:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quick", action="store_true", help="checks 0-2 only")
    p.add_argument("--skip-3b", action="store_true", help="skip checks 3-4")
    p.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: torch sees no GPU (use --device cpu to try the code paths)")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.out = os.path.abspath(a.out or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(a.out, exist_ok=True)
    if any(os.path.exists(os.path.join(a.out, d)) for d in ("ddp_one", "resume_full", "resume_killed")):
        raise SystemExit(f"error: {a.out} holds an earlier gpu_check run: give another --out")
    t0 = time.time()
    import transformers
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    where = (f"{torch.cuda.get_device_name()} x{gpus}" if gpus else f"CPU, {os.cpu_count()} cores")
    nproc = 2 if a.device == "cpu" or gpus >= 2 else 1
    backend = "NCCL + gloo" if a.device == "cuda" else "gloo"
    one_gpu = " (1 GPU: 1 process under torchrun)" if nproc == 1 else ""
    log(f"{where}; work folder {a.out}")
    attempt("0 transformers API", f"transformers {transformers.__version__}", check_api)
    attempt("1 torchrun DDP", f"{nproc} processes{one_gpu}, {backend}, {a.dtype}, tiny base, 3 steps x 8 prompts x G=4",
            lambda: check_ddp(a, nproc))
    attempt("2 kill + resume", f"{nproc} processes{one_gpu}, {a.dtype}, 4 steps, --ckpt-every 1, SIGKILL to the group",
            lambda: check_resume(a, nproc))
    if not (a.quick or a.skip_3b):
        measured = check_3b(a)
        attempt("4 rollout vs HBM bound", f"the rollout of check 3 (no checkpointing), {a.dtype}",
                lambda: check_decode(a, measured))
    cuda_v = f", CUDA {torch.version.cuda}" if a.device == "cuda" else ""
    print(f"## gpu_check: {where}, torch {torch.__version__}{cuda_v}, transformers {transformers.__version__}\n")
    print("| check | setting | result | seconds |\n|---|---|---|---:|")
    for check, setting, result, seconds in ROWS:
        print(f"| {cell(check)} | {cell(setting)} | {cell(result)} | {seconds:.1f} |")
    print(f"\ntotal {time.time() - t0:.0f} s; {len(FAILED)} failed{': ' + ', '.join(FAILED) if FAILED else ''}; "
          f"logs and runs in {a.out}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-train"]:
        train_worker(sys.argv[2:])
    else:
        sys.exit(main())
