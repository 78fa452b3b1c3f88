"""
data.py: Curr-ReFT rows from JSONL/JSON files, data mixtures, and a synthetic world of coloured shapes.

A row is a dict: {"image": path | PIL image | None, "problem": the user text with its instruction line,
"solution": "<answer>2</answer>", "task": detection | classify | math, "meta": the scene (synthetic), "stage"}.

    rows = data.load_rows("train.jsonl", default_task="math", on_error="skip")  # Rows: .skipped, .errors
    rows = data.load_mixture("a.jsonl:all,b.jsonl:random:500,c.jsonl:30%", seed=0)
    rows = data.make_split("train", 3000, seed=0)    # synthetic, PIL images; data.open_image(row): RGB PIL

Files: JSONL or a JSON list. `image` is relative to `image_root` (default: the file's folder); none: text-only.
A `solution` without `<answer>` (a number, text, labels, a box) is wrapped in answer tags; `task` defaults to
`default_task`; SFT rows give `messages` (user, assistant) and `images: [path]`. A bad row (bad JSON, a missing
field, an unknown task, a missing or unreadable image) raises DataError("file:line: problem") at load, or with
on_error="skip" is dropped, its message kept in `.errors` (one warning logged).
Mixtures: comma-separated `path[:rule]`, rule all | first:N | last:N | random:N | N% (any N may be N%), or a
JSON file listing {"path", "rule", "image_root", "task"} (paths relative to it). Items are concatenated in
order, rows in file order; random samples without replacement, seeded; a file too short for N is an error.

Synthetic world: `size` px images (a multiple of 28), a 7x7 cell grid, flat colours; 1-4 of 5 shapes in unique
colours of 5, 1-3 cell squares that never overlap; boxes tight (x2, y2 exclusive). Row i asks a TASKS[i % 3]
question of a random KINDS kind. Splits: train, test, ood (light blue background), ood_small (one-cell shapes);
a layout hash holds 1 layout in 10 out of train, for test and ood.

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

from rewards import STAGES, TASKS, answerable  # the three tasks and the three answer forms

log = logging.getLogger("data")

# The tokens that mark an image in a prompt: the processor places them, a row's text may not hold them.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

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
    text = INSTRUCTIONS.get(f"{stage}/{task}") or INSTRUCTIONS.get(stage)
    if stage not in STAGES or text is None:
        raise ValueError(f"no instruction for stage {stage!r} and task {task!r}: stages are {', '.join(STAGES)}, "
                         f"tasks {', '.join(TASKS)}")
    return text

def build_problem(question, task, stage):
    """The full user text: the question (options included), then the stage's instruction line."""
    return f"{question}\n{instruction(stage, task)}"

class DataError(ValueError):
    """A bad row or file; the message names the file, the line and the problem."""

class Rows(list):
    """A list of rows that also reports the bad rows dropped: `errors` (their messages), `skipped` (a count)."""

    def __init__(self, rows=(), errors=()):
        super().__init__(rows)
        self.errors = list(errors)

    @property
    def skipped(self):
        return len(self.errors)

# -----------------------------------------------------------------------------
# Reading Curr-ReFT files

def samples_of(rows):
    """Rows -> the {"image", "problem"} samples rollout.generate and model.encode take (images opened)."""
    return [{"image": None if r.get("image") is None else open_image(r), "problem": r["problem"]} for r in rows]

def open_image(row_or_path):
    """An RGB PIL image from a row (its `image`), a path or a PIL image; a clear DataError otherwise."""
    image = row_or_path
    if isinstance(row_or_path, dict):
        image = row_or_path.get("image")
        if image is None:
            raise DataError(f"row has no image (text-only): problem {str(row_or_path.get('problem'))[:60]!r}")
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return _read_image(os.fspath(image))

def _read_image(path):
    """The file as an RGB PIL image (convert() loads it, so the file can close)."""
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"unreadable image {path}: {e}") from e

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

def _from_messages(messages):
    """Problem and solution of an SFT row: the texts of its first user and last assistant turns."""
    turns = {role: [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role]
             for role in ("user", "assistant")}
    if not turns["user"] or not turns["assistant"]:
        raise DataError("`messages` needs a user turn and an assistant turn")
    texts = []
    for content in (turns["user"][0], turns["assistant"][-1]):
        if isinstance(content, list):  # typed parts: keep the text ones
            parts = [part.get("text") for part in content if isinstance(part, dict)]
            if not all(t is None or isinstance(t, str) for t in parts):
                raise DataError("a message part's `text` is not text")
            content = "".join(t or "" for t in parts)
        if not isinstance(content, str):
            raise DataError("message content is neither text nor a list of parts")
        texts.append(content.replace("<image>", "").strip())
    return texts

def parse_row(obj, base_dir, default_task=None):
    """One file object -> a row with a checked, resolved image path. Raises DataError on any problem."""
    if not isinstance(obj, dict):
        raise DataError(f"a row must be a JSON object, got {type(obj).__name__}")
    row = {k: v for k, v in obj.items() if k not in ("messages", "images")}
    if "problem" not in obj and isinstance(obj.get("messages"), list):
        row["problem"], row["solution"] = _from_messages(obj["messages"])
    for field in ("problem", "solution"):
        if row.get(field) is None:
            raise DataError(f"missing field `{field}`")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise DataError("`problem` must be non-empty text")
    if any(token in row["problem"] for token in VISION_TOKENS):
        raise DataError(f"`problem` holds a vision token ({', '.join(VISION_TOKENS)}): only the processor places them")
    if row.get("stage") in (None, ""):
        row.pop("stage", None)      # no stage: the stage of the file's use
    elif row["stage"] not in STAGES:
        raise DataError(f"unknown stage {row['stage']!r}; expected one of {', '.join(STAGES)}")
    row["solution"] = normalize_solution(row["solution"])
    row["task"] = row.get("task") or default_task
    if row["task"] is None:
        raise DataError("missing field `task` and no default_task given")
    if row["task"] not in TASKS:
        raise DataError(f"unknown task {row['task']!r}; expected one of {', '.join(TASKS)}")
    image = row.get("image")
    if image is None and isinstance(obj.get("images"), list) and obj["images"]:
        if len(obj["images"]) > 1:
            raise DataError("rows with several images are not supported")
        image = obj["images"][0]
    if image is not None:
        if not isinstance(image, str) or not image:
            raise DataError(f"`image` must be a path, got {image!r}")
        path = image if os.path.isabs(image) else os.path.join(base_dir, image)
        _read_image(path)  # decoded in full: a truncated file fails here, not in a rollout
        image = os.path.normpath(path)
    row["image"] = image
    return row

def check_answerable(row, stage):
    """A DataError unless some answer to the row in this stage earns full accuracy (rewards.answerable)."""
    if not answerable(row["solution"], row["task"], stage):
        want = {"judge": "yes or no", "choice": "option letters", "detection": "a box [x1, y1, x2, y2] of some area",
                "classify": "category names", "math": "a number, letters or text"}
        raise DataError(f"`solution` {row['solution']!r}: no {stage} answer to a {row['task']} row can match it; "
                        f"give {want.get(stage, want[row['task']])}")

def load_rows(path, image_root=None, default_task=None, on_error="raise"):
    """All rows of one JSONL / JSON file, a `Rows` list. image_root: where relative image paths start (None:
    the file's folder); on_error: "raise" a DataError naming file and line, or "skip" the row."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    base_dir = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    jsonl = not text.lstrip().startswith("[")
    if jsonl:
        items = [(f"{path}:{i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        try:
            items = [(f"{path}: item {i}", obj) for i, obj in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON list: {e}") from e
    rows = Rows()
    for where, obj in items:
        try:
            rows.append(parse_row(json.loads(obj) if jsonl else obj, base_dir, default_task))
            continue
        except json.JSONDecodeError as e:
            error = f"{where}: malformed JSON: {e.msg} (column {e.colno})"
        except DataError as e:
            error = f"{where}: {e}"
        if on_error == "raise":
            raise DataError(error)
        rows.errors.append(error)
    if rows.errors:
        log.warning("skipped %d bad row(s) of %s; first: %s", rows.skipped, path, rows.errors[0])
    return rows

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

def _mixture_file(path):
    """The entries of a JSON mixture file (a list of {"path": ...} objects, not rows), or None."""
    if not (path.endswith(".json") and os.path.isfile(path)):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(entries, list) and entries and all(isinstance(d, dict) and "path" in d and "problem" not in d
                                                     for d in entries):
        return entries
    return None

def _mixture_items(entries, where, base_dir):
    """MixtureItems of {"path", "rule", "image_root", "task"} dicts; base_dir: what relative paths start from."""
    items = []
    for i, d in enumerate(entries, 1):
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not d["path"]:
            raise DataError(f"{where} {i}: a mixture entry needs a `path` (text)")
        for key in ("rule", "image_root", "task"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise DataError(f"{where} {i}: `{key}` must be text, got {d[key]!r}")
        path, image_root = d["path"], d.get("image_root")
        if base_dir is not None:
            path = os.path.join(base_dir, path)  # an absolute path stays as it is
            image_root = None if image_root is None else os.path.join(base_dir, image_root)
        rule = _parse_rule(d.get("rule", "all"), f"{where} {i}")
        items.append(MixtureItem(path, *rule, image_root=image_root, task=d.get("task")))
    return items

def parse_mixture(spec):
    """A mixture spec (a string, a JSON mixture file, or a list of dicts) -> a list of MixtureItem."""
    if isinstance(spec, (list, tuple)):
        return _mixture_items(spec, "mixture item", None)
    spec = os.fspath(spec)
    entries = _mixture_file(spec)
    if entries is not None:
        return _mixture_items(entries, f"{spec}: item", os.path.dirname(os.path.abspath(spec)))
    items = []
    for text in filter(None, (t.strip() for t in spec.split(","))):
        path, _, rule = text.partition(":")
        items.append(MixtureItem(path, *_parse_rule(rule, f"mixture item {text!r}")))
    if not items:
        raise DataError(f"empty mixture spec {spec!r}")
    return items

def _select(rows, item, rng):
    """The rows a rule picks, in file order."""
    if item.rule == "all":
        return rows
    count = round(float(item.amount[:-1]) / 100 * len(rows)) if item.amount.endswith("%") else int(item.amount)
    if count > len(rows):
        raise DataError(f"{item.path}: rule {item.rule}:{item.amount} asks for {count} rows, the file has {len(rows)}")
    if item.rule == "first":
        return rows[:count]
    if item.rule == "last":
        return rows[len(rows) - count:]
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]

def load_mixture(spec, seed=0, image_root=None, default_task=None, on_error="raise"):
    """Rows of every item of a mixture spec, concatenated in order, deterministic for a seed; a `Rows` list
    holding the `.errors` of every file (on_error="skip")."""
    out = Rows()
    for i, item in enumerate(parse_mixture(spec)):
        rows = load_rows(item.path, image_root=item.image_root or image_root,
                         default_task=item.task or default_task, on_error=on_error)
        out.extend(_select(rows, item, random.Random(f"mixture:{seed}:{i}")))
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
GEOMETRY = ("width", "left")  # math kinds answered in pixels, on the cell grid
# The base's first warm-start phases (tiny_base.py): no geometry questions, no one-cell shapes.
BASE_KINDS = {task: tuple(k for k in kinds if k not in GEOMETRY) for task, kinds in KINDS.items()}
BASE_CELLS = (2, 3)

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

def _layout_bucket(objects):
    """A stable hash of a scene's layout into 10 buckets (bucket 0: test and ood, 1-9: train)."""
    key = ";".join(f"{o['shape']},{o['colour']},{o['box']}" for o in objects)
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 10

def _place(rng, style, size):
    """1-4 non-overlapping objects with unique colours on the cell grid, in reading order; None if stuck."""
    if size % 28:
        raise ValueError(f"size must be a multiple of 28 (the Qwen-VL patch-merge unit), got {size}")
    cell = size // GRID
    taken = []  # the cell squares (x, y, c) placed so far
    objects = []
    for colour in rng.sample(list(COLOURS), rng.randint(1, 4)):
        shape = rng.choice(SHAPES)
        preferred = rng.choice(style.cells)
        for c in [preferred] + sorted((c for c in style.cells if c < preferred), reverse=True):
            spots = [(x, y) for y in range(GRID - c + 1) for x in range(GRID - c + 1)   # reading order
                     if all(x + c <= tx or tx + tc <= x or y + c <= ty or ty + tc <= y for tx, ty, tc in taken)]
            if spots:
                break
        else:
            return None
        x, y = rng.choice(spots)
        taken.append((x, y, c))
        objects.append({"shape": shape, "colour": colour, "box": [x * cell, y * cell, (x + c) * cell, (y + c) * cell]})
    return sorted(objects, key=lambda o: (o["box"][1], o["box"][0]))

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
    """A random question of `task` (its kind drawn from `kinds`, default KINDS) about the scene: (kind,
    question text, target, answer value)."""
    kind = rng.choice((kinds or KINDS)[task])
    present_shapes = [s for s in SHAPES if any(o["shape"] == s for o in objects)]
    count = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    if kind in ("locate", "shape_of") + GEOMETRY:  # a question about one object
        o = rng.choice(objects)
        name, target = f"{o['colour']} {o['shape']}", {"colour": o["colour"], "shape": o["shape"]}
        if kind == "locate":
            return kind, f"Where is the {name}?", target, list(o["box"])
        if kind == "shape_of":
            return kind, f"What shape is the {o['colour']} one?", {"colour": o["colour"]}, [o["shape"]]
        if kind == "width":
            return kind, f"How wide is the {name} in pixels?", target, o["box"][2] - o["box"][0]
        return kind, f"How far is the {name} from the left edge in pixels?", target, o["box"][0]
    if kind == "colours":
        return kind, "Which colours are there?", {}, [c for c in COLOURS if any(o["colour"] == c for o in objects)]
    if kind == "shapes":
        return kind, "Which shapes are there?", {}, present_shapes
    if kind == "count_all":
        return kind, "How many shapes are there?", {}, len(objects)
    if kind == "count_shape":
        shape = rng.choice(present_shapes) if rng.random() < 0.7 else rng.choice(SHAPES)  # 0 now and then
        return kind, f"How many {PLURALS[shape]} are there?", {"shape": shape}, count[shape]
    if kind == "sum_shapes":
        a = rng.choice(present_shapes)
        b = rng.choice([s for s in SHAPES if s != a])
        a, b = rng.sample([a, b], 2)
        return kind, f"How many {PLURALS[a]} plus {PLURALS[b]} are there?", {"shapes": [a, b]}, count[a] + count[b]
    raise ValueError(f"unknown question kind {kind!r}")

def make_rows(split, n, seed=0, size=112, tasks=TASKS, draw=True, cells=None, kinds=None):
    """n open-form rows of a synthetic split; row i asks a `tasks[i % len(tasks)]` question. draw=False leaves
    `image` None (the scene stays in `meta`); cells / kinds override the split's object sizes and question
    kinds (the base's warm-start uses BASE_CELLS, BASE_KINDS), the scenes still seeded by the split's name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    style = SPLITS[split] if cells is None else replace(SPLITS[split], cells=tuple(cells))
    rows = []
    for i in range(n):
        rng = random.Random(f"{split}:{seed}:{i}")
        task = tasks[i % len(tasks)]
        while True:  # a layout of the split's buckets
            objects = _place(rng, style, size)
            if objects is not None and (_layout_bucket(objects) == 0) == style.held_out:
                break
        kind, question, target, answer = ask(rng, task, objects, kinds)
        meta = {"split": split, "seed": seed, "index": i, "size": size, "cell": size // GRID,
                "background": style.background, "objects": objects,
                "kind": kind, "question": question, "target": target, "answer": answer}
        rows.append({"image": draw_scene(objects, size, style.background) if draw else None,
                     "problem": build_problem(question, task, "open"),
                     "solution": f"<answer>{format_value(answer)}</answer>",
                     "task": task, "meta": meta, "stage": "open"})
    return rows

def make_split(split, n, seed=0, size=112):
    """n synthetic rows of `split` (train, test, ood, ood_small) whose `image` is a PIL image."""
    return make_rows(split, n, seed, size)

def reference_completion(row):
    """The answer a model should write: '<think>red circle, blue square; so 2</think><answer>2</answer>' (the
    objects in reading order, then the open answer, which a judge claim or options A-D are compared with: this
    chain of thought lets a tiny model learn the judge and choice forms); an empty think block without meta."""
    answers = re.findall(r"<answer>.*?</answer>", row["solution"], flags=re.S)
    answer = answers[-1] if answers else f"<answer>{row['solution'].strip()}</answer>"
    meta = row.get("meta")
    think = ""
    if meta:
        scene = ", ".join(f"{o['colour']} {o['shape']}" for o in meta["objects"])
        think = f"{scene}; so {format_value(meta['answer'])}"
    return f"<think>{think}</think>{answer}"
