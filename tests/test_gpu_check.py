"""gpu_check.py on a CPU: its table and exit code, the bandwidth table, and checks 3-4 on a miniature "3B".

The whole `python gpu_check.py --device cpu --quick` (torchrun with gloo, kill + resume) takes about a minute on
a 2-core CPU and is marked slow.
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_table(monkeypatch):
    monkeypatch.setattr(gpu_check, "ROWS", [])
    monkeypatch.setattr(gpu_check, "FAILED", [])


@pytest.mark.parametrize("name, tb_s", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H200", 4.8),
                                        ("NVIDIA A100-SXM4-80GB", 2.0), ("NVIDIA A100 80GB PCIe", 2.0),
                                        ("NVIDIA A100-SXM4-40GB", 1.56)])
def test_bandwidth_by_gpu_name(monkeypatch, name, tb_s):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert gpu_check.bandwidth("cuda")[0] == tb_s * 1e12


def test_an_unknown_device_measures_a_copy():
    bw, where = gpu_check.bandwidth("cpu")
    assert bw > 1e8 and "measured" in where


def test_a_failed_check_is_a_row_and_the_exit_code(monkeypatch, capsys, tmp_path, fresh_table):
    def boom(*args):
        raise ValueError("boom | with a bar\nand a newline")
    monkeypatch.setattr(gpu_check, "check_api", boom)
    monkeypatch.setattr(gpu_check, "check_ddp", lambda a, nproc: f"fine with {nproc} processes")
    monkeypatch.setattr(gpu_check, "check_resume", boom)
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[0].startswith("| check | setting | result | seconds |"), out
    assert "| **FAILED** ValueError: boom \\| with a bar and a newline |" in rows[1], "one cell: no raw bar or newline"
    assert "fine with 2 processes" in rows[2] and "FAILED" in rows[3]
    assert "2 failed: 0 transformers API, 2 kill + resume" in out


def test_last_error_names_the_ranks_exception(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("stage 1/1 open: 33%\n[rank1]: Traceback (most recent call last):\n"
                   "[rank1]: AttributeError: 'Output' object has no attribute 'cache'\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n=====\n")
    assert gpu_check.last_error(log) == "[rank1]: AttributeError: 'Output' object has no attribute 'cache'"


def test_checks_3_and_4_on_a_miniature(monkeypatch, fresh_table):
    """The code paths of checks 3-4 (model built from bench's 3B shape, model.encode, train.grpo_step with
    MasterAdamW, with and without checkpointing, the decode rate) at a few-million-parameter width."""
    mini = dict(text=dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1024),
                vision=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                            fullatt_block_indexes=[0]),
                image=(56, 112), prompt=60, new=4, G=2)
    monkeypatch.setitem(gpu_check.SHAPE, "cpu", mini)
    a = types.SimpleNamespace(device="cpu", dtype="float32")
    state = gpu_check.check_3b(a)
    gpu_check.attempt("4", "", lambda: gpu_check.check_decode(a, state))
    monkeypatch.setattr(gpu_check, "DECODE_ROWS", 4)
    gpu_check.attempt("4 batch", "", lambda: gpu_check.check_decode_batch(a, state))
    assert not gpu_check.FAILED, gpu_check.ROWS
    assert [r[0] for r in gpu_check.ROWS] == ["3 model + prefill", "3 GRPO step", "3 GRPO step", "4", "4 batch"]
    assert state["prompt_len"] == 60 and "with grad checkpointing" in gpu_check.ROWS[2][1]
    assert state["rollout"][1].completion_ids.shape == (2, 4) and "tok/s" in gpu_check.ROWS[3][2]
    assert "equal the eager fixed step's in 4 of 4 rows" in gpu_check.ROWS[4][2], gpu_check.ROWS[4][2]
    assert list(state["batch_rows"]) == ["transformers generate", "rollout.generate",
                                      "rollout.generate, fixed step (eager on a CPU)"]
    assert all("4 rows x 4 tokens" in text and "of the HBM bound" in text for text in state["batch_rows"].values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "optimizer", "fsdp"])
def test_check_5_runs_a_sharded_step_on_two_processes(tmp_path, mode):
    """Check 5's torchrun worker (check 3's model sharded by --shard, one GRPO step) at the miniature's width."""
    mini = dict(text=dict(num_hidden_layers=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1024),
                vision=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                            fullatt_block_indexes=[0]), image=(56, 112), prompt=60, new=4, G=2)
    text = gpu_check.check_shard(types.SimpleNamespace(device="cpu", dtype="float32", out=str(tmp_path)), mode, mini)
    assert text.startswith("peak per rank ") and text.count("GiB") == 2 and "step " in text, text


@pytest.mark.slow
def test_the_quick_cpu_run_passes(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--device", "cpu", "--quick",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "0 failed" in r.stdout and r.stdout.count("\n| ") == 4, r.stdout
    assert "bit-identical vs uninterrupted" in r.stdout
