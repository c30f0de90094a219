"""Every parallel layout trains like one process: 5 DeepSpeed steps, losses within 1e-5.

Same seed and global batch (4 samples of 64 tokens) everywhere; fp32 on CPU over gloo.
"""

import pytest

from fope_megatron.testing import launch

pytestmark = pytest.mark.integration

STEPS = 5
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
    "cp2": ["parallel.cp=2"],
    "ulysses2": ["parallel.ulysses=2"],
    "tp2_zero3": ["parallel.tp=2", "deepspeed.zero_stage=3"],  # ZeRO-3 over the mpu's dp group
}


def run(tmp_path, corpus, name, overrides, launcher="torchrun", nproc=2):
    run_dir = tmp_path / name
    base = [f"data.path=[{corpus}]", f"train.steps={STEPS}", "deepspeed.zero_stage=1"]
    launch.train(run_dir, [*base, *overrides], launcher=launcher, nproc=nproc)
    return launch.metrics(run_dir)


def agree(ref, got, grad_norm: bool):
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        if grad_norm:
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"]), (
                a["step"], a["grad_norm"], b["grad_norm"],
            )  # fmt: skip


@pytest.mark.parametrize("kind", ["fope", "rope"])
def test_layouts_match_single_process(tmp_path, corpus, kind):
    pe = [f"model.position_embedding={kind}", "model.num_query_groups=2"]
    ref = run(tmp_path, corpus, "single", pe, "python", 1)
    assert ref[-1]["loss"] < ref[0]["loss"]
    for name, overrides in LAYOUTS.items():
        got = run(tmp_path, corpus, name, [*pe, *overrides])
        agree(ref, got, grad_norm=True)


@pytest.mark.slow
def test_tp2_dp2_zero1_and_zero3_on_four_processes(tmp_path, corpus):
    ref = run(tmp_path, corpus, "single", [], "python", 1)
    for stage in (1, 3):  # ZeRO-3 partitions each TP shard over its 2 data-parallel ranks
        overrides = ["parallel.tp=2", f"deepspeed.zero_stage={stage}"]
        got = run(tmp_path, corpus, f"tp2dp2_z{stage}", overrides, "torchrun", 4)
        agree(ref, got, grad_norm=True)
