"""The metrics writer's batches and the guard's device decision, in one process (no trainer)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fope_megatron.train.guard import Guard
from fope_megatron.train.metrics import MetricsLogger


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_records_are_written_in_batches_and_none_is_lost(tmp_path):
    metrics = MetricsLogger(tmp_path, 0, 10, 0, tensorboard=False, progress=False)
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        metrics.train_step({"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0,
                            "tokens_per_s": 1.0}, 1.0, console=step == 1)  # fmt: skip
    assert lines(path) == []  # kept in memory: no step waited on the file system
    metrics.flush(wait=True)
    assert [r["step"] for r in lines(path)] == [1, 2, 3]
    metrics.write({"step": 3, "save": "step_00000003", "save_blocked_s": 0.1, "save_total_s": 0.2})
    metrics.train_step({"step": 4, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0},
                       1.0, console=False)  # fmt: skip
    metrics.flush()  # handed over without waiting
    metrics.train_step({"step": 5, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0},
                       1.0, console=False)  # fmt: skip
    metrics.close()  # writes what is left
    recs = lines(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 3, 4, 5]
    assert recs[3]["save_total_s"] == 0.2


def test_other_ranks_write_nothing(tmp_path):
    metrics = MetricsLogger(tmp_path, 1, 10, 0, tensorboard=False, progress=False)
    metrics.write({"step": 1, "loss": 1.0})
    metrics.flush(wait=True)
    metrics.close()
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("window", [2, 3])
def test_device_decision_is_the_hosts(window):
    """``device_bad`` (the skip policy's poison, on the device) says what ``before_update`` says,
    for non-finite losses and spikes over an even and an odd window's median."""
    cfg = SimpleNamespace(on_nonfinite="skip", max_consecutive_skips=5, loss_spike=3.0,
                          loss_spike_window=window)  # fmt: skip
    guard = Guard(cfg)
    losses = [4.0, 3.0, 2.5, 7.6, 7.5, 100.0, math.nan, math.inf, 2.0, 6.0, 6.1, 6.2]
    for loss in losses:
        host = guard.before_update(loss) is not None
        device = bool(guard.device_bad(torch.tensor(loss, dtype=torch.float64)))
        assert device == host, (loss, list(guard.history))
        guard.after_update(guard.before_update(loss), loss, 1.0, dropped=True)
    assert guard.total_skipped > 0
