"""
Performance figures, printed as a markdown table. Speed and memory targets live here, never in tests.

    python bench.py                                  # tiny and small presets, 56 px and 448 px images, CPU
    python bench.py --preset small --sizes 448 --max-new-tokens 128
    python bench.py --device cuda --dtype bfloat16   # on a GPU

Rollout throughput: new tokens per second (tokens actually generated, each row up to its first EOS) for
  (a) rollout.generate: B prompts, G samples each, the prompt and image prefilled once and the KV cache
      replicated to the G samples;
  (b) transformers' model.generate on the same B prompts each repeated G times (what TRL-style trainers do),
      with the same max_new_tokens, sampling (temperature 1, no top-k / top-p), stop tokens and banned
      vision tokens;
  (c) the uncached reference loop (re-runs prompt, image and answer so far at every step). Its cost grows
      with the answer length, so it runs for --uncached-tokens steps only (default 16): its tokens/s is an
      upper bound and a/c a lower bound of the ratio at max_new_tokens.
Targets: a/b >= 1.0 everywhere, >= 1.5 with 448 px images at 128 new tokens (the vision tower and the
prompt run once per group instead of G times).

Models are randomly initialised (the weights do not change the cost); images are random noise.
"""
import argparse
import math
import time

import numpy as np
import torch
from PIL import Image

import model as M
from rollout import generate


def prompts(B, size, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
             "problem": "How many shapes are in the image? Think, then answer with a number."} for _ in range(B)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def new_tokens(ids, stop_ids):
    """Tokens generated per row, up to and including the first stop token."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    T = ids.shape[1]
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, T)
    return int(first.sum())


def bench_rollout(model, processor, size, B, G, T, T_uncached, device, seed=0):
    samples = prompts(B, size, seed)
    batch = {k: v.to(device) for k, v in M.encode(processor, samples).items()}
    rep = M.repeat_batch(batch, G)
    hf_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=processor.stop_token_ids,
                     pad_token_id=processor.pad_token_id, suppress_tokens=processor.vision_token_ids)

    def ours(n, cache=True):
        return generate(model, processor, samples, group_size=G, max_new_tokens=n, use_cache=cache,
                        generator=torch.Generator(device=device).manual_seed(seed))

    def theirs(n):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(**rep, max_new_tokens=n, **hf_kwargs)[:, rep["input_ids"].shape[1]:]

    ours(2), theirs(2), ours(2, cache=False)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    a, ta = timed(lambda: ours(T), device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    b, tb = timed(lambda: theirs(T), device)
    c, tc = timed(lambda: ours(T_uncached, cache=False), device)
    ra = int(a.lengths.sum()) / ta
    rb = new_tokens(b, processor.stop_token_ids) / tb
    rc = int(c.lengths.sum()) / tc
    return dict(prompt_len=batch["input_ids"].shape[1], a=ra, b=rb, c=rc, ab=ra / rb, ac=ra / rc, mem=mem, ta=ta)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "small"], choices=sorted(M.PRESETS),
                   help="model sizes built in code")
    p.add_argument("--sizes", nargs="+", type=int, default=[56, 448], help="square image sizes in pixels")
    p.add_argument("--batch", type=int, default=4, help="prompts B")
    p.add_argument("--group", type=int, default=8, help="samples per prompt G")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--uncached-tokens", type=int, default=16, help="new tokens for the slow uncached loop (c)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"rollout throughput, new tokens/s; B={args.batch} prompts x G={args.group}, "
          f"{args.max_new_tokens} new tokens ((c): {args.uncached_tokens}); {args.dtype} on {where}; "
          f"torch {torch.__version__}\n")
    print("| preset | params | image px | prompt tokens | (a) ours | (b) HF generate x G | (c) uncached | a/b | a/c | (a) s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.preset:
        model, processor = M.load(preset, device=args.device, dtype=dtype, max_pixels=max(args.sizes) ** 2)
        model.eval()
        for size in args.sizes:
            r = bench_rollout(model, processor, size, args.batch, args.group, args.max_new_tokens,
                              args.uncached_tokens, args.device)
            mem = "-" if math.isnan(r["mem"]) else f"{r['mem']:.2f}"
            print(f"| {preset} | {M.num_parameters(model) / 1e6:.2f} M | {size} | {r['prompt_len']} | {r['a']:.0f} | "
                  f"{r['b']:.0f} | {r['c']:.0f} | {r['ab']:.2f} | {r['ac']:.1f} | {r['ta']:.1f} | {mem} |",
                  flush=True)


if __name__ == "__main__":
    main()
