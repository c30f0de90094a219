"""scripts/gpu_variants.sh without a GPU: its arguments, and every step under Triton's
interpreter at tiny shapes (``--device cpu``), so that a typo cannot waste a GPU call."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from fope_megatron.testing.launch import run_script


def run(args, timeout=600):
    return run_script(
        "gpu_variants.sh", args, {"GPU_PY": sys.executable, "OMP_NUM_THREADS": "1"}, timeout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "usage:"),
        (["OUT", "--device", "tpu"], "--device tpu: allowed cuda, cpu"),
        (["OUT", "--budget", "0"], "'0' is not a positive integer"),
        (["OUT", "--jobs"], "--jobs needs a value"),
        (["OUT", "--bogus", "1"], "unknown argument '--bogus'"),
    ],
)
def test_bad_arguments_exit_2_naming_them(args, message):
    proc = run(args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.integration
def test_every_step_runs_on_cpu(tmp_path):
    """Cache fill, the three test processes, the timed suites, the fastest-variant pick and the
    profile all run and land in results.tgz (interpreter, s=16, floors 16 and 8)."""
    out = tmp_path / "out"
    proc = run(
        [
            str(out),
            "--device",
            "cpu",
            "--seq",
            "16",
            "--jobs",
            "2",
            "--budget",
            "500",
            "--fope",
            "fope_fused,fope_fused_dot",
            "--rope",
            "rope_fused",
        ]  # fmt: skip
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "log.txt").read_text()
    assert "skip" not in log, log
    for part in "abc":
        assert f"tests {part}: 1 passed" in log, log
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        suite = json.load(tar.extractfile("./suite_L16.json"))
    assert {"suite_L16.json", "suite_2s.json", "suite_L8.json", "profile.txt"} <= names
    assert "warm_fope_fused_dot_L8.txt" in names
    row = suite["results"][0]
    assert set(row["over_best_rope"]) == {"fope_fused", "fope_fused_dot"}
    fastest = min(row["over_best_rope"], key=row["over_best_rope"].get)
    assert f"fastest FoPE variant at L=16: {fastest}" in log
