"""
eval.py (in progress): greedy evaluation of a model on rows, per task and stage.
"""
from collections import defaultdict

import torch

import data
import rewards
from rollout import generate


def samples_of(rows):
    """Rows -> the {"image", "problem"} samples rollout.generate takes (images opened from paths)."""
    return [{"image": None if r.get("image") is None else data.open_image(r), "problem": r["problem"]} for r in rows]


@torch.no_grad()
def evaluate(model, processor, rows, batch_size=64, max_new_tokens=64, reward_options=None):
    """Greedy answers to rows, scored by rewards.score: {(task, stage): {"accuracy", "format", "n", ...}}."""
    was_training = model.training
    model.eval()
    sums = defaultdict(lambda: defaultdict(float))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        r = generate(model, processor, samples_of(chunk), max_new_tokens=max_new_tokens, greedy=True)
        for row, text in zip(chunk, r.texts):
            s = rewards.score(text, row["solution"], row["task"], row.get("stage", "open"), **(reward_options or {}))
            cell = sums[(row["task"], row.get("stage", "open"))]
            cell["n"] += 1
            for k in ("accuracy", "format", "iou"):
                if k in s:
                    cell[k] += s[k]
    model.train(was_training)
    return {key: {k: (v if k == "n" else v / cell["n"]) for k, v in cell.items()} for key, cell in sums.items()}
