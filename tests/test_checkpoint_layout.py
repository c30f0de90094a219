"""Resume on another layout: a run saved at DP=2 under ZeRO-2 goes on at one rank under ZeRO-1, at
TP=2 and from there at TP=1; a DP=2 ZeRO-1 run at one rank under ZeRO-3 and from there at DP=2
under ZeRO-1 again; a CP=2 run at CP=1 (the resumes a requeued job with another node count
makes), through DeepSpeed's universal checkpoint, with the losses of the run that never stopped;
what cannot be resharded fails in preflight, naming the keys, with exit code 2."""

import json
import shutil

import pytest

from fope_megatron.checkpoint import layout
from fope_megatron.errors import ConfigError
from fope_megatron.testing.launch import losses, train
from fope_megatron.testing.models import tiny_config

STEPS, SPLIT = 4, 2


def _base(corpus):
    return [f"data.path=[{corpus}]", f"train.steps={STEPS}", "train.keep_last=1"]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """``(straight losses, run dir stopped at step SPLIT)``, both DP=2 ZeRO-2 on 2 ranks."""
    tmp = tmp_path_factory.mktemp("layout")
    base = _base(corpus) + ["deepspeed.zero_stage=2"]
    train(tmp / "straight", base, "torchrun", 2, timeout=600)
    train(tmp / "split", [*base, f"train.exit_at_step={SPLIT}"], "torchrun", 2, timeout=600)
    return losses(tmp / "straight"), tmp / "split"


def _resume(run, corpus, overrides, launcher, nproc, exit_at=None):
    extra = [f"train.exit_at_step={exit_at}"] if exit_at else []
    proc = train(run, _base(corpus) + overrides + extra, launcher, nproc, timeout=600)
    log = proc.stdout + proc.stderr
    assert "(resharded on load)" in log and f"(once, on {nproc} ranks)" in log, log[-3000:]
    return losses(run)


def _close(got, straight, steps):
    for step in steps:  # optimizer, schedule and data position kept
        assert got[step] == pytest.approx(straight[step], abs=1e-5), (step, got, straight)


@pytest.mark.integration
def test_dp2_zero2_resumes_at_one_rank_zero1(saved, corpus, tmp_path):
    straight, split = saved
    run = shutil.copytree(split, tmp_path / "run")
    got = _resume(run, corpus, ["deepspeed.zero_stage=1"], "python", 1)
    assert sorted(got) == list(range(1, STEPS + 1))
    _close(got, straight, range(SPLIT + 1, STEPS + 1))
    ckpts = run / "checkpoints"
    # keep_last=1: the universal copy went with its checkpoint
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{STEPS:08d}"]
    newest = json.loads((ckpts / f"step_{STEPS:08d}" / "layout.json").read_text())
    assert (newest["world_size"], newest["dp_group"], newest["zero_stage"]) == (1, 1, 1)


@pytest.mark.integration
def test_dp2_zero2_to_tp2_zero1_to_tp1(saved, corpus, tmp_path):
    straight, split = saved
    run = shutil.copytree(split, tmp_path / "run")
    tp2 = ["deepspeed.zero_stage=1", "parallel.tp=2"]
    _close(_resume(run, corpus, tp2, "torchrun", 2, exit_at=SPLIT + 1), straight, [SPLIT + 1])
    got = _resume(run, corpus, ["deepspeed.zero_stage=1"], "python", 1)  # TP=2 -> TP=1
    _close(got, straight, range(SPLIT + 1, STEPS + 1))


@pytest.mark.integration
def test_zero1_to_zero3_and_back(saved, corpus, tmp_path):
    """DP=2 ZeRO-1 -> one rank ZeRO-3 -> DP=2 ZeRO-1 (the ZeRO-3 loader's two slips, see
    compat/deepspeed_universal.restore_zero3_groups, moved the last loss by 3.5e-5 before)."""
    straight, _ = saved  # ZeRO-1 and ZeRO-2 runs have the same losses
    run = tmp_path / "z1"
    z1 = [*_base(corpus), "deepspeed.zero_stage=1"]
    train(run, [*z1, f"train.exit_at_step={SPLIT}"], "torchrun", 2, timeout=600)
    _close(losses(run), straight, range(1, SPLIT + 1))
    z3 = ["deepspeed.zero_stage=3"]
    _close(_resume(run, corpus, z3, "python", 1, exit_at=SPLIT + 1), straight, [SPLIT + 1])
    got = _resume(run, corpus, ["deepspeed.zero_stage=1"], "torchrun", 2)
    _close(got, straight, range(SPLIT + 1, STEPS + 1))


@pytest.mark.integration
def test_cp2_resumes_at_cp1(saved, corpus, tmp_path):
    straight, _ = saved  # a CP=2 run has the losses of the DP=2 one
    run = tmp_path / "cp"
    cp2 = [*_base(corpus), "deepspeed.zero_stage=2", "parallel.cp=2"]
    train(run, [*cp2, f"train.exit_at_step={SPLIT}"], "torchrun", 2, timeout=600)
    _close(losses(run), straight, range(1, SPLIT + 1))
    got = _resume(run, corpus, ["deepspeed.zero_stage=2"], "python", 1)
    _close(got, straight, range(SPLIT + 1, STEPS + 1))


@pytest.mark.integration
@pytest.mark.parametrize(
    "override,key",
    [
        ("model.hidden_size=32", "model.hidden_size"),
        ("deepspeed.zero_stage=0", "deepspeed.zero_stage"),
        ("train.precision=bf16", "train.precision"),
    ],
)
def test_a_resume_that_cannot_reshard_fails_in_preflight(saved, corpus, tmp_path, override, key):
    _, split = saved
    run = shutil.copytree(split, tmp_path / "run")
    proc = train(run, [*_base(corpus), override], "python", 1, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert key in proc.stderr and "train.init_from=" in proc.stderr
    assert "init_process_group" not in proc.stderr and "rank0" not in proc.stderr


def test_layout_compare_sorts_changes():
    def lay(world, tp=1, zero=2, **model):
        cfg = tiny_config("fope", 64, f"parallel.tp={tp}", f"deepspeed.zero_stage={zero}",
                          "train.micro_batch_size=1", *(f"model.{k}={v}" for k, v in model.items()))  # fmt: skip
        return layout.layout_of(cfg, world)

    reshard, refused = layout.compare(lay(4, tp=2), lay(1, tp=1, zero=1))
    assert {k for k, _, _ in reshard} == {"world_size", "dp", "dp_group", "tp", "zero_stage"}
    assert not refused and layout.needs_universal(reshard, 1)
    reshard, refused = layout.compare(lay(2, zero=0), lay(1, zero=0))
    assert not refused and reshard and not layout.needs_universal(reshard, 0)
    _, refused = layout.compare(lay(2, tp=2, zero=0), lay(2, tp=1, zero=0))
    assert [k for k, _, _ in refused] == ["tp"]
    reshard, refused = layout.compare(lay(2, zero=3), lay(1, zero=1))
    assert not refused and layout.needs_universal(reshard, 1)
    _, refused = layout.compare(lay(4, tp=2, zero=1), lay(2, tp=1, zero=3))
    assert [k for k, _, _ in refused] == ["tp"]
    # ZeRO-3 with tp > 1 on either side: no universal conversion (DeepSpeed's needs tp 1)
    _, refused = layout.compare(lay(4, tp=2, zero=3), lay(2, tp=2, zero=3))
    assert {k for k, _, _ in refused} == {"world_size", "dp", "dp_group"}
    _, refused = layout.compare(lay(2, tp=2, zero=2), lay(2, tp=2, zero=3))
    assert [k for k, _, _ in refused] == ["zero_stage"]
    _, refused = layout.compare(lay(2), lay(2, num_layers=3))
    assert [k for k, _, _ in refused] == ["model.num_layers"]


def test_check_names_keys_and_the_way_out(tmp_path):
    cfg = tiny_config("fope", 64, "deepspeed.zero_stage=2", "train.micro_batch_size=1")
    layout.write(cfg, 2, tmp_path)
    assert layout.check(cfg, 1, tmp_path)  # DP 2 -> 1: resharded
    other = tiny_config("fope", 64, "deepspeed.zero_stage=2", "train.micro_batch_size=1",
                        "fope.d_out=1")  # fmt: skip
    with pytest.raises(ConfigError, match=r"fope\.d_out: checkpoint \d+, now 1.*train\.init_from="):
        layout.check(other, 2, tmp_path)
