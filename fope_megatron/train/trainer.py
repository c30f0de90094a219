"""The training loop: megatron-core GPT + DeepSpeed engine + GPTDataset, with exact resume."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..checkpoint import store as checkpoint
from ..config import Config
from ..parallel.setup import comm_device
from .data import build_data
from .engine import grad_norm
from .guard import NONFINITE_EXIT_CODE, Guard
from .metrics import MetricsLogger, Timer, flops_per_token, setup_logging
from .saving import CheckpointSteps
from .signals import REQUEUE_EXIT_CODE, StopSignal

log = logging.getLogger("fope")


class StepRead(NamedTuple):
    """What the host learns of one optimizer step, in its one read."""

    loss: float  # global-batch loss (token-weighted mean)
    grad_norm: float  # nan where the engine reports none
    stopping: bool  # a stop signal reached some rank
    writing: bool  # some rank's asynchronous save is still being written


class Trainer(CheckpointSteps):
    """Owns the engine, the data iterators, metrics and checkpoints of one run."""

    def __init__(self, cfg: Config) -> None:
        from ..model.builder import build_gpt, compute_dtype
        from ..parallel.mpu import MegatronMPU
        from ..parallel.setup import init_distributed, init_model_parallel
        from .engine import deepspeed_json, ensure_accelerator, initialize

        ensure_accelerator()
        self.cfg = cfg
        self.rank, self.world = init_distributed(cfg.dist.timeout_minutes)
        setup_logging(self.rank)
        self.dims = cfg.validate(self.world)
        p = cfg.parallel
        init_model_parallel(tp=p.tp, cp=p.cp, pp=p.pp, ulysses=p.ulysses, seed=cfg.run.seed)
        from megatron.core import parallel_state as ps

        from ..parallel.setup import sample_parallel_rank_and_size

        self.ps = ps
        # ranks that read distinct samples (CP and Ulysses ranks share a sample)
        self.dp_rank, self.dp = sample_parallel_rank_and_size()
        self.run_dir = Path(cfg.run.dir)
        bf16 = compute_dtype(cfg) == torch.bfloat16
        self.ds_config = deepspeed_json(cfg, self.dp, bf16, self.dims.dp_shard)
        # one checkpoint for all ranks, each checksumming its share of the files
        self.resume_from = checkpoint.agree_on_resume(cfg.train.resume, self.run_dir)
        self.load_tag = self._resume_layout()
        from ..model.builder import position_fusion

        self.fusion = position_fusion(cfg)
        fusion_note = (
            f"position.fusion: {cfg.position.fusion} -> {self.fusion} "
            f"({cfg.model.position_embedding}, {'cuda' if torch.cuda.is_available() else 'cpu'})"
        )
        log.info("%s", fusion_note)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.run_dir / "config.yaml", header=f"resolved at start: {fusion_note}")
            (self.run_dir / "deepspeed_config.json").write_text(
                json.dumps(self.ds_config, indent=2) + "\n"
            )
        dist.barrier()
        self.gas = self.ds_config["gradient_accumulation_steps"]
        self.model = build_gpt(cfg)
        if p.sp:
            from ..parallel.grads import register_sp_grad_hooks

            # before DeepSpeed's own gradient hooks: SP norm grads are summed over TP first
            register_sp_grad_hooks(self.model)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        from ..checkpoint.reshard import split_dims

        self.split_dims = split_dims(self.model)
        self.universal_info = None
        if cfg.deepspeed.zero_stage in (1, 2, 3):
            from ..checkpoint.universal import universal_info

            self.universal_info = universal_info(self.model)
        self.mpu = MegatronMPU()
        self.step = 0
        self.guard = Guard(cfg.train)
        self.consumed_samples = 0
        self.pending = None  # an asynchronous save not yet complete (checkpoint.Pending)
        self.save_clock = (0.0, 0.0)  # (when the save in flight started, seconds blocked)
        self.last_save_s = None
        self.metrics = None
        self.stop: StopSignal | None = None
        # the ranks of rank 0's data-parallel group count the step's loss and tokens in the world
        # all-reduce (the other tensor-parallel ranks hold the same numbers)
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.loss_weight = 1.0 if 0 in dist.get_process_group_ranks(dp_group) else 0.0
        if self.resume_from is None and cfg.train.init_from:
            # weights only, before DeepSpeed copies them into its optimizer partitions
            from ..checkpoint.extension import load_init_weights

            root, tag = checkpoint.agree_on_resume(cfg.train.init_from, self.run_dir)
            load_init_weights(self.model, cfg, root / tag)
            log.info("initialised weights from %s (fresh optimizer, step 0)", root / tag)
        self.engine, self.optimizer, self.scheduler = initialize(
            cfg, self.model, self.ds_config, self.mpu
        )
        self._restore()
        self._build_data()

    # ------------------------------------------------------------------ data
    def _build_data(self) -> None:
        self.train_ds, self.valid_ds, self.valid_long = build_data(
            self.cfg, self.run_dir, self.rank, self.dp
        )

    def _batches(self, dataset, consumed: int, limit: int | None = None):
        """This rank's micro-batches from ``consumed`` on, read ahead by ``data.num_workers``
        worker processes into pinned memory on CUDA (``data/loader.py``)."""
        from ..data.loader import BatchLoader

        return BatchLoader(
            dataset, consumed, self.cfg.train.micro_batch_size, self.dp_rank, self.dp,
            num_workers=self.cfg.data.num_workers, limit=limit,
        )  # fmt: skip

    # ------------------------------------------------------------------ steps
    def _forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean loss of one micro-batch and its (sum, token count) for exact logging."""
        device = next(model.parameters()).device
        tokens, labels, mask, pos = self._shard_sequence(batch)
        # pinned batches (data/loader.py): the copies overlap, nothing waits for them here
        tokens, pos, labels, mask = (
            t.to(device, non_blocking=True) for t in (tokens, pos, labels, mask)
        )
        losses = model(tokens, pos, None, labels=labels)
        total = (losses.float() * mask).sum()
        count = mask.sum()
        return total / count.clamp(min=1), total.detach(), count.detach()

    def _shard_sequence(self, batch):
        """This rank's part of each sample: CP chunks ``r`` and ``2cp-1-r``, or the Ulysses
        shard; labels were shifted before sharding, so each rank's loss is over its tokens."""
        p = self.cfg.parallel
        args = (batch["tokens"], batch["labels"])
        kw = dict(loss_mask=batch["loss_mask"], position_ids=batch["position_ids"])
        if p.cp > 1:
            from ..parallel.sequence import shard_batch_for_cp

            return shard_batch_for_cp(*args, self.ps.get_context_parallel_rank(), p.cp, **kw)
        if p.ulysses > 1:
            from ..parallel.sequence import shard_batch_for_ulysses
            from ..parallel.setup import get_ulysses_rank

            return shard_batch_for_ulysses(*args, get_ulysses_rank(), p.ulysses, **kw)
        return batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]

    def _reduce_dp(self, *values: torch.Tensor) -> list[float]:
        t = torch.stack([v.to(comm_device(), torch.float64) for v in values])
        dist.all_reduce(t, group=self.ps.get_data_parallel_group(with_context_parallel=True))
        return t.tolist()

    def _share(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The step's one small all-reduce (a sum over the world, nothing read back): the global
        loss sum and token count, the ranks a stop signal reached, the ranks still writing an
        asynchronous save. Every rank gets the same numbers, so takes the same decisions."""
        shared = torch.zeros(4, dtype=torch.float64, device=comm_device())
        shared[:2] = torch.stack([loss_sum, tokens]) * self.loss_weight
        if self.stop is not None and self.stop.signum is not None:
            shared[2] = 1.0  # a fill on the device: no copy from the host
        if self.pending is not None and not self.pending.written(self.engine):
            shared[3] = 1.0
        dist.all_reduce(shared)
        return shared

    def _read(self, shared: torch.Tensor, norm) -> StepRead:
        """The step's one blocking host read: what ``_share`` agreed on, and the grad norm."""
        if isinstance(norm, torch.Tensor):
            shared = torch.cat([shared, norm.detach().reshape(1).to(shared)])
        values = shared.tolist()
        if not isinstance(norm, torch.Tensor):
            values.append(float("nan") if norm is None else float(norm))
        loss_sum, tokens, stopping, writing, grad = values
        return StepRead(loss_sum / max(tokens, 1.0), grad, stopping > 0, writing > 0)

    def train_step(self, it) -> tuple[StepRead, str | None, bool]:
        """One optimizer step: ``(what the host read of it, why the guard objects or None,
        whether the engine dropped the update)``, with one blocking host read (``_read``: after
        the update under ZeRO 1-3, before it under ZeRO-0, whose non-finite grad norm makes the
        trainer drop the update). The global loss is agreed on before the last backward; under
        ``train.on_nonfinite=skip`` the guard's verdict poisons that backward on the device, so
        the engine drops a bad step before it reaches the optimizer."""
        self.engine.train()
        dev = comm_device()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        tokens = torch.zeros((), dtype=torch.float64, device=dev)
        read = shared = None
        skipped_before = self.engine.skipped_steps
        for micro in range(self.gas):
            batch = next(it)
            loss, total, count = self._forward(self.engine, batch)
            loss_sum += total.to(dev, torch.float64)
            tokens += count.to(dev, torch.float64)
            if micro == self.gas - 1:
                shared = self._share(loss_sum, tokens)
                if self.guard.poison:
                    # non-finite gradients make every engine drop the update (DeepSpeed's
                    # overflow skip under ZeRO 1-3, _drop_update under ZeRO-0)
                    bad = self.guard.device_bad(shared[0] / shared[1].clamp(min=1.0))
                    loss = loss * torch.where(bad, float("nan"), 1.0).to(loss)
            self.engine.backward(loss)
            dropping = False
            if (
                self.cfg.deepspeed.zero_stage == 0
                and self.engine.is_gradient_accumulation_boundary()
            ):
                # ZeRO-0 reports no norm itself
                read = self._read(shared, grad_norm(self.engine.module, self.mpu))
                dropping = not math.isfinite(read.grad_norm)
                if dropping:
                    self._drop_update()
            self.engine.step()
            if dropping:
                self.engine.optimizer.overflow = False
                # cleared where a DeepSpeed wrapper (bf16) dropped the step itself before ours
                self.scheduler.optimizer.skip_next_step = False
        if read is None:
            read = self._read(shared, self.engine.get_global_grad_norm())
        dropped = self.engine.skipped_steps > skipped_before
        return read, self.guard.before_update(read.loss), dropped

    def _drop_update(self) -> None:
        """ZeRO-0, for the coming ``engine.step()``: our optimizer skips that step
        (``engine.SkippableStep``; gradients zeroed so the engine's clipping stays finite) and
        ``optimizer.overflow``, the flag DeepSpeed's engine reads after a step, makes it count a
        skipped step and hold the lr."""
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        self.scheduler.optimizer.skip_next_step = True  # ours, inside the engine's
        self.engine.optimizer.overflow = True

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.engine.eval()
        out = {}
        sets = [(self.cfg.train.seq_length, self.valid_ds), *self.valid_long.items()]
        for length, ds in sets:
            if ds is None:
                continue
            loss_sum = torch.zeros((), dtype=torch.float64, device=comm_device())
            tokens = torch.zeros_like(loss_sum)
            for batch in self._batches(ds, 0, limit=max(1, self.cfg.train.eval_iters)):
                _, total, count = self._forward(self.engine, batch)
                loss_sum += total.to(loss_sum)
                tokens += count.to(tokens)
            loss_sum, tokens = self._reduce_dp(loss_sum, tokens)
            key = "val_loss" if length == self.cfg.train.seq_length else f"val_loss@{length}"
            out[key] = loss_sum / max(tokens, 1.0)
            out[key.replace("loss", "ppl")] = math.exp(min(out[key], 50.0))
        self.engine.train()
        return out

    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        self.stop = StopSignal()
        metrics = self.metrics = MetricsLogger(
            self.run_dir, self.rank, t.steps, self.step, cfg.run.tensorboard, wandb=cfg.run.wandb
        )
        fpt = flops_per_token(cfg)
        it = self._batches(self.train_ds, self.consumed_samples)
        timer = Timer()
        exit_code = 0
        try:
            while self.step < t.steps:
                lr = self.scheduler.get_last_lr()[0]
                read, reason, dropped = self.train_step(it)
                if self.pending is not None and not read.writing:
                    self.finish_save()  # every rank's writer is done
                loss, grad_norm = read.loss, read.grad_norm
                verdict = self.guard.after_update(reason, loss, grad_norm, dropped)
                self.step += 1
                self.consumed_samples += t.global_batch_size
                dt = timer.lap()
                record = {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": t.global_batch_size * t.seq_length / dt,
                    "consumed_samples": self.consumed_samples,
                    "step_time_s": dt,
                    "dp": self.dp,
                    "world_size": self.world,
                    "skipped": verdict.bad and not verdict.stop,
                    "skipped_total": self.guard.total_skipped,
                }
                console = self.step % cfg.run.log_interval == 0 or self.step == 1
                metrics.train_step(record, fpt, console or verdict.bad)
                if self.step % cfg.run.log_interval == 0:
                    metrics.flush()  # the batch to the writer thread; the step does not wait
                if verdict.stop:
                    # nothing of this step is saved: the last good checkpoint stays latest
                    exit_code = NONFINITE_EXIT_CODE
                    log.error("step %d: %s; stopping without saving", self.step, verdict.reason)
                    self.finish_save()  # an earlier step's asynchronous save is good
                    self._exit_status("nonfinite", exit_code, why=verdict.reason)
                    break
                if verdict.bad:
                    log.warning("step %d: %s; update dropped (%d in a row, %d in all)", self.step,
                                verdict.reason, self.guard.consecutive, self.guard.total_skipped)  # fmt: skip
                stopping = read.stopping  # before an evaluation: a stop saves at once
                evaluating = t.eval_interval and (
                    self.step % t.eval_interval == 0 or self.step == t.steps
                )
                if evaluating and not stopping:
                    val = self.evaluate()
                    metrics.write({"step": self.step, **val})
                    metrics.flush(wait=True)
                    log.info("step %d validation: %s", self.step, val)
                    timer.lap()
                at_exit = t.exit_at_step is not None and self.step >= t.exit_at_step
                done = self.step >= t.steps
                if stopping or at_exit or done:
                    self.save()
                    timer.lap()
                elif self.step % t.save_interval == 0:
                    self.save(asynchronous=t.async_save)
                    timer.lap()
                if stopping:
                    exit_code = REQUEUE_EXIT_CODE
                    self._exit_status("signal", exit_code)
                    break
                if at_exit and not done:
                    self._exit_status("exit_at_step", 0)
                    break
            else:
                self._exit_status("finished", 0)
        finally:
            it.close()  # the data workers
            metrics.close()
        return exit_code

    def _exit_status(self, reason: str, code: int, why: str | None = None) -> None:
        if self.rank == 0:
            status = {"reason": reason, "step": self.step, "exit_code": code}
            if why is not None:
                latest = checkpoint.find_latest(checkpoint.checkpoint_root(self.run_dir))
                status.update(detail=why, last_checkpoint=latest)
            (self.run_dir / "exit_status.json").write_text(json.dumps(status) + "\n")
            log.info("exit: %s", status)


def train(cfg: Config) -> int:
    """Run training for ``cfg`` in this process (one rank); returns the exit code."""
    trainer = Trainer(cfg)
    return trainer.run()


__all__ = ["Trainer", "train"]
