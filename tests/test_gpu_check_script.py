"""scripts/gpu_check.sh without a GPU: argument handling, the wheelhouse, the offline install.

The GPU node has no network and lacks megatron-core / deepspeed; the script installs them from a
wheelhouse with --no-index into a venv that sees the node's own Python packages (its CUDA torch).
Here the "node" is this project's venv and the wheelhouse is built for this interpreter, so the
same commands run as on the GPU node, up to the first step that needs CUDA (--dry-run).
"""

from __future__ import annotations

import json
import sys

import pytest

from fope_megatron.testing.launch import run_script


def run(args, env=None, timeout=600):
    return run_script("gpu_check.sh", args, {"PYTHON": sys.executable, **(env or {})}, timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--only", "tests,lunch"], "--only part 'lunch' unknown"),
        (["--steps", "0"], "--steps must be a positive integer, got '0'"),
        (["--layers", "x"], "--layers must be a positive integer, got 'x'"),
        (["--out"], "--out needs a value"),
        (["--wheelhouse", "/nonexistent/wh"], "wheelhouse '/nonexistent/wh' has no megatron_core"),
    ],
)
def test_bad_arguments_exit_2_naming_them(args, message):
    proc = run(args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_help_lists_the_options():
    proc = run(["--help"])
    assert proc.returncode == 0
    for opt in ("--wheelhouse", "--steps", "--layers", "--only", "--dry-run"):
        assert opt in proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_wheelhouse_and_offline_install_dry_run(tmp_path):
    """Build the wheelhouse (this interpreter's tags), install offline, import everything."""
    wh = tmp_path / "wh"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = run_script(
        "build_wheelhouse.sh", [str(wh)],
        {"WHEEL_PYTHON_VERSION": ver, "BUILD_PYTHON": sys.executable}, timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    names = {p.name.split("-")[0] for p in wh.glob("*.whl")}
    assert {"megatron_core", "deepspeed", "pydantic", "setuptools", "liger_kernel"} <= names
    assert not any(n in names for n in ("torch", "triton", "numpy")), names  # the node's own

    venv, out = tmp_path / "venv", tmp_path / "out"
    proc = run(
        ["--dry-run", "--wheelhouse", str(wh), "--out", str(out)],
        env={"GPU_VENV": str(venv), "PIP_NO_INDEX": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    versions = (out / "versions.txt").read_text()
    assert "fope_megatron imports ok" in versions
    # megatron-core and deepspeed come from the venv (the wheelhouse), torch from the "node"
    for mod in ("megatron.core", "deepspeed"):
        line = next(ln for ln in versions.splitlines() if ln.startswith(mod + " "))
        assert str(venv) in line, line
    assert "dry run: install and imports done" in proc.stdout
    pth = list(venv.glob("lib/python*/site-packages/_gpu_node_site.pth"))
    assert pth and any("site-packages" in ln for ln in pth[0].read_text().splitlines())


def test_report_from_metrics(tmp_path):
    """gpu_report turns the runs' metrics into the side-by-side table (numbers derived here)."""
    from fope_megatron.bench.gpu_report import main

    for name, dt in (("fope_fused", 0.51), ("fope_torch", 0.60), ("rope_fused", 0.50)):
        d = tmp_path / f"train_{name}"
        d.mkdir()
        recs = [
            {"step": i, "loss": 5.0 - 0.1 * i, "step_time_s": dt if i > 2 else 9.0,
             "tokens_per_s": 1000 / dt, "tflops": 1.0, "mfu": 0.5, "memory_gb": 10.0 + i}
            for i in range(1, 7)
        ]  # fmt: skip
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "config.yaml").write_text(f"# resolved at start: position.fusion: x -> {name}\n")
    assert main(["--out", str(tmp_path), "--skip", "2"]) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["step_time_vs_rope_fused"]["fope_fused"] == pytest.approx(0.51 / 0.50)
    assert doc["runs"]["fope_torch"]["peak_memory_gib"] == 16.0
    assert doc["runs"]["fope_fused"]["fusion"].endswith("-> fope_fused")
    assert "| fope_fused |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.integration
def test_tests_step_runs_two_pytest_processes(tmp_path):
    """The tests step (run here without CUDA, kernel under the interpreter) splits the kernel
    tests over two pytest processes, one log each, and reports both."""
    out = tmp_path / "out"
    sel = " ".join(
        f"tests/test_triton_apply.py::{t}"
        for t in ("test_bad_inputs_named_errors", "test_rope_forced_paths_equal_torch_rope")
    )
    proc = run(
        ["--allow-cpu", "--only", "tests", "--out", str(out)],
        env={"GPU_VENV": sys.prefix, "GPU_CHECK_PYTEST_ARGS": sel, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed, 1 deselected" in (out / "pytest.log").read_text()
    variants = (out / "pytest_variants.log").read_text()
    assert "1 passed, 1 deselected" in variants
    assert "two processes" in proc.stdout
