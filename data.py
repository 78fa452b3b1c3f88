"""
data.py: Curr-ReFT rows from JSONL/JSON files, data mixtures, and a synthetic world of coloured shapes.

A row is a plain dict: {"image": path | PIL image | None (text-only), "problem": the full user text, with
instructions, "solution": "<answer>2</answer>", "task": detection | classify | math, "meta": the scene and
its truth (synthetic rows only), "stage": judge | choice | open (optional)}.

    rows = data.load_rows("train.jsonl", default_task="math", on_error="skip")  # Rows: .skipped, .errors
    rows = data.load_mixture("a.jsonl:all,b.jsonl:random:500,c.jsonl:30%", seed=0)
    rows = data.make_split("train", 3000, seed=0)    # synthetic, PIL images; data.open_image(row): RGB PIL
    python curriculum.py --out synth --split train --n 3000 --seed 0   # synth/train.jsonl + synth/images/

Files (the Curr-ReFT format): JSONL, one object per line, or a JSON list of objects.
- `image`: relative to `image_root` (None: the data file's folder) or absolute; missing or null: text-only.
- `problem`: the user text. `solution`: `<answer>...</answer>` kept as is (with any think block before it),
  or a bare string, number, label list or box, wrapped in answer tags (a box as `[x1, y1, x2, y2]`, labels
  comma-separated). `task`: detection, classify or math; when missing, `default_task`, else a bad row.
- SFT rows: problem, solution = the user, assistant turns of `messages` (`<image>` removed); `images: [p]`: p.
- A bad row (malformed JSON, a missing field, an unknown task, a missing or unreadable image: all checked at
  load, images with PIL's verify()) raises DataError("file:line: problem"). on_error="skip" drops it (never
  replaced), counts it in `.skipped`, keeps its message in `.errors` and logs one warning (`data` logger).

Mixtures: comma-separated `path[:rule]`, rule all (the default) | first:N | last:N | random:N | N% (=
random:N%; first and last take N% too); or a JSON file listing {"path", "rule", "image_root", "task"}
(paths relative to it; the only form for paths holding ":"). Items are concatenated in order, each in
file order; random samples without replacement, deterministic for a seed. Too few rows in a file: an error.

The synthetic world: `size` px square images (default 112, 16 image tokens; a multiple of 28), a 7x7 grid of
size/7 px cells, flat colours, no anti-aliasing. 1-4 shapes of 5 (circle, square, triangle, diamond, cross)
in unique colours of 5 (red, green, blue, yellow, purple), so every scene lacks a shape and a colour. A shape
fills a 1-, 2- or 3-cell square on cell boundaries, never overlapping; its box is the tight [x1, y1, x2, y2]
in pixels, x2, y2 exclusive. Row i asks a TASKS[i % 3] question of a random kind: detection locate; classify
colours, shapes (palette order), shape_of; math count_all, count_shape (0 when absent), sum_shapes, width
(x2 - x1), left (x1). BASE_CELLS (2, 3) and BASE_KINDS (no width, left): the tiny base's early warm-start
world. Splits: train, test, ood (test on light blue, not light grey), ood_small (every shape one cell); a
layout hashes into 10 buckets, 0 for test and ood, 1-9 for train; each split seeds its own generator.
reference_completion: `<think>red circle, blue square; so 2</think><answer>2</answer>` (reading order).

Departures from the paper, and why:
- A synthetic world, not RefCOCO, COCO, Math360K/Geo170K or the OOD sets: a tiny model must learn on a CPU.
- Classification answers are whole label names (palette order), not free text: they are scored as label sets.
"""
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from rewards import STAGES, TASKS  # the three tasks and the three answer forms

log = logging.getLogger("data")

# Every instruction string, in one place. Key: "stage/task", or "stage" for all tasks of a stage.
INSTRUCTIONS = {
    "judge": "Think in <think></think>, then answer only yes or no in <answer></answer>.",
    "choice": "Think in <think></think>, then answer only the option letter in <answer></answer>.",
    "choice/classify": "Think in <think></think>, then answer every right letter, comma-separated, "
                       "in <answer></answer>.",
    "open/detection": "Think in <think></think>, then answer the box [x1, y1, x2, y2] in <answer></answer>.",
    "open/classify": "Think in <think></think>, then answer the labels, comma-separated, in <answer></answer>.",
    "open/math": "Think in <think></think>, then answer a number in <answer></answer>.",
}


def instruction(stage, task):
    """The instruction line of a stage and task."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    text = INSTRUCTIONS.get(f"{stage}/{task}") or INSTRUCTIONS.get(stage)
    if text is None:
        raise ValueError(f"no instruction for stage {stage!r} and task {task!r}")
    return text


def build_problem(question, task, stage):
    """The full user text: the question (options included), then the stage's instruction line."""
    return f"{question}\n{instruction(stage, task)}"


def has_instruction(problem):
    """Whether a problem already says how to answer (it names the <answer> tag)."""
    return "<answer>" in problem.lower()


class DataError(ValueError):
    """A bad row or file; the message names the file, the line and the problem."""


class Rows(list):
    """A list of rows that also reports what was dropped: `skipped` (a count) and `errors` (messages)."""

    def __init__(self, rows=(), skipped=0, errors=None):
        super().__init__(rows)
        self.skipped = skipped
        self.errors = list(errors or [])


# -----------------------------------------------------------------------------
# Images

def samples_of(rows):
    """Rows -> the {"image", "problem"} samples rollout.generate and model.encode take (images opened)."""
    return [{"image": None if r.get("image") is None else open_image(r), "problem": r["problem"]} for r in rows]


def open_image(row_or_path):
    """An RGB PIL image from a row (its `image`), a path or a PIL image; a clear DataError otherwise."""
    if isinstance(row_or_path, dict):
        image = row_or_path.get("image")
        if image is None:
            raise DataError(f"row has no image (text-only): problem {str(row_or_path.get('problem'))[:60]!r}")
    else:
        image = row_or_path
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() loads the pixels, so the file can close
    except Exception as e:
        raise DataError(f"unreadable image {path}: {e}") from e


def _check_image(path):
    """Raise a DataError unless `path` is an image file PIL can read (verify() reads it without decoding)."""
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:
        raise DataError(f"unreadable image {path}: {e}") from e


# -----------------------------------------------------------------------------
# Reading Curr-ReFT files

def format_value(value):
    """An answer value as the model should write it: 3 -> '3', box -> '[1, 2, 3, 4]', labels -> 'a, b'."""
    if isinstance(value, bool):
        raise DataError(f"a boolean is not an answer value: {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (list, tuple)):
        if len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return "[" + ", ".join(format_value(v) for v in value) + "]"
        if value and all(isinstance(v, str) for v in value):
            return ", ".join(v.strip() for v in value)
    raise DataError(f"cannot write {value!r} as an answer (a number, a string, a label list or a 4-number box)")


def normalize_solution(solution):
    """`<answer>...</answer>` text kept as is; a bare string, number, list or box wrapped in answer tags."""
    if isinstance(solution, str) and "<answer>" in solution:
        return solution.strip()
    return f"<answer>{format_value(solution)}</answer>"


def _message_text(content):
    """The text of a chat message's content (a string or a list of typed parts), image placeholders removed."""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise DataError("message content is neither text nor a list of parts")
    return content.replace("<image>", "").strip()


def _from_messages(obj):
    """Problem and solution of an SFT row {"messages": [user, assistant]}."""
    messages = obj["messages"]
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not user or not assistant:
        raise DataError("`messages` needs a user turn and an assistant turn")
    return _message_text(user[0].get("content")), _message_text(assistant[-1].get("content"))


def parse_row(obj, base_dir, default_task=None):
    """One file object -> a row with a checked, resolved image path. Raises DataError on any problem."""
    if not isinstance(obj, dict):
        raise DataError(f"a row must be a JSON object, got {type(obj).__name__}")
    row = {k: v for k, v in obj.items() if k not in ("messages", "images")}
    if "problem" not in obj and isinstance(obj.get("messages"), list):
        row["problem"], row["solution"] = _from_messages(obj)
    for field in ("problem", "solution"):
        if row.get(field) is None:
            raise DataError(f"missing field `{field}`")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise DataError("`problem` must be non-empty text")
    row["solution"] = normalize_solution(row["solution"])
    task = row.get("task") or default_task
    if task is None:
        raise DataError("missing field `task` and no default_task given")
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    row["task"] = task
    image = row.get("image")
    if image is None and isinstance(obj.get("images"), list) and obj["images"]:
        if len(obj["images"]) > 1:
            raise DataError("rows with several images are not supported")
        image = obj["images"][0]
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"`image` must be a path, got {image!r}")
        path = image if os.path.isabs(image) else os.path.join(base_dir, image)
        _check_image(path)
        image = os.path.normpath(path)
    row["image"] = image
    return row


def _file_objects(path):
    """(where, object or exception) for every row of a JSONL file or a JSON list; `where` is 'file:line N'."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON list: {e}") from e
        for i, obj in enumerate(items, 1):
            yield f"{path}: item {i}", obj
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{i}", DataError(f"malformed JSON: {e.msg} (column {e.colno})")


def load_rows(path, image_root=None, default_task=None, on_error="raise"):
    """All rows of one JSONL / JSON file (see the top docstring). Returns a `Rows` list.

    image_root: folder that relative image paths start from; None = the data file's own folder.
    on_error: "raise" (a DataError naming file and line) or "skip" (counted in `.skipped`, logged).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    base_dir = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    rows, errors = [], []
    for where, obj in _file_objects(path):
        try:
            if isinstance(obj, Exception):
                raise obj
            rows.append(parse_row(obj, base_dir, default_task))
        except DataError as e:
            message = f"{where}: {e}"
            if on_error == "raise":
                raise DataError(message) from e
            errors.append(message)
    if errors:
        log.warning("skipped %d bad row(s) of %s; first: %s", len(errors), path, errors[0])
    return Rows(rows, skipped=len(errors), errors=errors)


# -----------------------------------------------------------------------------
# Mixtures

@dataclass
class MixtureItem:
    path: str
    rule: str = "all"          # all | first | last | random
    amount: str | None = None  # "N" or "N%"; None with "all"
    image_root: str | None = None
    task: str | None = None    # default_task for this file


def _parse_rule(text, where):
    """'all' | 'first:N' | 'last:N' | 'random:N' | 'N%' (each N may be 'N%') -> (rule, amount)."""
    parts = text.split(":") if text else ["all"]
    if parts == ["all"]:
        return "all", None
    if len(parts) == 1 and re.fullmatch(r"\d+(\.\d+)?%", parts[0]):
        return "random", parts[0]
    if len(parts) == 2 and parts[0] in ("first", "last", "random") and re.fullmatch(r"\d+(\.\d+)?%|\d+", parts[1]):
        return parts[0], parts[1]
    raise DataError(f"{where}: bad sampling rule {text!r}; use all, first:N, last:N, random:N or N%")


def parse_mixture(spec):
    """A mixture spec (a string, a JSON mixture file, or a list of dicts) -> a list of MixtureItem."""
    if isinstance(spec, (list, tuple)):
        return [_item_from_dict(d, f"mixture item {i}", base_dir=None) for i, d in enumerate(spec, 1)]
    spec = os.fspath(spec)
    if spec.endswith(".json") and os.path.isfile(spec) and _is_mixture_file(spec):
        with open(spec, encoding="utf-8") as f:
            entries = json.load(f)
        base_dir = os.path.dirname(os.path.abspath(spec))
        return [_item_from_dict(d, f"{spec}: item {i}", base_dir) for i, d in enumerate(entries, 1)]
    items = []
    for text in spec.split(","):
        text = text.strip()
        if not text:
            continue
        path, _, rule = text.partition(":")
        items.append(MixtureItem(path, *_parse_rule(rule, f"mixture item {text!r}")))
    if not items:
        raise DataError(f"empty mixture spec {spec!r}")
    return items


def _is_mixture_file(path):
    """A JSON file whose top level is a list of {"path": ...} objects (and not a list of rows)."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(entries, list) and len(entries) > 0
            and all(isinstance(d, dict) and "path" in d and "problem" not in d for d in entries))


def _item_from_dict(d, where, base_dir):
    if not isinstance(d, dict) or "path" not in d:
        raise DataError(f"{where}: a mixture entry needs a `path`")
    path = d["path"] if base_dir is None or os.path.isabs(d["path"]) else os.path.join(base_dir, d["path"])
    image_root = d.get("image_root")
    if image_root is not None and base_dir is not None and not os.path.isabs(image_root):
        image_root = os.path.join(base_dir, image_root)
    return MixtureItem(path, *_parse_rule(d.get("rule", "all"), where), image_root=image_root, task=d.get("task"))


def _select(rows, item, rng):
    """The rows a rule picks, in file order."""
    if item.rule == "all":
        return list(rows)
    if item.amount.endswith("%"):
        count = round(float(item.amount[:-1]) / 100 * len(rows))
    else:
        count = int(item.amount)
    if count > len(rows):
        raise DataError(f"{item.path}: rule {item.rule}:{item.amount} asks for {count} rows, the file has {len(rows)}")
    if item.rule == "first":
        return list(rows[:count])
    if item.rule == "last":
        return list(rows[len(rows) - count:]) if count else []
    picked = sorted(rng.sample(range(len(rows)), count))
    return [rows[i] for i in picked]


def load_mixture(spec, seed=0, image_root=None, default_task=None, on_error="raise"):
    """Rows of every item of a mixture spec, concatenated in order; deterministic for a seed.

    Returns a `Rows` list whose `.skipped` / `.errors` sum those of the files (on_error="skip").
    """
    out = Rows()
    for i, item in enumerate(parse_mixture(spec)):
        rows = load_rows(item.path, image_root=item.image_root or image_root,
                         default_task=item.task or default_task, on_error=on_error)
        rng = random.Random(f"mixture:{seed}:{i}")
        out.extend(_select(rows, item, rng))
        out.skipped += rows.skipped
        out.errors += rows.errors
    return out


# -----------------------------------------------------------------------------
# The synthetic world

GRID = 7  # cells per image side: size / 7 px each (16 px at 112)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 190, 20),
           "purple": (150, 60, 190)}
BACKGROUNDS = {"light_grey": (224, 224, 224), "light_blue": (185, 215, 245)}
KINDS = {"detection": ("locate",),
         "classify": ("colours", "shapes", "shape_of"),
         "math": ("count_all", "count_shape", "sum_shapes", "width", "left")}
BASE_KINDS = {"detection": ("locate",),  # the kinds of the base's first warm-start phases (tiny_base.py)
              "classify": ("colours", "shapes", "shape_of"),
              "math": ("count_all", "count_shape", "sum_shapes")}
GEOMETRY = ("width", "left")  # math kinds answered in pixels, on the cell grid
HELD_OUT_BUCKETS = 10  # layouts hashing to bucket 0 (1 in 10) are held out of train


@dataclass(frozen=True)
class SplitStyle:
    background: str        # a key of BACKGROUNDS
    cells: tuple           # allowed object sizes, in grid cells
    held_out: bool         # True: layouts of bucket 0 only (test, ood); False: the other buckets (train)


SPLITS = {
    "train": SplitStyle("light_grey", (1, 2, 3), held_out=False),
    "test": SplitStyle("light_grey", (1, 2, 3), held_out=True),
    "ood": SplitStyle("light_blue", (1, 2, 3), held_out=True),     # the documented shift: the background
    "ood_small": SplitStyle("light_grey", (1,), held_out=True),    # optional: every shape one cell (16 px)
}
BASE_CELLS = (2, 3)  # the object sizes of the base's first warm-start phases (tiny_base.py)


def _layout_bucket(objects):
    """A stable hash of a scene's layout into HELD_OUT_BUCKETS buckets (independent of PYTHONHASHSEED)."""
    key = ";".join(f"{o['shape']},{o['colour']},{o['box']}" for o in objects)
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS


def _place(rng, style, size):
    """1-4 non-overlapping objects with unique colours on the cell grid, in reading order; None if stuck."""
    cell = size // GRID
    free = [[True] * GRID for _ in range(GRID)]  # free[row][col]
    objects = []
    for colour in rng.sample(list(COLOURS), rng.randint(1, 4)):
        shape = rng.choice(SHAPES)
        preferred = rng.choice(style.cells)
        for c in [preferred] + sorted((c for c in style.cells if c < preferred), reverse=True):
            spots = [(x, y) for y in range(GRID - c + 1) for x in range(GRID - c + 1)
                     if all(free[y + j][x + i] for j in range(c) for i in range(c))]
            if spots:
                break
        else:
            return None
        x, y = rng.choice(spots)
        for j in range(c):
            for i in range(c):
                free[y + j][x + i] = False
        objects.append({"shape": shape, "colour": colour, "box": [x * cell, y * cell, (x + c) * cell, (y + c) * cell]})
    return sorted(objects, key=lambda o: (o["box"][1], o["box"][0]))


def random_scene(rng, split="train", size=112, style=None):
    """The objects of one scene of `split` (drawn with `style`, default the split's): a list of {"shape",
    "colour", "box"} in reading order."""
    if size % 28:
        raise ValueError(f"size must be a multiple of 28 (the Qwen-VL patch-merge unit), got {size}")
    style = style or SPLITS[split]
    while True:
        objects = _place(rng, style, size)
        if objects is None:
            continue
        if (_layout_bucket(objects) == 0) == style.held_out:
            return objects


def draw_shape(draw, shape, box, fill):
    """Fill `shape` so that its pixels span exactly box = [x1, y1, x2, y2] (x2, y2 exclusive)."""
    x1, y1, x2, y2 = box
    r, b = x2 - 1, y2 - 1                      # last pixel column and row
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    if shape == "circle":
        draw.ellipse([x1, y1, r, b], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, r, b], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x1, b), (r, b), (cx, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)
    elif shape == "cross":
        t = (x2 - x1) // 3                       # arm inset: the bars are the middle third (or a bit more)
        draw.rectangle([x1 + t, y1, r - t, b], fill=fill)
        draw.rectangle([x1, y1 + t, r, b - t], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_scene(objects, size=112, background="light_grey"):
    """An RGB image of the objects on a flat background (no anti-aliasing: a colour's pixels are exact)."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_shape(draw, o["shape"], o["box"], COLOURS[o["colour"]])
    return image


def ask(rng, task, objects, kinds=None):
    """A random question of `task` about the scene: (kind, question text, target, answer value). The kind is
    drawn from `kinds[task]` (default KINDS)."""
    kind = rng.choice((kinds or KINDS)[task])
    present_shapes = [s for s in SHAPES if any(o["shape"] == s for o in objects)]
    count = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    if kind == "locate":
        o = rng.choice(objects)
        target = {"colour": o["colour"], "shape": o["shape"]}
        return kind, f"Where is the {o['colour']} {o['shape']}?", target, list(o["box"])
    if kind == "colours":
        return kind, "Which colours are there?", {}, [c for c in COLOURS if any(o["colour"] == c for o in objects)]
    if kind == "shapes":
        return kind, "Which shapes are there?", {}, present_shapes
    if kind == "shape_of":
        o = rng.choice(objects)
        return kind, f"What shape is the {o['colour']} one?", {"colour": o["colour"]}, [o["shape"]]
    if kind == "count_all":
        return kind, "How many shapes are there?", {}, len(objects)
    if kind == "count_shape":
        shape = rng.choice(present_shapes) if rng.random() < 0.7 else rng.choice(SHAPES)  # 0 now and then
        return kind, f"How many {PLURALS[shape]} are there?", {"shape": shape}, count[shape]
    if kind == "sum_shapes":
        a = rng.choice(present_shapes)
        b = rng.choice([s for s in SHAPES if s != a])
        a, b = rng.sample([a, b], 2)
        question = f"How many {PLURALS[a]} plus {PLURALS[b]} are there?"
        return kind, question, {"shapes": [a, b]}, count[a] + count[b]
    if kind in GEOMETRY:
        o = rng.choice(objects)
        target = {"colour": o["colour"], "shape": o["shape"]}
        if kind == "width":
            return kind, f"How wide is the {o['colour']} {o['shape']} in pixels?", target, o["box"][2] - o["box"][0]
        return kind, f"How far is the {o['colour']} {o['shape']} from the left edge in pixels?", target, o["box"][0]
    raise ValueError(f"unknown question kind {kind!r}")


def make_rows(split, n, seed=0, size=112, tasks=TASKS, draw=True, cells=None, kinds=None):
    """n open-form rows of a synthetic split; row i asks a `tasks[i % len(tasks)]` question.

    draw=False leaves `image` None (the scene stays in `meta`): for tokenizer corpora, fast tests.
    cells / kinds override the split's object sizes and the question kinds (the base's first warm-start
    phases use BASE_CELLS and BASE_KINDS); the scenes are seeded by the split's name either way.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    style = SPLITS[split] if cells is None else replace(SPLITS[split], cells=tuple(cells))
    rows = []
    for i in range(n):
        rng = random.Random(f"{split}:{seed}:{i}")
        task = tasks[i % len(tasks)]
        objects = random_scene(rng, split, size, style)
        kind, question, target, answer = ask(rng, task, objects, kinds)
        meta = {"split": split, "seed": seed, "index": i, "size": size, "cell": size // GRID,
                "background": style.background, "objects": objects,
                "kind": kind, "question": question, "target": target, "answer": answer}
        rows.append({"image": draw_scene(objects, size, style.background) if draw else None,
                     "problem": build_problem(question, task, "open"),
                     "solution": f"<answer>{format_value(answer)}</answer>",
                     "task": task, "meta": meta, "stage": "open"})
    return rows


def make_split(split, n, seed=0, size=112, tasks=TASKS):
    """n synthetic rows of `split` (train, test, ood, ood_small) whose `image` is a PIL image."""
    return make_rows(split, n, seed, size, tasks, draw=True)


def describe_scene(meta):
    """The objects in reading order, as the reference reasoning: 'red circle, blue square'."""
    return ", ".join(f"{o['colour']} {o['shape']}" for o in meta["objects"])


def reference_completion(row):
    """The answer a model should write, reasoning first: '<think>{scene}; so {open answer}</think><answer>...
    </answer>' (an empty think block without meta). The think block lists the objects, then states the answer
    to the open question, so a yes/no claim or options A-D are judged by comparing with it: this chain of
    thought is what lets a tiny model learn the judge and choice forms (asked without it, they stayed at
    chance for thousands of steps in this project's first warm-start)."""
    answers = re.findall(r"<answer>.*?</answer>", row["solution"], flags=re.S)
    answer = answers[-1] if answers else f"<answer>{row['solution'].strip()}</answer>"
    meta = row.get("meta")
    think = f"{describe_scene(meta)}; so {format_value(meta['answer'])}" if meta else ""
    return f"<think>{think}</think>{answer}"
