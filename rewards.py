"""
rewards.py: the rule rewards of Curr-ReFT, one pure function from (completion, solution) to a score.

    r = rewards.score(completion, row["solution"], task="detection", stage="open", box_mode="iou")
    r["total"], r["accuracy"], r["format"], r["answer"], r["parsed"]   # + r["iou"] for open detection

total = accuracy_weight * accuracy + format_weight * format (paper: both weights 1), each in [0, 1]:

    judge   any        yes/no    1 if the word equals the solution's
    choice  any        letters   1 if the sets are equal; a proper subset: choice_partial (default 0; paper 0.2)
    open    detection  box       hard: 1[IoU > 0.5] | iou: IoU | giou: (GIoU + 1) / 2
    open    classify   labels    jaccard: |P ∩ G| / |P ∪ G| | exact: 1[P = G] | f1: 2 |P ∩ G| / (|P| + |G|)
    open    math       number    1 if |p - g| <= max(rel_tol * max(|p|, |g|), abs_tol)
    GIoU = IoU - (area(C) - area(P ∪ G)) / area(C),   C = the smallest box enclosing P and G

accuracy reads only the answer, the single <answer> block outside any think block (split_completion); format = 1
when the completion is exactly `<think>…</think><answer>…</answer>` and the answer parses as the stage's type (math:
the solution's). Answers and solutions parse alike, by the rules each parse_* states (the paper gives none; no
math_verify); an unusable solution: accuracy 0. Totality: a non-string completion or one over max_chars scores 0;
parsing is linear, no eval; only a bad task, stage or option raises (ValueError).

Departures from the paper's release, and why:
- judge: the release lets "yes" win when both words appear; we need exactly one word, an unambiguous answer.
- choice: the release compares an order-sensitive string and reads an article "A" as a letter; we use sets.
- classify: the release scores token Jaccard and gives lists 0 (a missing import); we score whole-name sets.
- math: the release pays 1 when neither side has a letter (any wrong number); we pay an equal number only.
- format: the release checks the detection format (an integer box in braces) in every stage; ours, the stage's.
- detection: graded IoU and GIoU rewards as options beside the paper's hard IoU > 0.5, which stays the default.
"""

import math
import re
from dataclasses import dataclass

TASKS = ("detection", "classify", "math")
STAGES = ("judge", "choice", "open")
BOX_MODES = ("hard", "iou", "giou")
LABEL_MODES = ("jaccard", "exact", "f1")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_NUMBER_CHARS = 50  # a numeric token longer than this is garbage, not a number
MAX_LABEL_WORDS = 5  # a longer "label" is a sentence

@dataclass(frozen=True)
class RewardOptions:
    accuracy_weight: float = 1.0  # total = accuracy_weight * accuracy + format_weight * format
    format_weight: float = 1.0
    choice_partial: float = 0.0  # credit for a non-empty proper subset of the right letters (paper: 0.2)
    box_mode: str = "hard"  # hard: 1[IoU > iou_threshold] (paper) | iou | giou
    iou_threshold: float = 0.5
    max_coord: float = 1e5  # a box with any |coordinate| above this is absurd and scores 0
    label_mode: str = "jaccard"  # jaccard | exact | f1
    rel_tol: float = 1e-6  # math: relative tolerance ...
    abs_tol: float = 1e-9  # ... with this absolute floor
    max_chars: int = 20_000  # longer completions score 0 unparsed

    def __post_init__(self):
        if self.box_mode not in BOX_MODES:
            raise ValueError(f"box_mode must be one of {BOX_MODES}, got {self.box_mode!r}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")

def split_completion(completion, max_chars: int = 20_000) -> tuple[str | None, bool]:
    """(answer or None, well_formed): the answer is the single <answer> block, not in, after or before a think block;
    well_formed: the completion is exactly `<think>…</think><answer>…</answer>`, spaces around and between.

    >>> split_completion("<think>2+2=4</think> <answer>4</answer>")
    ('4', True)
    >>> split_completion("<answer>A</answer><answer>B</answer>")
    (None, False)
    """
    if not isinstance(completion, str) or len(completion) > max_chars:
        return None, False
    i, j = completion.find(ANSWER_OPEN), completion.find(ANSWER_CLOSE)
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1 or j < i:
        return None, False  # not exactly one <answer>…</answer> block
    before, inside, after = completion[:i], completion[i + len(ANSWER_OPEN) : j], completion[j + len(ANSWER_CLOSE) :]
    if THINK_OPEN in inside + after or THINK_CLOSE in inside + after:
        return None, False  # the answer block is inside a think block, or think tags follow it
    if before.rfind(THINK_OPEN) > before.rfind(THINK_CLOSE):
        return None, False  # an unclosed <think> before the answer: the "answer" is still reasoning
    head = before.strip()
    well_formed = (head.startswith(THINK_OPEN) and head.endswith(THINK_CLOSE) and head.count(THINK_OPEN) == 1
                   and head.count(THINK_CLOSE) == 1 and after.strip() == "")
    return inside.strip(), well_formed

def _plain(solution):
    """numpy / torch values -> Python values."""
    return solution.tolist() if hasattr(solution, "tolist") else solution

def solution_text(solution) -> str:
    """The ground truth as text: a string's first <answer> block, else the text after a final </think>, else all of it;
    a bool as yes/no, a list as [a, b]."""
    solution = _plain(solution)
    if isinstance(solution, str):
        i = solution.find(ANSWER_OPEN)
        if i >= 0:
            j = solution.find(ANSWER_CLOSE, i)
            return solution[i + len(ANSWER_OPEN) : j if j >= 0 else len(solution)].strip()
        k = solution.rfind(THINK_CLOSE)
        return solution[k + len(THINK_CLOSE) :].strip() if k >= 0 else solution.strip()
    if isinstance(solution, bool):
        return "yes" if solution else "no"
    if isinstance(solution, (list, tuple)):
        return "[" + ", ".join(str(_plain(x)) for x in solution) + "]"
    return "" if solution is None else str(solution).strip()

# stage 1: judge (yes / no)
YES, NO = ("yes", "true"), ("no", "false")
_JUDGE_STRIP = " \t\r\n.,;:!?'\"`*()[]{}"

def parse_yes_no(text: str) -> str | None:
    """"yes" / "no" if the text stripped of spaces, punctuation, quotes, brackets and `*` is yes/no/true/false."""
    word = text.strip(_JUDGE_STRIP).lower()
    return "yes" if word in YES else "no" if word in NO else None

def judge_reward(answer: str, solution) -> tuple[float, str | None]:
    """(accuracy, parsed answer): 1 if the answer's yes/no, any case, equals the solution's.

    >>> judge_reward("yes and no", "yes")
    (0.0, None)
    """
    pred, gold = parse_yes_no(answer), parse_yes_no(solution_text(solution))
    return float(pred is not None and pred == gold), pred

# stage 2: choice (option letters)
_CHOICE_SEPARATORS = str.maketrans({c: " " for c in ",;/&|+.:()[]{}"})

def parse_letters(text: str, compact: bool = False) -> frozenset[str] | None:
    """Option letters, any case, split by , ; / & | + . : ( ) [ ] { }, whitespace and "and"; None if a token is not one
    letter ("AC" is none), unless compact (trusted solutions) reads it as a run of distinct capitals."""
    letters = set()
    for token in text.translate(_CHOICE_SEPARATORS).split():
        if not token.isascii() or not token.isalpha():
            return None
        if len(token) == 1:
            letters.add(token.upper())
        elif token.lower() == "and":
            continue
        elif compact and token.isupper() and len(set(token)) == len(token):
            letters.update(token)
        else:
            return None
    return frozenset(letters) or None

def choice_reward(answer: str, solution, partial: float = 0.0) -> tuple[float, str | None]:
    """(accuracy, parsed letters): 1 if the letter sets are equal, `partial` for a non-empty proper subset.

    >>> choice_reward("(C) and (A)", "<answer>A, C</answer>")
    (1.0, 'A,C')
    >>> choice_reward("A circle is red", "A")
    (0.0, None)
    >>> choice_reward("A", "AC", partial=0.2)
    (0.2, 'A')
    """
    pred, gold = parse_letters(answer), parse_letters(solution_text(solution), compact=True)
    parsed = ",".join(sorted(pred)) if pred else None
    if not pred or not gold:
        return 0.0, parsed
    return (1.0 if pred == gold else float(partial) if pred < gold else 0.0), parsed

# stage 3, detection (a box)
_COORD = r"-?[0-9]+(?:\.[0-9]+)?"
_BOX = re.compile(rf"\[\s*({_COORD})\s*,\s*({_COORD})\s*,\s*({_COORD})\s*,\s*({_COORD})\s*\]")

def parse_box(text: str, max_coord: float = 1e5) -> tuple[float, float, float, float] | None:
    """The last [x1, y1, x2, y2] of plain decimals (bare or in {"bbox_2d": ...}), or None unless it is finite, not
    degenerate (x2 > x1, y2 > y1) and every |c| <= max_coord."""
    boxes = _BOX.findall(text)  # [(x1, y1, x2, y2) as strings]
    if not boxes or any(len(c) > MAX_NUMBER_CHARS for c in boxes[-1]):
        return None
    x1, y1, x2, y2 = box = tuple(float(c) for c in boxes[-1])
    if not all(math.isfinite(c) and abs(c) <= max_coord for c in box) or x2 <= x1 or y2 <= y1:
        return None
    return box

def box_iou(a, b) -> tuple[float, float]:
    """(IoU, GIoU) of two valid boxes; (0, -1) if the areas underflow."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if union <= 0 or hull <= 0:
        return 0.0, -1.0
    iou = inter / union
    return iou, iou - (hull - union) / hull

def box_reward(answer: str, solution, mode: str = "hard", threshold: float = 0.5, max_coord: float = 1e5):
    """(accuracy, parsed box, IoU). mode hard: 1[IoU > threshold] (paper); iou: IoU; giou: (GIoU + 1) / 2.

    >>> box_reward('{"bbox_2d": [0, 0, 10, 10]}', "<answer>[0, 0, 10, 8]</answer>")
    (1.0, '[0, 0, 10, 10]', 0.8)
    """
    pred, gold = parse_box(answer, max_coord), parse_box(solution_text(solution), max_coord)
    parsed = "[" + ", ".join(f"{c:g}" for c in pred) + "]" if pred else None
    if pred is None or gold is None:
        return 0.0, parsed, 0.0
    iou, giou = box_iou(pred, gold)
    reward = {"hard": float(iou > threshold), "iou": iou, "giou": (giou + 1.0) / 2.0}[mode]
    return min(1.0, max(0.0, reward)), parsed, iou

# stage 3, classification (category names)
_LABEL_STRIP = " \t'\"`*-•.:()[]{}"
_NUMBERING = re.compile(r"^[0-9]{1,3}[.)] ?")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_LABEL_SEPARATORS = re.compile(r"[,;\n]| and ")

def parse_labels(text: str) -> frozenset[str] | None:
    """Category names of a [..] list or of text split at , ; newlines and " and ": lower-cased, spaces collapsed,
    quotes, bullets and numbering stripped; None if empty or a name has no letter or over 5 words (a sentence)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = _SPACES.sub(" ", text.lower())
    labels = set()
    for item in _LABEL_SEPARATORS.split(text):  # , ; newline and the word "and" separate labels
        item = item.strip(_LABEL_STRIP)
        item = "" if item == "and" else item.removeprefix("and ")
        label = " ".join(_NUMBERING.sub("", item).strip(_LABEL_STRIP).split())
        if not label:
            continue
        if len(label.split()) > MAX_LABEL_WORDS or not any(c.isalpha() for c in label):
            return None  # a sentence or a number, not a category name
        labels.add(label)
    return frozenset(labels) or None

def label_reward(answer: str, solution, mode: str = "jaccard") -> tuple[float, str | None]:
    """(accuracy, parsed labels): jaccard, exact or f1 of the sets of whole names (no stemming).

    >>> label_reward("Traffic light and dog", "<answer>dog, traffic light</answer>")
    (1.0, 'dog, traffic light')
    >>> label_reward("cats", "cat")
    (0.0, 'cats')
    """
    pred, gold = parse_labels(answer), parse_labels(solution_text(solution))
    parsed = ", ".join(sorted(pred)) if pred else None
    if not pred or not gold:
        return 0.0, parsed
    common = len(pred & gold)
    reward = {"jaccard": common / len(pred | gold), "exact": float(pred == gold),
              "f1": 2 * common / (len(pred) + len(gold))}[mode]
    return reward, parsed

# stage 3, math (a number, or option letters)
_NUMBER = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\.[0-9]+")
_FRAC = re.compile(r"\\frac\{([^{}]{0,40})\}\{([^{}]{0,40})\}")
_UNIT_POWER = re.compile(r"([A-Za-z])(?:\^[0-9]|[²³])")
_SIGN_GAP = re.compile(r"-[\s(\[]*(?=[-0-9.])")  # a minus, then spaces or an opening bracket, then the number
_LEADING_OPTION = re.compile(r"\(?([A-Z])(?:\)|\.|:)")
_NOT_A_NUMBER = ("\\", "^", "√", "π", "²", "³", "+", "*", "×", "÷", "±", "<", ">", "≤", "≥", "∞", "sqrt")
DEGREES = (("^{\\circ}", "°"), ("^\\circ", "°"), ("\\degree", "°"))
TEX_SYNONYMS = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("−", "-"), ("\\%", "%"), ("\\$", "$"))
_PI_WORD = re.compile(r"\bpi\b", re.IGNORECASE)

def _last_boxed(text: str) -> str:
    """Content of the last \\boxed{...} (braces matched by hand), else the text itself."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return text
    depth, start = 1, i + len("\\boxed{")
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start:k]
    return text[start:]

def _frac_to_slash(m: re.Match) -> str:
    a, b = m.group(1).strip(), m.group(2).strip()
    return f" {a}/{b} " if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b) else "\\"  # "\\": not a number

def parse_number(text: str) -> tuple[float, bool] | None:
    """(value, had a percent sign) of the one number in the last \\boxed{}, else after the last "=", or None:
    a/b, \\frac{a}{b}, "1,234" count; "3 and 4", +, *, ^, \\sqrt, π, over 50 characters do not; units, "$" are ignored.

    >>> parse_number("x = \\\\boxed{\\\\frac{-3}{4}} cm^2")
    (-0.75, False)
    >>> parse_number("3 and 4") is None
    True
    """
    text = _last_boxed(text)
    for tex, plain in DEGREES + TEX_SYNONYMS:
        text = text.replace(tex, plain)
    text = _FRAC.sub(_frac_to_slash, text)
    for tex in ("\\left", "\\right", "\\text", "\\mathrm", "\\mbox", "\\!", "\\,", "\\;", "\\ ", "$", "{", "}"):
        text = text.replace(tex, " ")
    text = text.replace("≈", "=")
    text = text[text.rfind("=") + 1 :]  # the final answer follows the last "=" (whole text if none)
    text = _UNIT_POWER.sub(r"\1", text)  # cm^2 -> cm
    text = _SIGN_GAP.sub("-", text).replace("--", "")  # "- 3", "-(1/2)", "- -3/4" (from -\frac{-3}{4}): signed
    if any(mark in text for mark in _NOT_A_NUMBER) or _PI_WORD.search(text):
        return None  # an expression, not a plain number
    tokens = list(_NUMBER.finditer(text))
    if not tokens or len(tokens) > 2 or any(len(t.group()) > MAX_NUMBER_CHARS for t in tokens):
        return None
    values = [float(t.group().replace(",", "")) for t in tokens]
    if len(tokens) == 2:  # only a fraction a/b counts as one number
        if text[tokens[0].end() : tokens[1].start()].strip() != "/" or values[1] == 0:
            return None
        values = [values[0] / values[1]]
    percent = text[tokens[-1].end() :].lstrip().startswith(("%", "percent"))
    return (values[0], percent) if math.isfinite(values[0]) else None

def math_reward(answer: str, solution, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> tuple[float, str | None]:
    """(accuracy, parsed answer): numbers equal within tolerance (one side's lone "%" divided out); letter solutions
    compare letter sets ("(B) 12" is B); other solutions, case- and space-free text.

    >>> math_reward("(B) 12 cm", "B")
    (1.0, 'B')
    """
    solution = _plain(solution)
    gold_text = solution_text(solution)
    if isinstance(solution, (int, float)) and not isinstance(solution, bool):
        gold = (float(solution), False) if math.isfinite(solution) else (math.nan, False)  # NaN matches nothing
    else:
        gold = parse_number(gold_text)
    if gold is None and not any(c.islower() for c in gold_text) and parse_letters(gold_text):
        gold_letters = parse_letters(gold_text)  # a multiple-choice math question: compare letters
        pred_letters = parse_letters(answer)
        if pred_letters is None and (m := _LEADING_OPTION.match(answer)):
            pred_letters = frozenset(m.group(1))  # "(B) 12 cm", "B. 12"
        parsed = ",".join(sorted(pred_letters)) if pred_letters else None
        return float(pred_letters == gold_letters), parsed
    if gold is None:  # neither a number nor letters: compare "$"-, case- and space-free text, never two empty ones
        pred_text, gold_text = ("".join(t.replace("$", "").split()).lower().rstrip(".") for t in (answer, gold_text))
        return float(bool(pred_text) and pred_text == gold_text), pred_text or None
    pred = parse_number(answer)
    if pred is None:
        return 0.0, None
    (p, p_pct), (g, g_pct) = pred, gold
    if p_pct != g_pct:  # exactly one side wrote a percent: compare as fractions
        p, g = (p / 100, g) if p_pct else (p, g / 100)
    return float(math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol)), f"{pred[0]:.12g}" + "%" * p_pct

def answerable(solution, task: str, stage: str) -> bool:
    """Whether an answer can earn full accuracy: the solution's own text, given as the answer, does. False for a
    solution that does not parse as its task and stage ask (three numbers for a box, empty text, "maybe" for yes/no)."""
    return score(f"<think>.</think><answer>{solution_text(solution)}</answer>", solution, task, stage)["accuracy"] == 1

def score(completion: str, solution, task: str, stage: str, **options) -> dict:
    """One completion's reward: a dict of accuracy, format, total, answer (cut at 200 characters), parsed ("" if it
    does not parse) and, for open detection, iou (the first key). Options: RewardOptions."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}, expected one of {STAGES}")
    try:
        opts = RewardOptions(**options)
    except TypeError as e:
        raise ValueError(f"unknown reward option: {e}") from None

    answer, well_formed = split_completion(completion, opts.max_chars)
    out = {"iou": 0.0} if stage == "open" and task == "detection" else {}  # iou comes first
    if answer is None:
        accuracy, parsed = 0.0, None
    elif stage == "judge":
        accuracy, parsed = judge_reward(answer, solution)
    elif stage == "choice":
        accuracy, parsed = choice_reward(answer, solution, opts.choice_partial)
    elif task == "detection":
        accuracy, parsed, out["iou"] = box_reward(answer, solution, opts.box_mode, opts.iou_threshold, opts.max_coord)
    elif task == "classify":
        accuracy, parsed = label_reward(answer, solution, opts.label_mode)
    else:
        accuracy, parsed = math_reward(answer, solution, opts.rel_tol, opts.abs_tol)
    fmt = float(well_formed and parsed is not None)
    total = opts.accuracy_weight * float(accuracy) + opts.format_weight * fmt
    out.update(accuracy=float(accuracy), format=fmt, total=total, answer=(answer or "")[:200], parsed=parsed or "")
    return out
