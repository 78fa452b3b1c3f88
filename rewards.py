"""
rewards.py: the rewards of Curr-ReFT, one pure function from (completion, solution) to a score.

    r = rewards.score(completion, row["solution"], task="detection", stage="open", box_mode="iou")
    r["total"], r["accuracy"], r["format"], r["answer"], r["parsed"]   # + r["iou"] for open detection

total = accuracy_weight * accuracy + format_weight * format (paper: both weights 1), each in [0, 1]:

    judge   any        yes/no    1 if the word equals the solution's
    choice  any        letters   1 if the sets are equal; a proper subset: choice_partial (default 0; paper 0.2)
    open    detection  box       hard: 1[IoU > 0.5] | iou: IoU | giou: (GIoU + 1) / 2
    open    classify   labels    jaccard: |P ∩ G| / |P ∪ G| | exact: 1[P = G] | f1: 2 |P ∩ G| / (|P| + |G|)
    open    math       number    1 if |p - g| <= max(rel_tol * max(|p|, |g|), abs_tol)
    GIoU = IoU - (area(C) - area(P ∪ G)) / area(C),   C = the smallest box enclosing P and G

The answer is the content of the single <answer>…</answer> block; none with zero or several <answer> or
</answer> tags, inside a think block, after an unclosed <think> or before a think tag. The think block never counts.
format = 1 when the completion is exactly `<think>…</think><answer>…</answer>` (spaces around and between; the
think may be empty) and the answer parses as the stage's type (math: the solution's), else 0; accuracy needs
only the answer. Totality: a non-string completion or one over max_chars (default 20,000) scores 0 unparsed;
parsing is linear, no eval; no completion or solution raises; a bad task, stage or option raises ValueError.

Parsing, of answers and solutions alike (the paper does not say; no math_verify). A solution string is its
first <answer> block, else the text after a final </think>, else all; or a bool, list, number; unusable: accuracy 0.
- judge: stripped of spaces, punctuation, quotes, brackets and `*`, the whole answer is yes/no/true/false, any case.
- choice: , ; / & | + . : ( ) [ ] { }, whitespace and "and" split; each token is one letter, any case ("a and
  c" = {A, C}; "A circle is red" and "AC" are none); in a solution a run of distinct capitals counts ("AC").
- box: the last [x1, y1, x2, y2] (bare or in {"bbox_2d": ...}), plain decimals; degenerate or |c| > max_coord: none.
- labels: a [..] list or text split at , ; newlines and " and "; lower-cased, spaces collapsed, quotes, bullets,
  numbering stripped; whole names, no stemming ("cats" != "cat"); a label over 5 words or with no letter: none.
- number: the last \\boxed{}, else the text after the last "=", holding one number (a/b, \\frac{a}{b}, "1,234"
  count; "3 and 4", +, *, ^, \\sqrt, π do not; units, "$", words ignored; > 50 characters: none); "50%" is 50,
  or 0.5 if one side alone has "%". Letter solutions: letter sets ("(B) 12" is B); else case-, space-free text.

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


# -----------------------------------------------------------------------------
# completion and solution -> answer text


def split_completion(completion, max_chars: int = 20_000) -> tuple[str | None, bool]:
    """(answer text or None, well_formed). well_formed: the completion is exactly think block + answer block.

    >>> split_completion("<think>2+2=4</think> <answer>4</answer>")
    ('4', True)
    >>> split_completion("<think>[1, 2, 3, 4]</think>")
    (None, False)
    >>> split_completion("<answer>A</answer><answer>B</answer>")
    (None, False)
    """
    if not isinstance(completion, str) or len(completion) > max_chars:
        return None, False
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return None, False
    i, j = completion.find(ANSWER_OPEN), completion.find(ANSWER_CLOSE)
    if j < i:
        return None, False
    before, inside, after = completion[:i], completion[i + len(ANSWER_OPEN) : j], completion[j + len(ANSWER_CLOSE) :]
    if THINK_OPEN in inside + after or THINK_CLOSE in inside + after:
        return None, False  # the answer block is inside a think block, or think tags follow it
    if before.rfind(THINK_OPEN) > before.rfind(THINK_CLOSE):
        return None, False  # an unclosed <think> before the answer: the "answer" is still reasoning
    head = before.strip()
    well_formed = (
        head.startswith(THINK_OPEN)
        and head.endswith(THINK_CLOSE)
        and head.count(THINK_OPEN) == 1
        and head.count(THINK_CLOSE) == 1
        and after.strip() == ""
    )
    return inside.strip(), well_formed


def _plain(solution):
    """numpy / torch values -> Python values."""
    return solution.tolist() if hasattr(solution, "tolist") else solution


def solution_text(solution) -> str:
    """The ground truth as text: the first <answer> block of a string, a bool as yes/no, a list as [a, b].

    >>> solution_text("<think>count them</think><answer> 3 </answer>")
    '3'
    >>> solution_text([10, 20, 30.5, 40])
    '[10, 20, 30.5, 40]'
    """
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


# -----------------------------------------------------------------------------
# stage 1: judge (yes / no)

YES, NO = ("yes", "true"), ("no", "false")
_JUDGE_STRIP = " \t\r\n.,;:!?'\"`*()[]{}"


def parse_yes_no(text: str) -> str | None:
    word = text.strip(_JUDGE_STRIP).lower()
    return "yes" if word in YES else "no" if word in NO else None


def judge_reward(answer: str, solution) -> tuple[float, str | None]:
    """(accuracy, parsed answer). The answer must be exactly one of yes/no (true/false), any case.

    >>> judge_reward("Yes.", "<answer>yes</answer>")
    (1.0, 'yes')
    >>> judge_reward("yes and no", "yes")
    (0.0, None)
    >>> judge_reward("False", "no")
    (1.0, 'no')
    """
    pred, gold = parse_yes_no(answer), parse_yes_no(solution_text(solution))
    return float(pred is not None and pred == gold), pred


# -----------------------------------------------------------------------------
# stage 2: choice (option letters)

_CHOICE_SEPARATORS = str.maketrans({c: " " for c in ",;/&|+.:()[]{}"})


def parse_letters(text: str, compact: bool = False) -> frozenset[str] | None:
    """Option letters as a set, or None if anything but letters, separators and "and" is present.
    compact=True also reads a run of distinct capitals ("AC") as letters (for trusted solutions)."""
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
    """(accuracy, parsed letters). Letter sets must be equal; `partial` for a non-empty proper subset.

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
    if pred == gold:
        return 1.0, parsed
    return (float(partial) if pred < gold else 0.0), parsed


# -----------------------------------------------------------------------------
# stage 3, detection (a box)

_COORD = r"-?[0-9]+(?:\.[0-9]+)?"
_BOX = re.compile(rf"\[\s*({_COORD})\s*,\s*({_COORD})\s*,\s*({_COORD})\s*,\s*({_COORD})\s*\]")


def parse_box(text: str, max_coord: float = 1e5) -> tuple[float, float, float, float] | None:
    """The last [x1, y1, x2, y2] in the text, if it is a valid box (finite, x2 > x1, y2 > y1, not absurd)."""
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None or any(len(c) > MAX_NUMBER_CHARS for c in last.groups()):
        return None
    x1, y1, x2, y2 = box = tuple(float(c) for c in last.groups())
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
    """(accuracy, parsed box). mode hard: 1[IoU > threshold] (paper); iou: IoU; giou: (GIoU + 1) / 2.

    >>> box_reward('{"bbox_2d": [0, 0, 10, 10]}', "<answer>[0, 0, 10, 8]</answer>")
    (1.0, '[0, 0, 10, 10]')
    >>> box_reward("[0, 0, 10, 10]", [0, 0, 10, 5], mode="iou")
    (0.5, '[0, 0, 10, 10]')
    >>> box_reward("[5, 5, 5, 9]", [0, 0, 10, 10])
    (0.0, None)
    """
    pred = parse_box(answer, max_coord)
    gold = parse_box(solution_text(solution), max_coord)
    parsed = "[" + ", ".join(f"{c:g}" for c in pred) + "]" if pred else None
    if pred is None or gold is None:
        return 0.0, parsed
    iou, giou = box_iou(pred, gold)
    reward = {"hard": float(iou > threshold), "iou": iou, "giou": (giou + 1.0) / 2.0}[mode]
    return min(1.0, max(0.0, reward)), parsed


# -----------------------------------------------------------------------------
# stage 3, classification (category names)

_LABEL_STRIP = " \t'\"`*-•.:()[]{}"
_NUMBERING = re.compile(r"^[0-9]{1,3}[.)] ?")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_LABEL_SEPARATORS = re.compile(r"[,;\n]| and ")


def parse_labels(text: str) -> frozenset[str] | None:
    """Lower-cased whole category names, or None when empty or when an item is a sentence."""
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
    """(accuracy, parsed labels). jaccard: |P ∩ G| / |P ∪ G|; exact: 1[P = G]; f1: 2|P ∩ G| / (|P| + |G|).

    >>> label_reward("Traffic light and dog", "<answer>dog, traffic light</answer>")
    (1.0, 'dog, traffic light')
    >>> label_reward("['cat', 'dog']", "cat")
    (0.5, 'cat, dog')
    >>> label_reward("cats", "cat")
    (0.0, 'cats')
    """
    pred, gold = parse_labels(answer), parse_labels(solution_text(solution))
    parsed = ", ".join(sorted(pred)) if pred else None
    if not pred or not gold:
        return 0.0, parsed
    common = len(pred & gold)
    reward = {
        "jaccard": common / len(pred | gold),
        "exact": float(pred == gold),
        "f1": 2 * common / (len(pred) + len(gold)),
    }[mode]
    return reward, parsed


# -----------------------------------------------------------------------------
# stage 3, math (a number, or option letters)

_NUMBER = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\.[0-9]+")
_FRAC = re.compile(r"\\frac\{([^{}]{0,40})\}\{([^{}]{0,40})\}")
_UNIT_POWER = re.compile(r"([A-Za-z])(?:\^[0-9]|[²³])")
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
    """(value, had a percent sign) of the single number in the final answer, or None.

    >>> parse_number("The area is 1,234 cm^2")
    (1234.0, False)
    >>> parse_number("x = \\\\boxed{\\\\frac{-3}{4}}")
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


def _math_text(text: str) -> str:
    return "".join(text.replace("$", "").split()).lower().rstrip(".")


def math_reward(answer: str, solution, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> tuple[float, str | None]:
    """(accuracy, parsed answer). Numbers equal within tolerance; letters as sets when the solution is a letter.

    >>> math_reward("The answer is \\\\frac{1}{2}", "<answer>0.5</answer>")
    (1.0, '0.5')
    >>> math_reward("", "")
    (0.0, None)
    >>> math_reward("(B) 12 cm", "B")
    (1.0, 'B')
    """
    solution = _plain(solution)
    gold_text = solution_text(solution)
    if isinstance(solution, (int, float)) and not isinstance(solution, bool):
        gold = (float(solution), False) if math.isfinite(solution) else (math.nan, False)  # NaN matches nothing
    else:
        gold = parse_number(gold_text)
    if gold is None and gold_text and not any(c.islower() for c in gold_text) and parse_letters(gold_text):
        gold_letters = parse_letters(gold_text)  # a multiple-choice math question: compare letters
        pred_letters = parse_letters(answer)
        if pred_letters is None and (m := _LEADING_OPTION.match(answer)):
            pred_letters = frozenset(m.group(1))  # "(B) 12 cm", "B. 12"
        parsed = ",".join(sorted(pred_letters)) if pred_letters else None
        return float(pred_letters == gold_letters), parsed
    if gold is None:  # neither a number nor letters: compare normalised text, never two empty strings
        pred_text, gold_text = _math_text(answer), _math_text(gold_text)
        return float(bool(pred_text) and pred_text == gold_text), pred_text or None
    pred = parse_number(answer)
    if pred is None:
        return 0.0, None
    (p, p_pct), (g, g_pct) = pred, gold
    if p_pct != g_pct:  # exactly one side wrote a percent: compare as fractions
        p, g = (p / 100, g) if p_pct else (p, g / 100)
    return float(math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol)), f"{pred[0]:.12g}" + "%" * p_pct


# -----------------------------------------------------------------------------
# the reward of one completion


def score(completion: str, solution, task: str, stage: str, **options) -> dict:
    """Reward of one completion: dict with accuracy, format, total, answer (the answer block, cut at 200
    characters), parsed (the answer as the stage's type, "" when it does not parse) and, for open
    detection, iou. Options: see RewardOptions.

    >>> score("<think>it is a dog</think><answer>yes</answer>", "<answer>yes</answer>", "classify", "judge")["total"]
    2.0
    >>> score("yes", "yes", "classify", "judge")["total"]
    0.0
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}, expected one of {STAGES}")
    try:
        opts = RewardOptions(**options)
    except TypeError as e:
        raise ValueError(f"unknown reward option: {e}") from None

    answer, well_formed = split_completion(completion, opts.max_chars)
    out = {}
    if stage == "open" and task == "detection":
        out["iou"] = 0.0
    if answer is None:
        accuracy, parsed = 0.0, None
    elif stage == "judge":
        accuracy, parsed = judge_reward(answer, solution)
    elif stage == "choice":
        accuracy, parsed = choice_reward(answer, solution, opts.choice_partial)
    elif task == "detection":
        accuracy, parsed = box_reward(answer, solution, opts.box_mode, opts.iou_threshold, opts.max_coord)
        pred, gold = parse_box(answer, opts.max_coord), parse_box(solution_text(solution), opts.max_coord)
        out["iou"] = box_iou(pred, gold)[0] if pred and gold else 0.0
    elif task == "classify":
        accuracy, parsed = label_reward(answer, solution, opts.label_mode)
    else:
        accuracy, parsed = math_reward(answer, solution, opts.rel_tol, opts.abs_tol)
    fmt = float(well_formed and parsed is not None)
    out.update(
        accuracy=float(accuracy),
        format=fmt,
        total=opts.accuracy_weight * float(accuracy) + opts.format_weight * fmt,
        answer=(answer or "")[:200],
        parsed=parsed or "",
    )
    return out
