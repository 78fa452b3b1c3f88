"""bench.py: --memory (parameter counts, the activation measurement, the plan's arithmetic) and the argument checks."""
import sys

import pytest

import bench

# A narrow 2-layer shape: the activation measurement in a second.
NARROW = dict(text=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1024),
              vision=dict(bench.VISION, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
              tie_word_embeddings=True)
FAKE_ACTS = {False: dict(text_layer=130_000, text_rest=17_000, vision_block=66_000, vision_rest=18_000,
                         update_prompt=130_000, update_answer=137_000, update_prompt_kv=8_000),
             True: dict(text_layer=4_096, text_rest=17_000, vision_block=2_560, vision_rest=18_000)}


def test_parameter_counts_of_the_real_configs():
    assert bench.count_parameters(bench.SHAPES["3B"]) == {"total": 3_754_622_976, "text": 3_085_938_688,
                                                          "vision": 668_684_288}
    assert bench.count_parameters(bench.SHAPES["7B"])["total"] == 8_292_166_656


def test_checkpointing_keeps_only_each_layers_input():
    full, ckpt = bench.activation_bytes(NARROW, False), bench.activation_bytes(NARROW, True)
    assert ckpt["text_layer"] < full["text_layer"] and ckpt["vision_block"] < full["vision_block"]
    assert ckpt["text_layer"] == 64 * 2                                           # one bf16 hidden state per token
    assert ckpt["vision_block"] == pytest.approx(32 * 2, abs=1)                   # per patch, + the block's cu_seqlens


def test_the_update_without_checkpointing_keeps_a_prompt_once_and_its_keys_and_values_per_answer():
    """update_bytes's three per-token costs, fitted at one setting, predict what the update keeps at others (the
    fixed costs of a model this narrow keep it to 3%; dropping any term misses by far more)."""
    model = bench.truncated_model(NARROW)
    a = bench.activation_bytes(NARROW, False, model)
    assert a["update_prompt"] == pytest.approx(a["text_layer"], rel=0.05), "a prompt's own forward, once"
    assert a["update_prompt_kv"] == pytest.approx(2 * 4 * 16 * 2, rel=0.1), "K and V at 4 query heads x 16, bf16"
    for P, A, G in [(96, 24, 3), (200, 8, 5), (30, 60, 1)]:
        measured = bench.update_layer_bytes(model, P, A, G)
        planned = a["update_prompt"] * P + a["update_answer"] * G * A + a["update_prompt_kv"] * G * P
        assert planned == pytest.approx(measured, rel=0.03), (P, A, G)
        in_layers = bench.text_activations(NARROW["text"], a, False, 1, G, P, A) - a["text_rest"] * (P + G * A)
        assert in_layers == pytest.approx(2 * planned), "the plan's text activations: 2 layers of them"


def test_the_plan_without_checkpointing_counts_each_prompt_once():
    t, a = bench.SHAPES["3B"]["text"], FAKE_ACTS[False]
    plan = bench.memory_plan(bench.SHAPES["3B"], 3_754_622_976, FAKE_ACTS, False, group=4, prompt_tokens=1300,
                             new_tokens=256)
    per_answer = (t["num_hidden_layers"] * a["text_layer"] + a["text_rest"]) * (1300 + 256) * 4
    assert plan["parts"]["activations, text layers"] < 0.5 * per_answer


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("opt, fsdp", [(1, 1), (8, 1), (1, 8)])
def test_plan_components_add_up_to_its_total(ckpt, opt, fsdp):
    P = 3_754_622_976
    plan = bench.memory_plan(bench.SHAPES["3B"], P, FAKE_ACTS, ckpt, opt_ranks=opt, fsdp_ranks=fsdp)
    assert set(plan["parts"]) == set(bench.PHASES)
    for phase in ("held", "rollout", "update", "step"):
        assert plan[phase] == pytest.approx(sum(v for k, v in plan["parts"].items() if bench.PHASES[k] == phase))
    assert plan["total"] == pytest.approx(plan["held"] + max(plan["rollout"], plan["update"], plan["step"]))
    step = {(1, 1): 4 - 2, (8, 1): 4 / 8, (1, 8): (4 - 2) / 8}[opt, fsdp]   # fp32 gradient copies at the step
    assert plan["step"] == pytest.approx(step * P)
    per_param = {(1, 1): 18, (8, 1): 2 + 2 + 2 + 12 / 8, (1, 8): 18 / 8}[opt, fsdp]   # bytes held per parameter
    assert plan["held"] == pytest.approx(per_param * P + bench.ALLOWANCE_GIB * bench.GIB)


def test_memory_flag_runs_the_plan_not_the_speed_benchmark(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "print_memory_plans", lambda: calls.append("plan"))
    monkeypatch.setattr(bench, "load", lambda job: pytest.fail("the speed benchmark ran"))
    monkeypatch.setattr(sys, "argv", ["bench.py", "--memory"])
    bench.main()
    assert calls == ["plan"]


@pytest.mark.parametrize("argv, flag", [
    (["--device", "xyz"], "--device"), (["--device", "cuda"], "torch sees no GPU"), (["--sizes", "0"], "--sizes"),
    (["--batch", "0"], "--batch"), (["--group", "0"], "--group"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--threads", "-1"], "--threads"), (["--repeats", "0"], "--repeats"), (["--warmup", "-1"], "--warmup"),
    (["--preset", "--no-training"], "nothing to run")])
def test_bad_arguments_stop_before_any_model_is_built(monkeypatch, argv, flag):
    if "cuda" in argv and bench.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(bench, "load", lambda job: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit, match=flag):
        bench.main(argv)
