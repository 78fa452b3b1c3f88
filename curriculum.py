"""
curriculum.py: the three stages of Curr-ReFT (one pool of questions in ever harder answer forms) and the schedule.

The stages share their images and questions; only the answer form (and so its reward) changes:
    judge   a yes/no claim about the image          "How many circles are there? Is it 3?"   -> yes | no
    choice  options A-D (multi-select for classify)  "How many circles are there?\\nA. 1 ..."  -> B | A, C
    open    the question itself                     "How many circles are there?"            -> 2
    mixed   (an ablation, not a stage of the paper) every batch asks the three forms in turn

    cur = curriculum.Curriculum([curriculum.StageSpec(s, group_size=8, steps=100) for s in curriculum.STAGES],
                                pool=data.make_split("train", 3000), seed=0)    # cur.state_dict() resumes it
    while not cur.done:
        rows = cur.next_batch(8)  # of cur.current_stage(): G = its group_size rollouts a row, then one update
        cur.record()              # True when the stage ended
    python curriculum.py --out synth --split ood --stage judge  # a split as Curr-ReFT JSONL + PNGs

Judge and choice rows derive from an open synthetic row's `meta` (`make_stage_row`). A judge claim is true at
every other data position (with an even number of tasks, every other round of them), else a near miss: a count
off by 1-2 (pixels: by 1-2 cells), a label swapped, added or dropped, another shape, another object's box or the
true one moved to IoU < 0.5. Choice: A-D, shuffled, one right among such distractors, or 1-3 present labels for
"which colours / shapes". Stage files (StageSpec.data, a mixture spec) are used as they are; a problem without
`<answer>` gets its instruction line.
Each stage runs `steps` optimizer steps over epochs of task-interleaved permutations seeded by (seed, stage,
epoch); `replay` r adds floor(n * r) open rows along a stage's first n. A mixed stage asks data position p in form
STAGES[(p // 3) % 3], so that every 9 positions hold each task in each form once (the tasks take turns); given
files, it takes each form's rows from that form's own files (StageSpec.data = {form: mixture spec}). The state is
a few integers: a resumed run draws the same batches.

Departures from the paper, and why:
- Judge and choice rows are derived from one open pool, as the paper's stages share their images and questions.
- The judge is exactly balanced (positions alternate), rather than balanced by chance.
- `replay` (not in the paper, off by default) rehearses the open form while judge and choice train.
- Stages end after a fixed number of steps (the release hands on after 1 / 1 / 2 epochs: --stage-steps).
"""
import argparse
import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass
from fractions import Fraction

import data
from data import COLOURS, GEOMETRY, SHAPES, STAGES, build_problem, format_value
from rewards import box_iou

LETTERS = "ABCD"
MIXED = "mixed"                # a stage whose batches mix the three forms (ablate.py's no-curriculum arm)
SCHEDULE = STAGES + (MIXED,)   # what a schedule's stages may be named

def wrong_boxes(meta, rng):
    """Plausible wrong boxes, all with IoU < 0.5 to the truth: (other objects' boxes, moved true boxes)."""
    truth, cell, size = meta["answer"], meta["cell"], meta["size"]
    others = [o["box"] for o in meta["objects"] if o["box"] != truth]
    moved = []
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            box = [truth[0] + dx * cell, truth[1] + dy * cell, truth[2] + dx * cell, truth[3] + dy * cell]
            if min(box) >= 0 and max(box) <= size and box_iou(box, truth)[0] < 0.5 and box not in others:
                moved.append(box)
    rng.shuffle(others)
    rng.shuffle(moved)
    return others, moved

def wrong_labels(meta, rng):
    """A label set near the truth: one label swapped for an absent one, an absent one added, or one dropped."""
    labels = meta["answer"]
    if meta["kind"] == "shape_of":
        return [rng.choice([s for s in SHAPES if s != labels[0]])]
    palette = list(COLOURS) if meta["kind"] == "colours" else list(SHAPES)
    absent = [x for x in palette if x not in labels]
    move = rng.choice(["swap", "add"] + (["drop"] if len(labels) > 1 else []))
    wrong = set(labels)
    if move in ("swap", "drop"):
        wrong.discard(rng.choice(labels))
    if move in ("swap", "add"):
        wrong.add(rng.choice(absent))
    return [x for x in palette if x in wrong]

def near_numbers(meta, reach):
    """Wrong numbers within `reach` steps of the truth: steps of 1 for counts, of one cell for pixel answers
    (a width is never 0 px, a left edge leaves a cell of room, nothing leaves the image)."""
    truth = meta["answer"]
    if meta.get("kind") in GEOMETRY:
        step, low, high = meta["cell"], (meta["cell"] if meta["kind"] == "width" else 0), meta["size"]
        high -= step if meta["kind"] == "left" else 0
    else:
        step, low, high = 1, 0, math.inf
    values = [truth + k * step for k in range(-reach, reach + 1) if k]
    return [v for v in values if low <= v <= high]

def near_miss(meta, task, rng):
    """A false answer value close to the truth (for a judge claim)."""
    if task == "detection":
        others, moved = wrong_boxes(meta, rng)
        return others[0] if others and rng.random() < 0.5 else moved[0]
    if task == "classify":
        return wrong_labels(meta, rng)
    if task == "math":
        return rng.choice(near_numbers(meta, 2))
    raise ValueError(f"unknown task {task!r}")

def choice_options(meta, task, rng):
    """Four shuffled option values and the letters of the right ones."""
    truth = meta["answer"]
    if task == "detection":
        others, moved = wrong_boxes(meta, rng)
        k = rng.randint(0, min(3, len(others)))
        options, right = [truth] + others[:k] + moved[:3 - k], [truth]
    elif task == "math":
        options, right = [truth] + rng.sample(near_numbers(meta, 3), 3), [truth]
    elif task == "classify" and meta["kind"] == "shape_of":
        options, right = [truth] + [[s] for s in rng.sample([s for s in SHAPES if s != truth[0]], 3)], [truth]
    elif task == "classify":
        palette = list(COLOURS) if meta["kind"] == "colours" else list(SHAPES)
        absent = [x for x in palette if x not in truth]
        k = rng.randint(max(1, 4 - len(absent)), min(len(truth), 3))  # 1-3 right, at least one distractor
        right = [[x] for x in rng.sample(truth, k)]
        options = right + [[x] for x in rng.sample(absent, 4 - k)]
    else:
        raise ValueError(f"unknown task {task!r}")
    rng.shuffle(options)
    return options, [LETTERS[i] for i, v in enumerate(options) if v in right]

def make_stage_row(row, stage, rng, truth=None):
    """An open synthetic row (with `meta`) as `stage` asks it, a new dict; truth: whether a judge claim is true
    (None: a coin flip). Kept in meta["judge"] = {"claim", "truth"} or meta["choice"] = {"options", "letters"}."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if stage == "open":
        return {**row, "stage": "open"}
    meta, task = row.get("meta"), row["task"]
    if not meta or "answer" not in meta:
        raise ValueError(f"a {stage} question is derived from a synthetic row's meta, and this row has none: "
                         f"{row['problem'][:60]!r} (give the stage its own data files instead)")
    if stage == "judge":
        truth = rng.random() < 0.5 if truth is None else bool(truth)
        claim = meta["answer"] if truth else near_miss(meta, task, rng)
        question = f"{meta['question']} Is it {format_value(claim)}?"
        solution = "<answer>yes</answer>" if truth else "<answer>no</answer>"
        form = {"claim": claim, "truth": truth}
    else:
        options, letters = choice_options(meta, task, rng)
        question = meta["question"] + "".join(f"\n{L}. {format_value(v)}" for L, v in zip(LETTERS, options))
        solution = f"<answer>{', '.join(letters)}</answer>"
        form = {"options": options, "letters": letters}
    return {**row, "problem": build_problem(question, task, stage), "solution": solution, "stage": stage,
            "meta": {**meta, stage: form}}

def stage_rows(rows, stage, seed=0):
    """Every open row as `stage` asks it (for evaluation sets): deterministic, judge exactly balanced."""
    return [make_stage_row(row, stage, random.Random(f"stage_rows:{seed}:{stage}:{i}"), truth=i % 2 == 0)
            for i, row in enumerate(rows)]

def prepare_stage_rows(rows, stage):
    """Rows of a stage's own files: unchanged, except the instruction line when the problem lacks one. A DataError
    names a row that no answer can get right (data.check_answerable), in its own stage or else this one."""
    out = []
    for i, row in enumerate(rows, 1):
        row = {**row, "stage": row.get("stage", stage)}
        try:
            data.check_answerable(row, row["stage"])
        except data.DataError as e:
            raise data.DataError(f"{row['stage']} row {i} ({row['problem'][:60]!r}): {e}") from None
        if "<answer>" not in row["problem"].lower():  # the problem does not say how to answer
            row["problem"] = build_problem(row["problem"], row["task"], stage)
        out.append(row)
    return out

@dataclass
class StageSpec:
    name: str                               # judge | choice | open | mixed
    data: str | list | dict | None = None   # a mixture spec of this stage's files (mixed: {form: spec}); None = the pool
    group_size: int = 4                     # G completions per prompt
    steps: int = 100                        # stage length in optimizer steps
    replay: float = 0.0                     # open questions rehearsed per row of the stage (added to a batch)

    def __post_init__(self):
        if self.name not in SCHEDULE:
            raise ValueError(f"unknown stage {self.name!r}; expected one of {', '.join(SCHEDULE)}")
        if self.group_size < 1 or self.steps < 1:
            raise ValueError(f"stage {self.name!r}: group_size and steps must be >= 1")
        if not 0.0 <= self.replay <= 4.0:
            raise ValueError(f"stage {self.name!r}: replay is open questions per stage row, in [0, 4]; "
                             f"got {self.replay}")

def replay_count(n, ratio):
    """Open questions replayed along the first n rows of a stage: floor(n * ratio), exact for ratios like 0.25
    or 1/3 (as a fraction), so a resumed run replays the same rows."""
    return math.floor(n * Fraction(ratio).limit_denominator(1000))

def assign_stage_data(stages, mapping):
    """A copy of `stages` whose stages named in `mapping` (stage -> mixture spec) read those files."""
    unknown = set(mapping) - {s.name for s in stages}
    if unknown:
        raise ValueError(f"stage data given for stages not in the schedule (--stages): {sorted(unknown)}")
    return [dataclasses.replace(s, data=mapping.get(s.name, s.data)) for s in stages]

def parse_stage_data(text):
    """'judge=a.jsonl:all;choice=b.jsonl:random:500' -> {"judge": "a.jsonl:all", "choice": ...}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        stage, sep, spec = part.partition("=")
        if not sep or stage.strip() not in STAGES:
            raise ValueError(f"bad stage data {part!r}; expected stage=mixture_spec with stage in {STAGES}")
        mapping[stage.strip()] = spec.strip()
    return mapping

def balanced_order(pool, rng):
    """A shuffled order of the pool's indices that takes the tasks in turn (each task's rows shuffled), so that
    every batch holds them in near-equal shares and the training reward moves with learning, not the task mix."""
    by_task = {}
    for i, row in enumerate(pool):
        by_task.setdefault(row.get("task"), []).append(i)
    queues = [by_task[t] for t in sorted(by_task, key=str)]
    for q in queues:
        rng.shuffle(q)
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]

class Curriculum:
    """Which stage runs, which rows it trains on next, and when it moves on; resumable via state_dict()."""

    def __init__(self, stages, pool=None, seed=0, image_root=None, on_error="raise"):
        self.stages = list(stages)
        if not self.stages:
            raise ValueError("a curriculum needs at least one stage")
        self.seed = seed
        self.pools, self.replay_pool = [], None  # replay asks the (last) open stage's rows
        def read(spec_text, form):  # a stage's files, each row checked
            try:
                return prepare_stage_rows(data.load_mixture(spec_text, seed=seed, image_root=image_root,
                                                            on_error=on_error), form)
            except data.DataError as e:
                raise data.DataError(f"stage data {form}={spec_text}: {e}") from None

        for spec in self.stages:
            if isinstance(spec.data, dict):  # a mixed stage's files, form by form
                rows = {form: read(d, form) for form, d in spec.data.items()}
            elif spec.data is not None:
                rows = read(spec.data, spec.name)
            elif pool is None:
                raise ValueError(f"stage {spec.name!r} has no data files and no synthetic pool was given")
            else:
                rows = list(pool)
                if spec.name != "open" and not all(r.get("meta") for r in rows):
                    raise ValueError(f"stage {spec.name!r} derives its questions from `meta`; "
                                     "the pool holds rows without it")
            if not rows or (isinstance(rows, dict) and not all(rows.values())):
                raise ValueError(f"stage {spec.name!r} has no rows" + (f" in {spec.data}" if spec.data else ""))
            self.pools.append(rows)
            if spec.name == "open":
                self.replay_pool = rows
        if self.replay_pool is None and any(s.replay > 0 for s in self.stages):
            raise ValueError("replay asks open questions in earlier stages; the schedule needs an open stage")
        self._tasks = [len({r.get("task") for r in rows}) if isinstance(rows, list) else 1 for rows in self.pools]
        self.stage_index, self.step, self.position, self.global_step = 0, 0, 0, 0
        self._perms = {}  # tag -> ((stage index, epoch), permutation) of the epoch being drawn

    @property
    def done(self):
        return self.stage_index >= len(self.stages)

    def current_stage(self):
        """The running StageSpec, or None once every stage has finished."""
        return None if self.done else self.stages[self.stage_index]

    def _pick(self, pool, index, tag):
        """pool[the index-th row of the epoch's task-interleaved permutation, seeded by (seed, stage, tag, epoch)]."""
        epoch, k = divmod(index, len(pool))
        key = (self.stage_index, epoch)
        if self._perms.get(tag, (None,))[0] != key:
            rng = random.Random(f"curriculum:{self.seed}:{self.stage_index}:{tag}{epoch}")
            self._perms[tag] = (key, balanced_order(pool, rng))
        return pool[self._perms[tag][1][k]]

    def _row_at(self, position):
        """The row at data position `position` of the current stage (a pure function of the state)."""
        spec, pool = self.stages[self.stage_index], self.pools[self.stage_index]
        # Judge claims true at every other position: balanced_order takes the tasks in turn, so with an even number
        # of tasks a task would then hold only true (or only false) claims; there the truth turns every round.
        tasks = self._tasks[self.stage_index]
        form, truth = spec.name, (position if tasks % 2 else position // tasks) % 2 == 0
        if spec.name == MIXED:
            forms = list(pool) if isinstance(pool, dict) else STAGES
            form, truth = forms[(position // 3) % len(forms)], (position // (3 * len(forms))) % 2 == 0
            if isinstance(pool, dict):  # the form's own rows, the k-th of those it has asked so far
                k = position // (3 * len(forms)) * 3 + position % 3
                return dict(self._pick(pool[form], k, f"{form}:"))
        row = self._pick(pool, position, "")
        if spec.data is not None:
            return dict(row)
        rng = random.Random(f"curriculum:{self.seed}:{self.stage_index}:row:{position}")
        return make_stage_row(row, form, rng, truth=truth)

    def next_batch(self, n):
        """The next n rows of the current stage (a global batch: ranks slice it), with the open questions its
        replay adds spread evenly among them. Advances the data position (which counts the stage's rows)."""
        if self.done:
            raise RuntimeError("the curriculum has finished; no stage is left to draw from")
        rows = [self._row_at(self.position + i) for i in range(n)]
        ratio, p = self.stages[self.stage_index].replay, self.position
        replayed = [{**self._pick(self.replay_pool, j, "replay:"), "stage": "open", "replay": True}
                    for j in range(replay_count(p, ratio), replay_count(p + n, ratio))]
        for i, row in enumerate(replayed):  # evenly: the i-th after (i + 1) / k of the stage's rows
            rows.insert((i + 1) * n // len(replayed) + i, row)
        self.position += n
        return rows

    def record(self):
        """Count one optimizer step; True when it ended the stage (the next one starts on the next batch)."""
        if self.done:
            raise RuntimeError("the curriculum has finished")
        self.step, self.global_step = self.step + 1, self.global_step + 1
        if self.step < self.stages[self.stage_index].steps:
            return False
        self.stage_index, self.step, self.position = self.stage_index + 1, 0, 0
        return True

    def state_dict(self):
        return {"stages": [s.name for s in self.stages], "seed": self.seed, "stage_index": self.stage_index,
                "step": self.step, "position": self.position, "global_step": self.global_step}

    def load_state_dict(self, state):
        names = [s.name for s in self.stages]
        if state["stages"] != names or state["seed"] != self.seed:
            raise ValueError(f"checkpoint curriculum {state['stages']} seed {state['seed']} does not match "
                             f"this one {names} seed {self.seed}: its batches would differ")
        self.stage_index, self.step = state["stage_index"], state["step"]
        self.position, self.global_step = state["position"], state["global_step"]

def tokenizer_corpus(n=1000, seed=0, size=112):
    """n texts 'problem\\ncompletion', every task in every stage, that the tiny model's BPE is trained on: the
    base's world (BASE_CELLS, BASE_KINDS, no images), so the tokenizer stays the one the shipped base has."""
    texts = []
    rows = data.make_rows("train", n, seed, size, draw=False, cells=data.BASE_CELLS, kinds=data.BASE_KINDS)
    for i, row in enumerate(rows):
        stage = STAGES[(i // len(data.TASKS)) % len(STAGES)]  # every task meets every stage
        staged = make_stage_row(row, stage, random.Random(f"corpus:{seed}:{i}"), truth=i % 2 == 0)
        texts.append(staged["problem"] + "\n" + data.reference_completion(staged))
    return texts

def write_split(out, split="train", n=300, seed=0, size=112, stage="open"):
    """Write `out/{split}.jsonl` (or `{split}_{stage}.jsonl`) and PNGs under `out/images/`; returns the path."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    name = split if stage == "open" else f"{split}_{stage}"
    path = os.path.join(out, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(data.make_split(split, n, seed, size)):
            if stage != "open":
                row = make_stage_row(row, stage, random.Random(f"write:{seed}:{i}"), truth=i % 2 == 0)
            image = f"images/{split}_{seed}_{i:05d}.png"
            row["image"].save(os.path.join(out, image))
            f.write(json.dumps({**row, "image": image}) + "\n")
    return path

def main():
    parser = argparse.ArgumentParser(description="Write a synthetic split as Curr-ReFT JSONL plus PNG images.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--split", default="train", choices=list(data.SPLITS), help="which split to draw")
    parser.add_argument("--n", type=int, default=300, help="number of rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split's generator")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels, a multiple of 28")
    parser.add_argument("--stage", default="open", choices=["judge", "choice", "open"],
                        help="write that stage's questions (judge / choice derived from the open rows)")
    args = parser.parse_args()
    path = write_split(args.out, args.split, args.n, args.seed, args.size, args.stage)
    print(f"wrote {args.n} rows to {path} (images in {os.path.join(args.out, 'images')})")

if __name__ == "__main__":
    main()
