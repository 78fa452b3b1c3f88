"""
Performance figures, printed as a markdown table. Speed and memory targets live here, never in tests.

    python bench.py                                  # tiny and small presets at 56 and 448 px, + the training shape
    python bench.py --preset small --sizes 448 --repeats 9
    python bench.py --device cuda --dtype bfloat16   # on a GPU

Rollout throughput, in new tokens per second (tokens actually generated, each row up to its first EOS), of
  (a) rollout.generate: B prompts, G samples each; the prompt and image are prefilled once and the KV cache is
      replicated to the G samples; one torch.Generator per prompt, seeded as training seeds them
      (rollout.prompt_generators), so a prompt's answers do not depend on its batch-mates;
  (b) transformers' model.generate on the same B prompts each repeated G times (what TRL-style trainers do),
      with the same max_new_tokens, sampling (temperature 1, no top-k / top-p), stop tokens and banned vision
      tokens; it draws from the global RNG (model.generate takes no per-prompt generators).
How it is timed, so that a ratio can be quoted: each arm runs --warmup full-length calls first (not timed), then
--repeats timed calls, the two arms interleaved and alternating which goes first (a b, b a, a b, ...), so a
drift of the machine's speed reaches both. Printed: the median over the repeats and its spread (min-max), for
each arm and for the ratio a/b of each interleaved pair.
Memory, per arm, in a fresh process each (so one arm's freed memory cannot hide the other's): on a GPU the peak
of torch.cuda.max_memory_allocated during one call minus the allocation before it; on a CPU the peak resident
set size during one call (sampled every 2 ms) minus the resident size before it.

Rows: the tiny and small presets (randomly initialised: the weights do not change the cost of a step, and a
random model rarely stops early, so both arms decode every token) at --sizes px with B = --batch prompts; and
the training shape of the default run, `python train.py`: the shipped base (assets/tiny-base), 32 synthetic
training prompts at 112 px, G = 8, 64 new tokens, where answers stop at their EOS as in training.
Target: a/b >= 1.0 in every row, with its spread, and >= 1.5 with 448 px images (the vision tower and the prompt
run once per group instead of G times).
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
import model as M
from rollout import generate, prompt_generators

TRAINING = {"model": "assets/tiny-base", "size": 112, "batch": 32, "group": 8, "max_new_tokens": 64}


def prompts(kind, B, size, seed=0):
    """B prompts: random-noise images with a counting question (presets), or synthetic training rows."""
    if kind == "training":
        rows = data.make_split("train", B, seed=seed, size=size)
        return [{"image": r["image"], "problem": r["problem"]} for r in rows]
    rng = np.random.default_rng(seed)
    return [{"image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
             "problem": "How many shapes are in the image? Think, then answer with a number."} for _ in range(B)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def new_tokens(ids, stop_ids):
    """Tokens generated per row, up to and including the first stop token, summed over rows."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    T = ids.shape[1]
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, T)
    return int(first.sum())


def arms(model, processor, samples, G, T, device, seed=0):
    """{"a": call, "b": call}: each runs one rollout and returns the number of new tokens it generated."""
    rep = M.repeat_batch({k: v.to(device) for k, v in M.encode(processor, samples).items()}, G)
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=processor.stop_token_ids,
                     pad_token_id=processor.pad_token_id, suppress_tokens=processor.vision_token_ids)
    calls = {"n": 0}

    def ours():
        calls["n"] += 1                                   # a fresh training step's generators every call
        gens = prompt_generators(seed, calls["n"], 0, len(samples), device)
        return int(generate(model, processor, samples, group_size=G, max_new_tokens=T, generator=gens).lengths.sum())

    def theirs():
        with torch.no_grad():
            out = model.generate(**rep, max_new_tokens=T, **hf_kwargs)[:, rep["input_ids"].shape[1]:]
        return new_tokens(out, processor.stop_token_ids)

    return {"a": ours, "b": theirs}


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    n = fn()
    sync(device)
    return n, time.perf_counter() - t


def throughput(fns, device, warmup, repeats):
    """Tokens/s of each arm per repeat, interleaved (a b, b a, ...), after `warmup` untimed calls of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rates = {name: [] for name in fns}
    seconds = {name: [] for name in fns}
    for r in range(repeats):
        for name in (["a", "b"] if r % 2 == 0 else ["b", "a"]):
            n, s = timed(fns[name], device)
            rates[name].append(n / s)
            seconds[name].append(s)
    return rates, seconds


def load(spec, device, dtype, max_pixels):
    model, processor = M.load(spec, device=device, dtype=dtype, max_pixels=max_pixels)
    return model.eval(), processor


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(job, queue):
    """In a fresh process: one call of one arm; the peak memory above what was in use before it, in bytes."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = job["device"]
    model, processor = load(job["model"], device, getattr(torch, job["dtype"]), job["size"] ** 2)
    fn = arms(model, processor, prompts(job["kind"], job["batch"], job["size"]), job["group"], job["max_new_tokens"],
              device)[job["arm"]]
    fn()                                                  # the first call's one-off allocations are not the arm's
    if device.startswith("cuda"):
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        queue.put(torch.cuda.max_memory_allocated() - before)
        return
    before, peak, running = _resident_bytes(), [0], [True]

    def poll():
        while running[0]:
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.002)
    watcher = threading.Thread(target=poll)
    watcher.start()
    fn()
    running[0] = False
    watcher.join()
    queue.put(max(peak[0], _resident_bytes()) - before)


def peak_memory(job):
    """{"a": bytes, "b": bytes}, each arm measured in its own spawned process."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for arm in ("a", "b"):
        queue = ctx.Queue()
        p = ctx.Process(target=_memory_child, args=({**job, "arm": arm}, queue))
        # A fixed mmap threshold: glibc then returns every large freed block to the system, so the warm-up call's
        # memory does not stay resident and hide the measured call's (by default the threshold grows after a free).
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            p.start()
        finally:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        out[arm] = queue.get()
        p.join()
    return out


def spread(xs, fmt):
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=["tiny", "small"], choices=sorted(M.PRESETS),
                   help="randomly initialised model sizes built in code")
    p.add_argument("--sizes", nargs="+", type=int, default=[56, 448], help="square image sizes in pixels")
    p.add_argument("--batch", type=int, default=4, help="prompts B of the preset rows")
    p.add_argument("--group", type=int, default=8, help="samples per prompt G of the preset rows")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length of the preset rows")
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                   help="add the default run's rollout: the shipped base, 32 prompts at 112 px, G=8, 64 tokens")
    p.add_argument("--warmup", type=int, default=2, help="untimed full-length calls of each arm first")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each arm, interleaved")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each arm's peak memory in a fresh process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("error: --repeats must be >= 1 and --warmup >= 0")
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    memory = "GPU memory allocated" if cuda else "resident memory"
    print(f"rollout throughput, new tokens/s: median (min–max) of {args.repeats} interleaved calls per arm after "
          f"{args.warmup} warm-up calls; {args.dtype} on {where}; torch {torch.__version__}\n")
    print(f"| model | params | image px | B x G | new tokens | prompt tokens | (a) ours | (b) HF generate x G | "
          f"a/b | (a) s | peak {memory}, MiB: (a) | (b) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = [dict(model=preset, kind="preset", size=size, batch=args.batch, group=args.group,
                 max_new_tokens=args.max_new_tokens) for preset in args.preset for size in args.sizes]
    if args.training:
        jobs.append(dict(TRAINING, kind="training"))
    for job in jobs:
        job.update(device=args.device, dtype=args.dtype, threads=args.threads)
        model, processor = load(job["model"], args.device, getattr(torch, args.dtype), job["size"] ** 2)
        samples = prompts(job["kind"], job["batch"], job["size"])
        rates, seconds = throughput(arms(model, processor, samples, job["group"], job["max_new_tokens"], args.device),
                                    args.device, args.warmup, args.repeats)
        ratios = [a / b for a, b in zip(rates["a"], rates["b"])]
        mem = peak_memory(job) if args.memory else {"a": float("nan"), "b": float("nan")}
        prompt_len = M.encode(processor, samples)["input_ids"].shape[1]
        name = "tiny base (training)" if job["kind"] == "training" else job["model"]
        print(f"| {name} | {M.num_parameters(model) / 1e6:.2f} M | {job['size']} | {job['batch']} x {job['group']} | "
              f"{job['max_new_tokens']} | {prompt_len} | {spread(rates['a'], '.0f')} | {spread(rates['b'], '.0f')} | "
              f"{spread(ratios, '.2f')} | {statistics.median(seconds['a']):.2f} | {mem['a'] / 2**20:.0f} | "
              f"{mem['b'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
