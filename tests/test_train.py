"""The trainer end to end: real DeepSpeed engines under torchrun / the deepspeed launcher.

Losses of different layouts are compared step by step (5-6 steps, fp32 on CPU).
"""

import json
import signal
import subprocess
import time

import pytest
import torch

from fope_megatron.testing import faults, launch

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Straight runs shared by several tests, keyed by name."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(name, overrides, launcher="torchrun", nproc=2):
        if name not in cache:
            run_dir = root / name
            launch.train(
                run_dir,
                [f"data.path=[{corpus}]", f"train.steps={STEPS}", *overrides],
                launcher=launcher,
                nproc=nproc,
            )
            cache[name] = run_dir
        return cache[name]

    return get


def close(a: dict, b: dict, tol: float = 1e-5):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])


def test_zero_stages_dp2_agree_with_zero0_and_one_rank(runs):
    ref = launch.losses(runs("z0", ["deepspeed.zero_stage=0"]))
    assert len(ref) == STEPS and ref[STEPS] < ref[1]  # it learns
    single = launch.losses(runs("single", ["deepspeed.zero_stage=0"], "python", 1))
    close(single, ref)  # dp=2 x mbs 2 == dp=1 x mbs 2 x 2 micro-batches
    for stage in (1, 2, 3):
        close(launch.losses(runs(f"z{stage}", [f"deepspeed.zero_stage={stage}"])), ref)
    offload = runs("z3off", ["deepspeed.zero_stage=3", "deepspeed.offload=true"])
    close(launch.losses(offload), ref)  # configs/deepspeed/zero3_offload.json, DeepSpeedCPUAdam
    recs = launch.metrics(runs("z1", ["deepspeed.zero_stage=1"]))
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"} <= set(r)
    assert [r["consumed_samples"] for r in recs] == [4 * (i + 1) for i in range(STEPS)]
    grad0 = [r["grad_norm"] for r in launch.metrics(runs("z0", ["deepspeed.zero_stage=0"]))]
    grad1 = [r["grad_norm"] for r in recs]
    assert all(abs(a - b) < 1e-4 * max(1, a) for a, b in zip(grad0, grad1, strict=True))


def _eval_logits(rank, world, run_dir):
    from fope_megatron.checkpoint.full_state import load_model
    from fope_megatron.testing.models import random_batch

    model, _, _ = load_model(run_dir)
    tokens, _, pos = random_batch(64, 258)
    with torch.no_grad():
        return model(tokens, pos, None)


def test_checkpoints_of_every_stage_load_for_evaluation(runs):
    """The TP ranks' model files joined (ZeRO 0-2, TP=2) and zero_to_fp32 (ZeRO-3) give the same
    trained model."""
    from fope_megatron.testing.distributed import run_distributed

    ref = run_distributed(_eval_logits, 1, runs("z0", ["deepspeed.zero_stage=0"]))[0]
    for name, overrides in [
        ("z3", ["deepspeed.zero_stage=3"]),
        ("tp2", ["deepspeed.zero_stage=1", "parallel.tp=2"]),
    ]:
        got = run_distributed(_eval_logits, 1, runs(name, overrides))[0]
        assert (got - ref).abs().max().item() < 1e-4, name


def test_tp2_zero1_agrees_with_tp1(runs):
    tp1 = launch.losses(runs("single", ["deepspeed.zero_stage=0"], "python", 1))
    tp2 = runs("tp2", ["deepspeed.zero_stage=1", "parallel.tp=2"])
    close(launch.losses(tp2), tp1)
    ds = json.loads((tp2 / "deepspeed_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2


def test_deepspeed_launcher_trains_and_checkpoints(runs):
    run_dir = runs("dslauncher", ["deepspeed.zero_stage=2"], "deepspeed", 2)
    ref = launch.losses(runs("z0", ["deepspeed.zero_stage=0"]))
    close(launch.losses(run_dir), ref)
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (ckpt / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    assert json.loads((run_dir / "exit_status.json").read_text())["reason"] == "finished"


@pytest.mark.parametrize("stage", [1, 2])
def test_exact_resume_is_bitwise(runs, corpus, tmp_path, stage):
    straight = launch.losses(runs(f"z{stage}", [f"deepspeed.zero_stage={stage}"]))
    run_dir = tmp_path / "split"
    common = [f"data.path=[{corpus}]", f"train.steps={STEPS}", f"deepspeed.zero_stage={stage}"]
    launch.train(run_dir, [*common, "train.exit_at_step=3"], "torchrun", 2)
    first = launch.losses(run_dir)
    assert sorted(first) == [1, 2, 3]
    assert json.loads((run_dir / "exit_status.json").read_text())["reason"] == "exit_at_step"
    launch.train(run_dir, [*common, "train.resume=auto"], "torchrun", 2)
    recs = launch.metrics(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # resumed at 4, not 1
    assert recs[3]["consumed_samples"] == 16
    assert launch.losses(run_dir) == straight  # bitwise


def test_kill_during_save_keeps_previous_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "kill"
    common = [f"data.path=[{corpus}]", "train.steps=4", "train.save_interval=2"]
    kill = {"FOPE_FAULT_KILL_IN_SAVE": "4"}  # SIGKILL once step 4's files are written
    proc = launch.train(run_dir, common, extra_env=kill, check=False, module=faults.MODULE)
    assert proc.returncode == -signal.SIGKILL
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / "step_00000004").is_dir() and not (ckpt / "step_00000004" / "COMPLETE").exists()
    # the run resumes from the last good checkpoint and finishes
    launch.train(run_dir, [*common, "train.resume=auto"])
    steps = [r["step"] for r in launch.metrics(run_dir)]
    assert steps == [1, 2, 3, 4, 3, 4]
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert (ckpt / "step_00000004" / "COMPLETE").is_file()


def test_sigusr1_saves_and_exits_for_requeue(corpus, tmp_path):
    from fope_megatron.train.signals import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "sig"
    args = [*launch.TINY, f"run.dir={run_dir}", f"data.path=[{corpus}]", "train.steps=100000"]
    proc = subprocess.Popen(
        launch.command("python", 1, args), env=launch.env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["reason"] == "signal" and status["exit_code"] == REQUEUE_EXIT_CODE
    saved = status["step"]
    assert (run_dir / "checkpoints" / f"step_{saved:08d}" / "COMPLETE").is_file()
    # the requeued run continues with the next step
    launch.train(run_dir, [f"data.path=[{corpus}]", f"train.steps={saved + 2}"])
    steps = [r["step"] for r in launch.metrics(run_dir)]
    assert steps[saved:] == [saved + 1, saved + 2]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["train.stpes=3"], ["train.stpes", "steps"]),
        (["train.steps=abc"], ["train.steps", "abc"]),
        (["train.global_batch_size=6"], ["global_batch_size", "6", "micro_batch_size"]),
        (["parallel.tp=3"], ["tp", "3"]),
        (["parallel.tp=2", "deepspeed.zero_stage=3", "deepspeed.offload=true"], ["offload", "tp"]),
        (["model.vocab_size=100"], ["vocab_size", "100", "258"]),
        (["data.path=[/nonexistent/prefix]"], ["/nonexistent/prefix"]),
    ],
)
def test_config_errors_fail_before_process_groups(tmp_path, corpus, overrides, needles):
    # WORLD_SIZE=2 with no second rank: initialising a process group would hang, so a quick
    # exit 2 proves the check ran first.
    data = [] if any(o.startswith("data.path") for o in overrides) else [f"data.path=[{corpus}]"]
    run_dir = tmp_path / "bad"
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    t0 = time.time()
    proc = launch.train(run_dir, [*data, *overrides], extra_env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.time() - t0 < 60
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])
    assert not run_dir.exists()
