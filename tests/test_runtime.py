"""The process runtime: precision choice (mocked probe: a CPU with and without fast bf16) and its log line.

    pytest tests/test_runtime.py
"""

import json
import time

import pytest
import torch
from conftest import tiny_run

from repforce import runtime
from repforce.train import train

CPU = torch.device("cpu")


def never():
    raise AssertionError("the step was timed, but nothing needed timing")


def bf16_slower():
    time.sleep(0.03 if torch.is_autocast_enabled("cpu") else 0.0)


def bf16_faster():
    time.sleep(0.0 if torch.is_autocast_enabled("cpu") else 0.03)


def test_explicit_precision_is_kept_and_never_timed():
    assert runtime.choose_precision("fp32", CPU, never)[0] == "fp32"
    assert runtime.choose_precision("bf16", CPU, never)[0] == "bf16"


def test_auto_on_an_accelerator_is_bf16():
    assert runtime.choose_precision("auto", torch.device("meta"), never)[0] == "bf16"


def test_auto_without_fast_bf16_is_fp32_untimed(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_matmuls_fast", lambda: False)
    p, why = runtime.choose_precision("auto", CPU, never)
    assert p == "fp32" and "emulated" in why


@pytest.mark.parametrize("work, expected", [(bf16_slower, "fp32"), (bf16_faster, "bf16")])
def test_auto_with_fast_bf16_takes_the_faster_step(monkeypatch, work, expected):
    """A CPU whose bf16 matmuls are fast (AMX): bf16 only where the timed step is faster in it."""
    monkeypatch.setattr(runtime, "bf16_matmuls_fast", lambda: True)
    p, why = runtime.choose_precision("auto", CPU, work)
    assert p == expected and "timed step" in why
    assert runtime.choose_precision("auto", CPU)[0] == "bf16"  # no step to time: the matmul decides


@pytest.mark.parametrize("fast", [False, True])
def test_train_logs_and_prints_its_precision(tmp_path, monkeypatch, capsys, fast):
    """The trainer says what auto chose, in log.jsonl and on the console. With fast bf16 mocked it times
    the tiny model's real step in both precisions (bf16 is emulated on most CI CPUs: fp32 then wins,
    on AMX hosts either may), and the losses stay those of the chosen precision."""
    monkeypatch.setattr(runtime, "bf16_matmuls_fast", lambda: fast)
    run = tmp_path / "run"
    summary = train(tiny_run("pixel_rf", steps=2, precision="auto", log_every=1), run)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    chosen = [r for r in rows if "precision" in r]
    assert len(chosen) == 1 and chosen[0]["precision"] == summary["precision"]
    assert ("timed step" in chosen[0]["why"]) == fast and ("emulated" in chosen[0]["why"]) == (not fast)
    if not fast:
        assert summary["precision"] == "fp32"
    out, err = capsys.readouterr()
    assert f"precision: {summary['precision']} (" in out + err
    assert [r["step"] for r in rows if "step" in r] == [1, 2]
