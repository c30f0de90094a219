"""Every console script prints only its own output; ``-v`` shows the libraries' notices again.

Each tool runs once as a subprocess (all of them at the same time, so the module takes about as
long as its slowest tool): ``--help`` for every entry of ``[project.scripts]``, and a real cheap
invocation of fope-plan (the plan of the 7B Llama), fope-preprocess (two documents) and
fope-train (``--dry-run``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

from fope_megatron.compat.warnings import QUIET_ENV

pytestmark = pytest.mark.integration  # every tool runs as a subprocess

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {  # [project.scripts] of pyproject.toml, as installed
    e.name: e.value
    for e in distribution("fope-megatron").entry_points
    if e.group == "console_scripts"
}
NOISE = re.compile(
    r"Transformer Engine|\bApex\b|\w+Warning:|^\s*warnings\.warn\(|\[transformers\]|examples/s",
    re.MULTILINE,
)


def _command(script: str, args: list[str]) -> list[str]:
    """``python -c`` running the console script's entry point (no installed wrapper needed)."""
    module, func = SCRIPTS[script].split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def _cases(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    docs = tmp / "docs.jsonl"
    docs.write_text('{"text": "hello world"}\n{"text": "a second document"}\n')
    plan = ["--config", str(REPO / "configs" / "llama_7b_fope.yaml")]
    cases = {f"{s} --help": (s, ["--help"]) for s in SCRIPTS}
    cases.update({
        "fope-plan 7B": ("fope-plan", plan),
        "fope-plan 7B -v": ("fope-plan", [*plan, "-v"]),
        "fope-preprocess": ("fope-preprocess", ["--input", str(docs), "--output-prefix", str(tmp / "out")]),
        "fope-train --dry-run": ("fope-train", ["--config", str(REPO / "configs" / "smoke.yaml"), "--dry-run"]),
        "fope-train --help-config": ("fope-train", ["--help-config"]),
    })  # fmt: skip
    return cases


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "PYTHONWARNINGS"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    tmp = tmp_path_factory.mktemp("cli_quiet")
    procs = {
        name: subprocess.Popen(
            _command(script, args),
            cwd=tmp,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, (script, args) in _cases(tmp).items()
    }
    done = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out)
    return done


QUIET = [f"{s} --help" for s in SCRIPTS] + [
    "fope-plan 7B",
    "fope-preprocess",
    "fope-train --dry-run",
    "fope-train --help-config",
]


@pytest.mark.parametrize("name", QUIET)
def test_tool_prints_only_its_own_output(outputs, name: str) -> None:
    proc = outputs[name]
    assert proc.returncode in (0, 1), proc.stdout  # fope-plan: 1 = does not fit
    assert not NOISE.findall(proc.stdout), proc.stdout
    assert proc.stdout.strip()


@pytest.mark.parametrize("script", SCRIPTS)
def test_tool_has_verbose_flag(outputs, script: str) -> None:
    assert "--verbose" in outputs[f"{script} --help"].stdout


def test_verbose_shows_library_warnings(outputs) -> None:
    quiet, loud = outputs["fope-plan 7B"].stdout, outputs["fope-plan 7B -v"].stdout
    assert "Transformer Engine and Apex are not installed" in loud
    assert quiet.strip() and quiet.strip() in loud  # the plan itself is the same


def test_help_config_lists_the_keys_and_exits_0(outputs) -> None:
    proc = outputs["fope-train --help-config"]
    assert proc.returncode == 0, proc.stdout
    assert "train.precision  (Literal['auto', 'fp32', 'bf16'], default \"auto\")" in proc.stdout


def test_plan_runs_as_a_module(outputs) -> None:
    """``python -m fope_megatron.plan`` is the ``fope-plan`` console script."""
    cfg = str(REPO / "configs" / "llama_7b_fope.yaml")
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "PYTHONWARNINGS"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "fope_megatron.plan", "--config", cfg],
        env=env, text=True, capture_output=True, timeout=300,
    )  # fmt: skip
    script = outputs["fope-plan 7B"]
    assert proc.returncode == script.returncode
    assert proc.stdout.strip() == script.stdout.strip()
