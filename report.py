"""
report.py: what a run prints and draws from its metrics log at the end: the per-stage training accuracy (its change
by a least-squares line through every step, with a standard error) and the reward curve (a PNG drawn with pillow);
and ablate.py's picture of each arm's change from the base, with error bars.

    metrics = [json.loads(line) for line in open("runs/tiny/metrics.jsonl")]
    print(stage_summary(metrics))
    plot_rewards(metrics, "runs/tiny/rewards.png")
"""
import math

from PIL import Image, ImageDraw

def stage_summary(metrics):
    """Per stage: the mean training accuracy of its first and last quarter of steps, and its change by a least-squares
    line through every step, +- one standard error (a rise is a change above about twice that)."""
    lines = ["training accuracy per stage (mean of the first and last quarter of its steps; change over the "
             "stage by a least-squares line, +- one standard error):"]
    mean = lambda xs: sum(xs) / len(xs)
    for stage in dict.fromkeys(m["stage"] for m in metrics):
        ms = [m for m in metrics if m["stage"] == stage]
        n, q = len(ms), max(1, len(ms) // 4)
        ys = [m["reward_accuracy"] for m in ms]
        change = "change n/a (under 3 steps)"   # a line through 2 points has no standard error
        if n >= 3:
            xm, ym = (n - 1) / 2, mean(ys)
            sxx = sum((x - xm) ** 2 for x in range(n))
            slope = sum((x - xm) * (y - ym) for x, y in enumerate(ys)) / sxx
            resid = sum((y - ym - slope * (x - xm)) ** 2 for x, y in enumerate(ys)) / (n - 2)
            change = f"change {slope * (n - 1):+.3f} +- {(resid / sxx) ** 0.5 * (n - 1):.3f}"
        rewards = [m["reward_total"] for m in ms]
        lines.append(f"  {stage:6s} {n:4d} steps | accuracy {mean(ys[:q]):.3f} -> {mean(ys[-q:]):.3f} | "
                     f"{change} | reward {mean(rewards[:q]):.3f} -> {mean(rewards[-q:]):.3f}"
                     f" | {sum(m['seconds'] for m in ms):.0f}s")
        replay = [m["replay_accuracy"] for m in ms if "replay_accuracy" in m]
        if replay:
            r = max(1, len(replay) // 4)
            lines.append(f"  {'':6s} replayed open questions | accuracy {mean(replay[:r]):.3f} -> "
                         f"{mean(replay[-r:]):.3f}")
    return "\n".join(lines)

def plot_rewards(metrics, path, keys=("reward_total", "reward_accuracy"), width=960, height=360):
    """PNG of training reward per step across the stages (raw as dots, moving average of 9 as a line)."""
    colours = {"reward_total": (40, 80, 200), "reward_accuracy": (220, 90, 30)}
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    L, R, T, B = 50, 20, 30, 40
    n = len(metrics)
    x = lambda i: L + (width - L - R) * i / max(1, n - 1)
    y = lambda v: height - B - (height - T - B) * v / 2.0          # rewards lie in [0, 2]
    for v in (0, 0.5, 1.0, 1.5, 2.0):
        d.line([(L, y(v)), (width - R, y(v))], fill=(230, 230, 230))
        d.text((8, y(v) - 6), f"{v:.1f}", fill="black")
    starts = [i for i in range(n) if i == 0 or metrics[i]["stage"] != metrics[i - 1]["stage"]] + [n]
    for i in starts[:-1]:                                         # stage boundaries and names
        d.line([(x(i), T), (x(i), height - B)], fill=(150, 150, 150))
        d.text((x(i) + 4, T - 16), metrics[i]["stage"], fill="black")
    for key in keys:
        c = colours.get(key, (0, 0, 0))
        light = tuple(min(255, 130 + ch // 2) for ch in c)
        vals = [m[key] for m in metrics]
        for i, v in enumerate(vals):
            d.ellipse([x(i) - 1.5, y(v) - 1.5, x(i) + 1.5, y(v) + 1.5], fill=light)
        for a, b in zip(starts, starts[1:]):                     # moving average within each stage
            seg = [sum(w) / len(w) for w in (vals[max(a, i - 4):min(b, i + 5)] for i in range(a, b))]
            if len(seg) > 1:
                d.line([(x(a + j), y(v)) for j, v in enumerate(seg)], fill=c, width=2)
    d.text((L, height - B + 12), "training step (all stages)   blue: reward (accuracy + format)   "
                                 "orange: accuracy", fill="black")
    img.save(path)

def plot_changes(changes, path, width=960, height=400):
    """PNG of each arm's change from the base per (task, split) of the open answers: a bar per arm at its mean over
    seeds with its 95% interval as an error bar. changes: {arm: {(split, task, form): {"mean", "half"}}}."""
    arms = list(changes)
    cells = list(dict.fromkeys(c for per in changes.values() for c in per if c[2] == "open"))  # splits as given
    splits = list(dict.fromkeys(c[0] for c in cells))
    cells.sort(key=lambda c: (("detection", "classify", "math").index(c[1]), splits.index(c[0])))
    palette = [(90, 90, 90), (40, 80, 200), (220, 90, 30), (40, 160, 60), (160, 60, 160), (200, 170, 20),
               (20, 170, 190), (120, 60, 20)]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    L, R, T, B = 50, 20, 30, 60
    ends = [100 * (v["mean"] + s * v["half"]) for per in changes.values() for c, v in per.items() if c in cells
            for s in (-1, 1)] or [0.0]
    lo, hi = min(min(ends), 0.0) - 1, max(max(ends), 0.0) + 1
    y = lambda v: T + (height - T - B) * (hi - v) / (hi - lo)
    step = next((s for s in (1, 2, 5, 10, 20, 50, 100) if (hi - lo) / s <= 8), math.ceil((hi - lo) / 8))  # <= 8 lines
    for v in range(math.ceil(lo / step) * step, int(hi) + 1, step):
        d.line([(L, y(v)), (width - R, y(v))], fill=(225, 225, 225) if v else (0, 0, 0))
        d.text((8, y(v) - 6), f"{v:+d}", fill="black")
    slot = (width - L - R) / max(1, len(cells))
    bar = slot * 0.8 / max(1, len(arms))
    for k, cell in enumerate(cells):
        x0 = L + k * slot + slot * 0.1
        for j, arm in enumerate(arms):
            v = changes[arm].get(cell)
            if v is None:
                continue
            m, h, c = 100 * v["mean"], 100 * v["half"], palette[j % len(palette)]
            xa, xm = x0 + j * bar, x0 + (j + 0.5) * bar
            d.rectangle([xa + 1, min(y(m), y(0)), xa + bar - 1, max(y(m), y(0))], fill=c)
            d.line([(xm, y(m - h)), (xm, y(m + h))], fill="black", width=1)
            for e in (m - h, m + h):
                d.line([(xm - bar / 4, y(e)), (xm + bar / 4, y(e))], fill="black")
        d.text((x0, height - B + 6), f"{cell[1]} {cell[0]}", fill="black")
    x = L
    for j, arm in enumerate(arms):  # the legend
        d.rectangle([x, height - 22, x + 10, height - 12], fill=palette[j % len(palette)])
        d.text((x + 14, height - 24), arm, fill="black")
        x += 20 + 7 * len(arm)
    d.text((L, 8), "change from the base, open answers, points (mean over seeds, 95% interval)", fill="black")
    img.save(path)
