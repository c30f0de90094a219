"""Host reads per optimizer step of real trainer runs (fope_megatron/testing/host_reads.py).

Each case trains 6 and 12 steps with nothing else happening in between (no log, evaluation or
save step: log_interval and save_interval beyond the run, the final save in both runs), so the
difference divided by 6 is what one optimizer step costs. Rank 0's count is asserted; the sites
are printed (``pytest -s``) to say where any read comes from.

The trainer's own reads per step before the one-read step (item/tolist/float of device values):
1 rank micro batch 8: 6; 8 micro-batches of 1: 20; 2 ranks ZeRO-2 4 micro-batches: 12 (5, 19 and
11 without ``float()``); now 1 in every case. DeepSpeed's ZeRO 1-2 optimizer adds its own
(overflow and clip checks, ``deepspeed/runtime/utils.py``: 3 per step under ZeRO-2).
"""

from __future__ import annotations

import pytest

from fope_megatron.testing import host_reads, launch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

QUIET = ["run.log_interval=100", "train.save_interval=100", "train.eval_interval=0"]
CASES = {
    # name: (launcher, ranks, overrides[, environment])
    "1rank-mb8": ("python", 1, ["train.micro_batch_size=8", "train.global_batch_size=8"]),
    "1rank-8x1": ("python", 1, ["train.micro_batch_size=1", "train.global_batch_size=8"]),
    "2ranks-zero2-4x1": (
        "torchrun", 2,
        ["train.micro_batch_size=1", "train.global_batch_size=8", "deepspeed.zero_stage=2"],
    ),
    "2ranks-zero0-2x2": (
        "torchrun", 2,
        ["train.micro_batch_size=2", "train.global_batch_size=8", "deepspeed.zero_stage=0"],
    ),
    "1rank-guard-skip-spike": (
        "python", 1,
        ["train.on_nonfinite=skip", "train.loss_spike=3", "train.loss_spike_window=2"],
    ),
    "2ranks-zero1-guard-skip-nan-at-9": (  # a skipped step among the 6 counted ones
        "torchrun", 2,
        ["deepspeed.zero_stage=1", "train.on_nonfinite=skip"], {"FOPE_FAULT_LOSS": "9:nan"},
    ),
    "2ranks-zero2-guard-stop-spike": (
        "torchrun", 2,
        ["deepspeed.zero_stage=2", "train.on_nonfinite=stop", "train.loss_spike=100"],
    ),
}  # fmt: skip
# the trainer's own reads per step; DeepSpeed's ZeRO 1-2 optimizer reads its overflow flag once
MAX_OWN = 1


def own_read(site: str) -> bool:
    """The trainer's reads: fope_megatron's, less the batches built from memory-mapped files
    (fope_megatron/data/, CPU tensors before their copy to the device: no sync on a GPU)."""
    return site.startswith("fope_megatron/") and not site.startswith("fope_megatron/data/")


def counted_run(tmp_path, name, steps, corpus):
    launcher, nproc, overrides, *fault = CASES[name]
    run_dir = tmp_path / f"{name}-{steps}"
    out = tmp_path / f"reads-{name}-{steps}"
    args = [f"data.path=[{corpus}]", f"train.steps={steps}", *QUIET, *overrides]
    launch.train(run_dir, args, launcher, nproc, module="fope_megatron.testing.host_reads",
                 extra_env={host_reads.OUT_ENV: str(out), **(fault[0] if fault else {})})  # fmt: skip
    assert len(launch.losses(run_dir)) == steps  # one record per step, none lost
    return host_reads.load(out)


@pytest.mark.parametrize("name", list(CASES))
def test_host_reads_per_step(name, corpus, tmp_path):
    short = counted_run(tmp_path, name, 6, corpus)
    long = counted_run(tmp_path, name, 12, corpus)
    diff = host_reads.per_step(short, long, 6)
    print(f"\n{name}: per optimizer step {diff}")
    own = {site: n for site, n in diff["host"].items() if own_read(site)}
    assert sum(own.values()) <= MAX_OWN, own
    # beside the gradient reduction, the trainer's collectives: one small all-reduce
    own = {site: n for site, n in diff["collective"].items() if own_read(site)}
    assert sum(own.values()) <= 1, own
