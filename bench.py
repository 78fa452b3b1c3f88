"""
bench.py: rollout speed and memory, printed as a markdown table. Speed and memory targets live here, not in tests.

    python bench.py                                  # tiny and small presets at 56 and 448 px, + the training shape
    python bench.py --preset small --sizes 448 --repeats 9
    python bench.py --device cuda --dtype bfloat16   # on a GPU

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
Target: a/b >= 1.0 in every row, with its spread, and >= 1.5 at 448 px (vision tower and prompt once per group).
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

TRAINING = dict(model="assets/tiny-base", kind="training", size=112, batch=32, group=8, max_new_tokens=64)

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
        for name in (["a", "b"] if r % 2 == 0 else ["b", "a"]):
            sync(device)
            t = time.perf_counter()
            n = fns[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - t)
            rates[name].append(n / seconds[name][-1])
    return rates, seconds

def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def _memory_child(job):
    """In a fresh process: one call of one arm; the peak memory above what was in use before it, in bytes."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
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

def spread(xs, fmt):
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=["tiny", "small"], choices=sorted(M.PRESETS), help="random models")
    p.add_argument("--sizes", nargs="+", type=int, default=[56, 448], help="square image sizes in pixels")
    p.add_argument("--batch", type=int, default=4, help="prompts B of the preset rows")
    p.add_argument("--group", type=int, default=8, help="samples per prompt G of the preset rows")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length of the preset rows")
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True, help="add the training row")
    p.add_argument("--warmup", type=int, default=2, help="untimed full-length calls of each arm first")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each arm, interleaved")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
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
    print(f"rollout throughput, new tokens/s: median (min–max) of {args.repeats} interleaved calls per arm after "
          f"{args.warmup} warm-up calls; {args.dtype} on {where}; torch {torch.__version__}\n")
    print(f"| model | params | image px | B x G | new tokens | prompt tokens | (a) ours | (b) HF generate x G | "
          f"a/b | (a) s | peak {'GPU memory allocated' if cuda else 'resident memory'}, MiB: (a) | (b) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = [dict(model=preset, kind="preset", size=size, batch=args.batch, group=args.group,
                 max_new_tokens=args.max_new_tokens) for preset in args.preset for size in args.sizes]
    for job in jobs + ([dict(TRAINING)] if args.training else []):
        job.update(device=args.device, dtype=args.dtype, threads=args.threads)
        model, processor, samples, fns = load(job)
        rates, seconds = throughput(fns, args.device, args.warmup, args.repeats)
        ratios = [a / b for a, b in zip(rates["a"], rates["b"])]
        mem = peak_memory(job) if args.memory else {"a": float("nan"), "b": float("nan")}
        name = "tiny base (training)" if job["kind"] == "training" else job["model"]
        print(f"| {name} | {M.num_parameters(model) / 1e6:.2f} M | {job['size']} | {job['batch']} x {job['group']} | "
              f"{job['max_new_tokens']} | {M.encode(processor, samples)['input_ids'].shape[1]} | "
              f"{spread(rates['a'], '.0f')} | {spread(rates['b'], '.0f')} | {spread(ratios, '.2f')} | "
              f"{statistics.median(seconds['a']):.2f} | {mem['a'] / 2**20:.0f} | {mem['b'] / 2**20:.0f} |", flush=True)

if __name__ == "__main__":
    main()
