"""A catalogue of bad inputs across fope-train, fope-preprocess, fope-eval, fope-plan and
fope-export.

Each row is a real command line (the CLI's own ``main``, in this process) on real files: configs,
``.bin/.idx`` datasets, JSONL, checkpoints. Each must exit 2 (argparse's code too) with a message
naming the input, before any process group starts or any model is built: ``WORLD_SIZE=2`` with
no second rank would hang an escaped case, and the test checks that ``torch.distributed`` was
never initialised. docs/troubleshooting.md lists the same inputs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from fope_megatron.testing import launch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus):
    """Every bad file of the catalogue, made from the shared corpus and a 2-step run."""
    d = tmp_path_factory.mktemp("bad")

    def copy(name: str) -> str:
        for suffix in (".bin", ".idx", ".meta.json"):
            shutil.copy(corpus + suffix, d / (name + suffix))
        return str(d / name)

    trunc = copy("trunc")
    with open(trunc + ".bin", "r+b") as f:
        f.truncate(Path(trunc + ".bin").stat().st_size - 100)
    badidx = copy("badidx")
    Path(badidx + ".idx").write_bytes(b"not an index at all, just bytes" * 4)
    shortidx = copy("shortidx")
    raw = Path(shortidx + ".idx").read_bytes()
    Path(shortidx + ".idx").write_bytes(raw[: len(raw) // 2])
    badmeta = copy("badmeta")
    Path(badmeta + ".meta.json").write_text('{"tokenizer": "byte", "vocab_size": ')
    dtypemeta = copy("dtypemeta")
    text = Path(dtypemeta + ".meta.json").read_text().replace('"uint16"', '"int32"')
    Path(dtypemeta + ".meta.json").write_text(text)
    bigvocab = copy("bigvocab")
    text = (
        Path(bigvocab + ".meta.json").read_text().replace('"vocab_size": 258', '"vocab_size": 5000')
    )
    Path(bigvocab + ".meta.json").write_text(text)
    (d / "bad.yaml").write_text("train: {steps: 3\nmodel: [\n")
    (d / "list.yaml").write_text("- train\n- model\n")
    (d / "bad_ds.json").write_text("{not json")
    (d / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n{"text": "4"}\n')
    (d / "ok.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    (d / "data.csv").write_text("text\nhello\n")
    (d / "empty.jsonl").write_text("")
    run = d / "run"
    launch.train(run, [f"data.path=[{corpus}]", "train.steps=2", "train.save_interval=1"])
    norun = d / "norun"
    norun.mkdir()
    shutil.copy(run / "config.yaml", norun / "config.yaml")
    damaged = d / "damaged"
    shutil.copytree(run, damaged)
    for step in (1, 2):  # every checkpoint of this copy damaged after it was written
        model = damaged / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
        model.write_bytes(model.read_bytes()[:1000])
    return dict(corpus=corpus, d=str(d), trunc=trunc, badidx=badidx, shortidx=shortidx,
                badmeta=badmeta, dtypemeta=dtypemeta, bigvocab=bigvocab, run=str(run),
                norun=str(norun), damaged=str(damaged))  # fmt: skip


T, P, E, L, X = "fope-train", "fope-preprocess", "fope-eval", "fope-plan", "fope-export"
# (id, cli, arguments, text the message must hold); {name} is a path from `files`
# fmt: off
CASES = [
    ("unknown-key", T, ["train.stpes=3"], "train.stpes"),
    ("wrong-type", T, ["train.steps=abc"], "train.steps='abc'"),
    ("config-missing", T, ["--config", "{d}/nope.yaml"], "{d}/nope.yaml"),
    ("config-not-yaml", T, ["--config", "{d}/bad.yaml"], "{d}/bad.yaml"),
    ("config-not-mapping", T, ["--config", "{d}/list.yaml"], "{d}/list.yaml"),
    ("batch-indivisible", T, ["train.global_batch_size=6"], "train.global_batch_size=6"),
    ("layout-impossible", T, ["parallel.tp=3"], "parallel.tp=3"),
    ("warmup-over-steps", T, ["train.warmup_steps=50", "train.steps=10"], "train.warmup_steps"),
    ("prefix-missing", T, ["data.path=[{d}/nothing]"], "{d}/nothing.bin"),
    ("bin-truncated", T, ["data.path=[{trunc}]"], "{trunc}.bin"),
    ("idx-garbage", T, ["data.path=[{badidx}]"], "{badidx}.idx"),
    ("idx-truncated", T, ["data.path=[{shortidx}]"], "{shortidx}.idx"),
    ("meta-not-json", T, ["data.path=[{badmeta}]"], "{badmeta}.meta.json"),
    ("meta-dtype", T, ["data.path=[{dtypemeta}]"], "{dtypemeta}.meta.json"),
    ("meta-vocab", T, ["data.path=[{bigvocab}]"], "{bigvocab}.meta.json"),
    ("blend-prefix-missing", T, ["data.path=[0.5,{corpus},0.5,{d}/gone]"], "{d}/gone.bin"),
    ("split-no-train", T, ["data.split=0,100,0"], "data.split='0,100,0'"),
    ("split-malformed", T, ["data.split=a,b"], "data.split='a,b'"),
    ("resume-missing", T, ["train.resume={d}/no-ckpt"], "{d}/no-ckpt"),
    ("init-from-missing", T, ["train.init_from={d}/no-ckpt"], "{d}/no-ckpt"),
    ("nonfinite-policy", T, ["train.on_nonfinite=explode"], "train.on_nonfinite='explode'"),
    ("loss-spike-k", T, ["train.loss_spike=0.5"], "train.loss_spike=0.5"),
    ("dist-timeout", T, ["dist.timeout_minutes=0"], "dist.timeout_minutes=0"),
    ("ds-config-missing", T, ["deepspeed.config={d}/nope.json"], "{d}/nope.json"),
    ("ds-config-not-json", T, ["deepspeed.config={d}/bad_ds.json"], "{d}/bad_ds.json"),
    ("tokenizer-missing", T, ["data.path=[]", "data.synthetic=true", "data.tokenizer={d}/tok"], "{d}/tok"),
    ("resume-changed-lr-refused", T, ["train.resume={run}", "train.lr=5e-4", "train.resume_changes=refuse"], "train.lr"),
    ("resume-all-damaged", T, ["train.resume={damaged}"], "mp_rank_00_model_states.pt"),
    ("pre-input-missing", P, ["--input", "{d}/nope.jsonl", "--output-prefix", "{d}/o"], "{d}/nope.jsonl"),
    ("pre-malformed-line", P, ["--input", "{d}/bad.jsonl", "--output-prefix", "{d}/o"], "{d}/bad.jsonl:3"),
    ("pre-format", P, ["--input", "{d}/data.csv", "--output-prefix", "{d}/o"], "{d}/data.csv"),
    ("pre-json-key", P, ["--input", "{d}/ok.jsonl", "--output-prefix", "{d}/o", "--json-key", "content"], "'content'"),
    ("pre-workers", P, ["--input", "{d}/ok.jsonl", "--output-prefix", "{d}/o", "--workers", "0"], "--workers"),
    ("pre-tokenizer", P, ["--input", "{d}/ok.jsonl", "--output-prefix", "{d}/o", "--tokenizer", "{d}/tok"], "{d}/tok"),
    ("pre-empty", P, ["--input", "{d}/empty.jsonl", "--output-prefix", "{d}/o"], "{d}/empty.jsonl"),
    ("pre-no-output", P, ["--input", "{d}/ok.jsonl"], "--output-prefix"),
    ("eval-run-missing", E, ["--run", "{d}/norun-at-all", "--out", "{d}/e"], "{d}/norun-at-all"),
    ("eval-no-checkpoint", E, ["--run", "{norun}", "--out", "{d}/e"], "{norun}/checkpoints"),
    ("eval-data-missing", E, ["--run", "{run}", "--out", "{d}/e", "--data", "{d}/nodata"], "{d}/nodata"),
    ("eval-data-truncated", E, ["--run", "{run}", "--out", "{d}/e", "--data", "{trunc}"], "{trunc}.bin"),
    ("eval-data-malformed", E, ["--run", "{run}", "--out", "{d}/e", "--data", "{d}/bad.jsonl"], "{d}/bad.jsonl:3"),
    ("eval-data-vocab", E, ["--run", "{run}", "--out", "{d}/e", "--data", "{bigvocab}"], "{bigvocab}.meta.json"),
    ("eval-lengths", E, ["--run", "{run}", "--out", "{d}/e", "--lengths", "12x"], "12x"),
    ("eval-checkpoint-missing", E, ["--run", "{run}", "--out", "{d}/e", "--checkpoint", "step_7"], "step_7"),
    ("eval-checkpoint-damaged", E, ["--run", "{damaged}", "--out", "{d}/e"], "mp_rank_00_model_states.pt"),
    ("export-checkpoint-damaged", X, ["--run", "{damaged}", "--out", "{d}/hf"], "mp_rank_00_model_states.pt"),
    ("plan-config-missing", L, ["--config", "{d}/nope.yaml", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80"], "{d}/nope.yaml"),
    ("plan-nodes", L, ["--config", "configs/fope_60m.yaml", "--nodes", "0"], "--nodes"),
    ("plan-unknown-key", L, ["--config", "configs/fope_60m.yaml", "train.stpes=3"], "train.stpes"),
    ("plan-no-config", L, ["--nodes", "1"], "--config"),
]
# fmt: on


def _main(cli: str):
    if cli == T:
        from fope_megatron.train.__main__ import main
    elif cli == P:
        from fope_megatron.data.preprocess import main
    elif cli == E:
        from fope_megatron.eval.__main__ import main
    elif cli == X:
        from fope_megatron.checkpoint.hf.export import main
    else:
        from fope_megatron.plan import main
    return main


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_it(case, files, capsys, monkeypatch, tmp_path):
    name, cli, args, needle = case
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("WORLD_SIZE", "2")  # an escaped case would wait for a second rank
    monkeypatch.setenv("RANK", "0")
    argv = [a.format(**files) for a in args]
    if cli == T:
        data = (
            []
            if any(a.startswith("data.path") for a in argv)
            else [f"data.path=[{files['corpus']}]"]
        )
        argv = [*launch.TINY, f"run.dir={tmp_path / 'run'}", *data, *argv]
    t0 = time.time()
    try:
        code = _main(cli)(argv)
    except SystemExit as e:  # argparse
        code = e.code
    took = time.time() - t0
    err = capsys.readouterr().err
    assert code == 2, (name, code, err[-2000:])
    assert needle.format(**files) in err, (name, needle.format(**files), err[-2000:])
    assert not dist.is_initialized(), name  # no process group was started
    assert not (tmp_path / "run").exists()  # nothing written for the run
    assert took < 30, (name, took)


def test_catalogue_size():
    """At least 25 bad inputs, every CLI covered."""
    assert len(CASES) >= 25 and {c[1] for c in CASES} == {T, P, E, L, X}
