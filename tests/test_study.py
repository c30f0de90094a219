"""The length-generalization study driver end to end on a tiny budget (real trainings on the
prose corpus with the passkey mixture, every evaluation row), and its mean / min-max tables."""

import json
import subprocess
import sys

import pytest

from fope_megatron.study.aggregate import ROWS, aggregate
from fope_megatron.testing import launch

# unscaled, dynamic-NTK (scales by sequence length) and YaRN on FoPE (floor kept): the other
# modes' formulas and models are covered by tests/test_scaling_modes.py
ROW_SET = ["RoPE", "RoPE+dynamic-NTK", "FoPE+YaRN"]


@pytest.mark.integration
def test_study_driver_tiny_budget(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "fope_megatron.study", "--out", str(out), "--runs-dir", str(runs),
        "--corpora", "prose", "--seeds", "1", "--steps", "7", "--prose-steps", "3",
        "--lengths", "128,256",
        "--passkey-trials", "2", "--ppl-chunks", "1", "--prose-docs", "30",
        "--rows", ",".join(ROW_SET), "--jobs", "2", "--train-override", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.warmup_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=launch.env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    rows = study["results"]["prose"]
    assert list(rows) == ROW_SET
    for row, r in rows.items():
        for metric in ("perplexity", "passkey"):
            for L in ("128", "256"):
                assert r[metric][L]["n"] == 1, (row, metric, L)
    for row in ROW_SET:
        kind, mode = ROWS[row]
        e = json.loads((out / "evals" / "prose" / f"{row}_s1" / "eval.json").read_text())
        assert e["position_embedding"] == kind
        if mode != "none":
            assert e["details"]["position_scaling"] == mode
            want = {"128": 1.0, "256": 1.0 if mode == "dynamic-ntk" else 2.0}
            assert e["details"]["scaling_factor"] == want
    # training saw the prose train prefix; evaluation the held-out one
    cfg = (runs / "prose" / "rope_s1" / "config.yaml").read_text()
    assert "prose_train" in cfg and "passkey_fraction: 0.5" in cfg
    # the twins ran side by side (--jobs 2), each with its own output log
    assert {p.name for p in (runs / "logs").glob("prose_*.log")} == {
        "prose_rope_s1.log", "prose_fope_s1.log"
    }  # fmt: skip
    assert (out / "prose.png").stat().st_size > 0
    assert "| RoPE+dynamic-NTK | 1 |" in (out / "study.md").read_text()
    log = (runs / "study.log").read_text()
    assert "--data " + str(runs / "prose" / "prose_heldout") in log
    # the prose twins trained --prose-steps (not --steps), recorded with the elapsed time
    assert log.count("train.steps=3") == 2 and "train.steps=7" not in log
    assert json.loads((out / "timing.json").read_text())["train_steps"] == {
        "synthetic": 7, "prose": 3
    }  # fmt: skip
    # a second call finds every eval.json and trains nothing
    again = subprocess.run(cmd, env=launch.env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert (runs / "study.log").read_text().count("fope_megatron.train") == 2


def test_aggregate_mean_and_min_max(tmp_path):
    for seed, (ppl, pk) in {1: (2.0, 1.0), 2: (4.0, 0.5), 3: (3.0, 0.0)}.items():
        d = tmp_path / "evals" / "synthetic" / f"FoPE_s{seed}"
        d.mkdir(parents=True)
        e = {"perplexity": {"128": ppl}, "passkey": {"128": pk},
             "passkey_by_depth": {"128": {"0-0.5": pk, "0.5-1": None}}}  # fmt: skip
        (d / "eval.json").write_text(json.dumps(e))
    res = aggregate(tmp_path, ["synthetic"], [1, 2, 3], [128])["results"]["synthetic"]
    assert list(res) == ["FoPE"]
    assert res["FoPE"]["perplexity"][128] == {"mean": 3.0, "min": 2.0, "max": 4.0, "n": 3}
    assert res["FoPE"]["passkey"][128]["mean"] == 0.5
    assert res["FoPE"]["passkey_by_depth"][128] == {"0-0.5": 0.5, "0.5-1": None}
    md = (tmp_path / "study.md").read_text()
    assert "| FoPE | 3 | 3.000 (2.000–4.000) |" in md
    assert res["FoPE"]["passkey_per_seed"] == {1: {128: 1.0}, 2: {128: 0.5}, 3: {128: 0.0}}
    assert "| FoPE | 2 | 0.50 |" in md and "| FoPE | 3 | 0.00 |" in md


def test_steps_defaults_and_errors():
    """Tiny defaults 3000 synthetic / 1500 prose; --steps alone sets both; bad counts exit 2."""
    from fope_megatron.study.__main__ import main, resolve_steps

    assert resolve_steps("tiny", None, None) == (3000, 1500)
    assert resolve_steps("tiny", 40, None) == (40, 40)
    assert resolve_steps("tiny", None, 20) == (3000, 20)
    assert resolve_steps("paper", None, None) == (None, None)
    for bad in (["--steps", "0"], ["--prose-steps", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
