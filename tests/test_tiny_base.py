"""tiny_base.py: the warm-start's phases draw their worlds, and --init continues a base with the full phase."""
import json
import os

import data
import model as M
import tiny_base as B

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-base")


def test_warm_start_phases_draw_their_worlds():
    sizes = lambda rows: {o["box"][2] - o["box"][0] for r in rows for o in r["meta"]["objects"]}
    kinds = lambda rows: {r["meta"]["kind"] for r in rows}
    early = [r for step in range(6) for phase in ("open", "all") for r in B.base_rows(step, 32, phase, seed=0)]
    assert sizes(early) == {32, 48} and kinds(early) <= {k for v in data.BASE_KINDS.values() for k in v}
    assert {r["task"] for r in B.base_rows(0, 32, "open", seed=0)} == {"classify", "math"}
    full = [r for step in range(6) for r in B.base_rows(step, 32, "full", seed=0)]
    assert 16 in sizes(full) and kinds(full) & set(data.GEOMETRY), "the last phase meets the whole world"
    assert {r["stage"] for r in full} == {"judge", "choice", "open"}
    assert B.base_rows(3, 32, "all", seed=0) == B.base_rows(3, 32, "all", seed=0), "batches are seeded"
    scenes = lambda step: [r["meta"]["objects"] for r in B.base_rows(step, 32, "all", seed=0)]
    assert scenes(3) != scenes(4), "by step: fresh scenes every step"
    assert ("classify", "choice") not in B.FULL_RULE and B.FULL_RULE[("detection", "open")] > 0.05


def test_warm_start_init_continues_a_base_with_the_full_phase(tmp_path):
    base = BASE
    with open(os.path.join(base, "base_card.json")) as f:
        before = json.load(f)
    out = str(tmp_path / "base")
    B.build_base(out, init=base, max_minutes=0)  # out of time at once: one step, one evaluation, then the card
    with open(os.path.join(out, "base_card.json")) as f:
        card = json.load(f)
    assert card["steps"] == before["steps"] + 1 and card["history"][:-1] == before["history"]
    assert card["history"][-1]["phase"] == "full" and card["history"][-1]["step"] == card["steps"]
    assert card["recipe"]["init"] == base and os.path.isdir(out + ".snapshot")
    M.load(out)  # a loadable checkpoint
