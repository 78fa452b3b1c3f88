"""Rewards: hand-written cases per task and stage (the known reward hacks included), options, and a fuzz
test that any string scores in range, without raising, fast."""

import doctest
import random
import time

import pytest

import rewards
from rewards import score


def W(answer: str, think: str = "let me look") -> str:
    """A well-formed completion around `answer`."""
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# (completion, solution, task, stage, accuracy, format, why)
CASES = [
    # ---- judge
    (W("yes"), "<answer>yes</answer>", "detection", "judge", 1, 1, "plain yes"),
    (W("Yes."), "yes", "math", "judge", 1, 1, "case and punctuation are ignored"),
    (W("**No**"), "<think>look</think><answer>no</answer>", "classify", "judge", 1, 1,
     "markdown stripped, think in solution ignored"),
    (W("true"), "Yes", "math", "judge", 1, 1, "true is a synonym of yes"),
    (W("False"), False, "math", "judge", 1, 1, "bool solution"),
    (W("no"), "yes", "detection", "judge", 0, 1, "wrong word keeps the format reward"),
    (W("yes and no"), "yes", "detection", "judge", 0, 0, "hedging both words scores nothing"),
    (W("no, yes"), "yes", "detection", "judge", 0, 0, "yes must not win when both appear"),
    (W("Yes, it is a dog."), "yes", "classify", "judge", 0, 0, "a sentence is not a yes/no answer"),
    (W(""), "yes", "classify", "judge", 0, 0, "empty answer"),
    ("yes", "yes", "classify", "judge", 0, 0, "answer outside the tags"),
    ("<think>yes</think>", "yes", "classify", "judge", 0, 0, "answer only in the think block"),
    ("<think>x</think><answer>yes</answer><answer>no</answer>", "yes", "math", "judge", 0, 0, "two answer blocks"),
    ("<answer>yes</answer>", "yes", "math", "judge", 1, 0, "no think block: right answer, wrong format"),
    (W("yes") + " trailing", "yes", "math", "judge", 1, 0, "text after the answer breaks the format only"),
    ("<think>x <answer>yes</answer></think>", "yes", "math", "judge", 0, 0, "answer block inside the think block"),
    ("<think>x <answer>yes</answer>", "yes", "math", "judge", 0, 0, "answer block inside an unclosed think block"),
    # ---- choice
    (W("A"), "<answer>A</answer>", "math", "choice", 1, 1, "single letter"),
    (W("A, C"), "A, C", "math", "choice", 1, 1, "comma separated"),
    (W("C A"), "A, C", "math", "choice", 1, 1, "order does not matter"),
    (W("A and C"), "AC", "math", "choice", 1, 1, "'and' separates; compact letters in the solution"),
    (W("(A)(C)"), ["A", "C"], "math", "choice", 1, 1, "parenthesised letters, list solution"),
    (W("c; a."), "A,C", "math", "choice", 1, 1, "lower-case single letters"),
    (W("A"), "A, C", "math", "choice", 0, 1, "a proper subset is wrong by default"),
    (W("A, B, C, D"), "A, C", "math", "choice", 0, 1, "listing every option is wrong"),
    (W("A circle is red"), "A", "math", "choice", 0, 0, "an article A inside a sentence is not a letter"),
    (W("The answer is B"), "B", "math", "choice", 0, 0, "words around the letter: not a letter answer"),
    (W("AC"), "AC", "math", "choice", 0, 0, "compact letters from the model read as a word"),
    (W(""), "A", "math", "choice", 0, 0, "empty answer"),
    (W("A"), "", "math", "choice", 0, 1, "empty solution never matches"),
    ("<think>A</think><answer>no idea</answer>", "A", "math", "choice", 0, 0, "letter in the think block only"),
    # ---- open detection
    (W("[10, 10, 50, 50]"), "<answer>[12, 12, 50, 50]</answer>", "detection", "open", 1, 1, "IoU 0.9 > 0.5"),
    (W('{"bbox_2d": [10.5, 10, 50, 50.0]}'), [10, 10, 50, 50], "detection", "open", 1, 1, "JSON object, floats"),
    (W("[0, 0, 1, 1] then [10, 10, 50, 50]"), "[10,10,50,50]", "detection", "open", 1, 1, "the last box counts"),
    (W("[10, 10, 50, 50] then [0, 0, 1, 1]"), "[10,10,50,50]", "detection", "open", 0, 1, "only the last box counts"),
    (W("[10, 10, 30, 50]"), "[10, 10, 50, 50]", "detection", "open", 0, 1, "IoU exactly 0.5 is not > 0.5"),
    (W("[50, 10, 10, 50]"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "degenerate box x2 < x1"),
    (W("[10, 10, 10, 50]"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "zero-width box"),
    (W("[0, 0, 1e9, 1e9]"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "not a box of plain numbers"),
    (W("[0, 0, 200000, 200000]"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "absurd coordinates"),
    (W("[0, 0, " + "9" * 400 + ", 5]"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "overflowing coordinate"),
    (W("[10, 10, 50]"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "three numbers"),
    (W("the dog"), "[10, 10, 50, 50]", "detection", "open", 0, 0, "no box"),
    ("<think>[10, 10, 50, 50]</think><answer>here</answer>", "[10,10,50,50]", "detection", "open", 0, 0,
     "box in the think block only"),
    (W("[10, 10, 50, 50]"), "no box", "detection", "open", 0, 1, "unusable solution never matches"),
    # ---- open classify
    (W("cat, dog and bird"), "<answer>bird, cat, dog</answer>", "classify", "open", 1, 1, "commas and 'and'"),
    (W("Cat; DOG"), "cat, dog", "classify", "open", 1, 1, "semicolons, case"),
    (W("- cat\n- traffic light"), "traffic light, cat", "classify", "open", 1, 1, "one per line, multi-word label"),
    (W("['cat', 'dog']"), "cat, dog", "classify", "open", 1, 1, "Python-style list"),
    (W('["cat","dog"]'), ["cat", "dog"], "classify", "open", 1, 1, "JSON-style list, list solution"),
    (W("cat"), "cat, dog", "classify", "open", 0.5, 1, "Jaccard 1/2"),
    (W("cats"), "cat", "classify", "open", 0, 1, "names match exactly: cats != cat"),
    (W("light"), "traffic light", "classify", "open", 0, 1, "whole names only"),
    (W("cat, dog, bird, car, person, traffic light, bus, truck"), "cat, dog", "classify", "open", 0.25, 1,
     "listing many classes is penalised"),
    (W("I think there is a cat sitting on the mat"), "cat", "classify", "open", 0, 0, "a sentence is not a label"),
    (W(""), "cat", "classify", "open", 0, 0, "empty answer"),
    (W("cat"), "", "classify", "open", 0, 1, "empty solution never matches"),
    ("cat, dog", "cat, dog", "classify", "open", 0, 0, "answer outside the tags"),
    # ---- open math
    (W("12"), "<answer>12</answer>", "math", "open", 1, 1, "integer"),
    (W("The answer is 12."), 12, "math", "open", 1, 1, "words around one number, int solution"),
    (W("-3.50"), "-3.5", "math", "open", 1, 1, "negative decimal"),
    (W("3/4"), "0.75", "math", "open", 1, 1, "fraction a/b"),
    (W("\\frac{3}{4}"), "<answer>3/4</answer>", "math", "open", 1, 1, "latex fraction"),
    (W("x = \\boxed{\\dfrac{-1}{2}}"), "-0.5", "math", "open", 1, 1, "boxed dfrac"),
    (W("-\\frac{3}{4}"), "-0.75", "math", "open", 1, 1, "minus before a latex fraction"),
    (W("-\\frac{3}{4}"), "0.75", "math", "open", 0, 1, "a minus before a fraction is not dropped"),
    (W("-\\frac{-3}{4}"), "0.75", "math", "open", 1, 1, "two minus signs"),
    (W("\\boxed{-\\left(\\frac{1}{2}\\right)}"), "-0.5", "math", "open", 1, 1, "minus before a bracket"),
    (W("- 3"), "-3", "math", "open", 1, 1, "minus, space, number"),
    (W("- 3"), "3", "math", "open", 0, 1, "a spaced minus is not dropped"),
    (W("3 - 4"), "-1", "math", "open", 0, 0, "a difference is an expression"),
    (W("1,234"), "1234", "math", "open", 1, 1, "thousands separator"),
    (W("$3"), "3", "math", "open", 1, 1, "dollar sign"),
    (W("5 cm"), "5", "math", "open", 1, 1, "unit stripped"),
    (W("area = 12 cm^2"), "12", "math", "open", 1, 1, "after the last '=', unit power stripped"),
    (W("50%"), "50%", "math", "open", 1, 1, "percent both sides"),
    (W("50%"), "0.5", "math", "open", 1, 1, "percent one side"),
    (W("30^\\circ"), "30", "math", "open", 1, 1, "degrees"),
    (W("0.333"), "1/3", "math", "open", 0, 1, "relative tolerance 1e-6: a rounded answer is wrong"),
    (W("13"), "12", "math", "open", 0, 1, "wrong number scores 0"),
    (W("3 and 4"), "4", "math", "open", 0, 0, "two numbers do not parse"),
    (W("\\sqrt{16}"), "16", "math", "open", 0, 0, "an expression is not its inner number"),
    (W("2^4"), "2", "math", "open", 0, 0, "a power is not its base"),
    (W(""), "", "math", "open", 0, 0, "empty answer vs empty solution never matches"),
    (W("no idea"), "", "math", "open", 0, 1, "empty solution never matches"),
    (W(""), "12", "math", "open", 0, 0, "empty answer"),
    (W("B"), "<answer>B</answer>", "math", "open", 1, 1, "letter solution: letters compared"),
    (W("(B) 12 cm"), "B", "math", "open", 1, 1, "leading option marker"),
    (W("C"), "B", "math", "open", 0, 1, "wrong letter"),
    (W("12"), "B", "math", "open", 0, 0, "a number for a letter question"),
    (W("\\sqrt{2}"), "\\sqrt{2}", "math", "open", 1, 1, "non-numeric solution compared as text"),
    ("<think>the answer is 12</think><answer>?</answer>", "12", "math", "open", 0, 0, "number in the think block only"),
    ("<think>x</think>12", "12", "math", "open", 0, 0, "answer outside the tags"),
    (W("9" * 10_000), "12", "math", "open", 0, 0, "10k-digit run"),
    (W("12"), float("nan"), "math", "open", 0, 1, "NaN solution never matches"),
]


@pytest.mark.parametrize("completion,solution,task,stage,accuracy,fmt,why", CASES, ids=[c[-1] for c in CASES])
def test_table(completion, solution, task, stage, accuracy, fmt, why):
    r = score(completion, solution, task, stage)
    assert r["accuracy"] == pytest.approx(accuracy), f"{why}: accuracy must be {accuracy}, got {r}"
    assert r["format"] == fmt, f"{why}: format must be {fmt}, got {r}"
    assert r["total"] == pytest.approx(accuracy + fmt), f"{why}: total = accuracy + format with unit weights"


def test_options():
    c = W("[10, 10, 30, 50]")  # half of the solution box
    sol = "[10, 10, 50, 50]"
    assert score(c, sol, "detection", "open")["iou"] == pytest.approx(0.5), "iou is logged"
    assert score(c, sol, "detection", "open", box_mode="iou")["accuracy"] == pytest.approx(0.5), "continuous IoU"
    assert score(c, sol, "detection", "open", box_mode="giou")["accuracy"] == pytest.approx(0.75), \
        "GIoU = IoU when the hull equals the union, mapped (0.5 + 1) / 2"
    far = W("[100, 10, 140, 50]")  # disjoint, hull 130 x 40, union 2 * 40 * 40
    assert score(far, sol, "detection", "open", box_mode="giou")["accuracy"] == pytest.approx(
        (-(5200 - 3200) / 5200 + 1) / 2), "GIoU ranks disjoint boxes by distance"
    assert score(c, sol, "detection", "open", iou_threshold=0.4)["accuracy"] == 1, "threshold option"
    assert score(W("[0, 0, 200000, 5]"), "[0, 0, 200000, 5]", "detection", "open", max_coord=1e6)["accuracy"] == 1

    partial = dict(task="math", stage="choice", choice_partial=0.2)
    assert score(W("A"), "A, C", **partial)["accuracy"] == pytest.approx(0.2), "partial credit for a proper subset"
    assert score(W("A, B"), "A, C", **partial)["accuracy"] == 0, "no credit when a wrong letter is present"

    cls = dict(task="classify", stage="open")
    assert score(W("cat"), "cat, dog", label_mode="exact", **cls)["accuracy"] == 0, "exact set"
    assert score(W("cat"), "cat, dog", label_mode="f1", **cls)["accuracy"] == pytest.approx(2 / 3), "F1 = 2 * 1 / 3"

    assert score(W("0.333"), "1/3", "math", "open", rel_tol=1e-2)["accuracy"] == 1, "relative tolerance option"
    r = score(W("yes"), "yes", "math", "judge", accuracy_weight=2.0, format_weight=0.5)
    assert r["total"] == pytest.approx(2.5), "weights scale the two terms"
    assert score(W("yes") + " " * 30, "yes", "math", "judge", max_chars=20)["total"] == 0, \
        "over-long completions score 0"


def test_logged_components():
    r = score(W('{"bbox_2d": [1, 2, 30, 40]}'), "[1, 2, 30, 40]", "detection", "open")
    assert r["parsed"] == "[1, 2, 30, 40]" and r["answer"] == '{"bbox_2d": [1, 2, 30, 40]}' and r["iou"] == 1
    assert score(W("C, A"), "A,C", "math", "choice")["parsed"] == "A,C", "letters are logged sorted"
    assert "iou" not in score(W("cat"), "cat", "classify", "open"), "iou only for open detection"


def test_programming_errors_raise():
    with pytest.raises(ValueError, match="task"):
        score(W("yes"), "yes", "segmentation", "judge")
    with pytest.raises(ValueError, match="stage"):
        score(W("yes"), "yes", "math", "final")
    with pytest.raises(ValueError, match="option"):
        score(W("yes"), "yes", "math", "judge", box_mod="iou")
    with pytest.raises(ValueError, match="box_mode"):
        score(W("yes"), "yes", "math", "judge", box_mode="area")


def test_docstring_examples():
    result = doctest.testmod(rewards)
    assert result.attempted > 10 and result.failed == 0, "every docstring example must hold"


def adversarial_strings(rng: random.Random, n: int) -> list[str]:
    tags = ["<think>", "</think>", "<answer>", "</answer>", "[", "]", "{", "}", "\\boxed{", "\\frac{", ",", "/", "="]
    pieces = tags + ["1", "-", ".", "e", "A", "yes", "no", "and", "cat", " ", "\n", "%", "^", "π", "\x00", "\ud7ff"]
    out = [
        "", " ", "<answer></answer>", "<think></think><answer></answer>",
        "<think>" * 5000 + "</think>" * 5000,
        "<answer>" * 3000 + "yes" + "</answer>" * 3000,
        W("9" * 10_000), W("[" + "1" * 10_000 + ", 2, 3, 4]"), W("1," * 5000), W("[" * 10_000),
        W("\\boxed{" * 3000), W("\\frac{1}{" * 2000), W(" and " * 3000), W("A " * 5000), W(" " * 15_000),
        W("x" * 50_000), "".join(rng.choice(tags) for _ in range(50_000)),
    ]
    while len(out) < n:
        kind = rng.randrange(3)
        if kind == 0:  # random unicode, any code point but surrogates
            s = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800)]))
                        for _ in range(rng.randrange(0, 300)))
        elif kind == 1:  # a soup of tags and number pieces
            s = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 400)))
        else:  # a well-formed shell around a soup
            s = W("".join(rng.choice(pieces) for _ in range(rng.randrange(0, 200))))
        out.append(s)
    return out


def test_fuzz_range_totality_and_speed():
    rng = random.Random(0)
    strings = adversarial_strings(rng, 1000)
    solutions = {
        "judge": ["yes", "no"],
        "choice": ["A, C"],
        "detection": ["[10, 10, 50, 50]"],
        "classify": ["cat, traffic light"],
        "math": ["12", "B", "\\sqrt{2}"],
    }
    t0, calls = time.perf_counter(), 0
    for s in strings:
        for task in rewards.TASKS:
            for stage in rewards.STAGES:
                key = stage if stage != "open" else task
                for sol in solutions[key] + [s[:100]]:  # junk solutions must not raise either
                    for opts in ({}, {"box_mode": "giou", "label_mode": "f1", "choice_partial": 0.2}):
                        r = score(s, sol, task, stage, **opts)
                        calls += 1
                        assert 0 <= r["accuracy"] <= 1 and r["format"] in (0, 1), f"out of range for {s[:80]!r}: {r}"
                        assert r["total"] == r["accuracy"] + r["format"], "total = accuracy + format"
    elapsed = time.perf_counter() - t0
    assert calls > 10_000, "the fuzz must cover thousands of calls"
    assert elapsed < 10, f"{calls} reward calls took {elapsed:.1f}s: some parsing is not linear"


def test_long_inputs_parse_in_linear_time():
    """With the length cap lifted, 50k-200k character adversarial answers still parse in milliseconds."""
    long = [
        W("1" + " " * 50_000 + "x"), W("[1, " + " " * 50_000), W("3" + " / " * 20_000), W("cat and " * 10_000),
        W("\\frac{" + "1" * 50_000), W("[1,2,3," * 10_000), W("-" * 50_000 + "1"), W("(A)" * 20_000),
        W("1,000" * 10_000), W("[" + "1" * 50_000 + "," + " " * 50_000), "<think>" * 20_000 + W("yes"),
    ] + adversarial_strings(random.Random(1), 17)
    t0 = time.perf_counter()
    for s in long:
        for task in rewards.TASKS:
            for stage in rewards.STAGES:
                r = score(s, "B" if task == "math" else "12", task, stage, max_chars=10**6)
                assert 0 <= r["total"] <= 2, f"out of range for {s[:80]!r}"
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"long inputs took {elapsed:.1f}s: some parsing is super-linear"
