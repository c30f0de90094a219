"""DeepSpeed engine: the JSON actually used, AdamW param groups, the lr schedule, initialize()."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config
from ..parallel.setup import comm_device, ensure_accelerator
from .schedule import lr_at


def deepspeed_json(cfg: Config, dp: int, bf16: bool, dp_group: int | None = None) -> dict:
    """The DeepSpeed config of ``cfg``: its JSON with every ``"auto"`` filled in from our config.

    ``dp`` ranks read distinct samples; DeepSpeed's data-parallel group (``dp_group`` ranks, the
    mpu's: dp x cp x ulysses) averages gradients. DeepSpeed checks
    ``train_batch_size == micro * accumulation * dp_group``, so with CP or Ulysses its
    ``train_batch_size`` counts each shared sample once per sharing rank.
    """
    path = cfg.deepspeed_json()
    ds = json.loads(Path(path).read_text())
    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    fill = {
        "train_batch_size": t.micro_batch_size * gas * (dp_group or dp),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(t.clip_grad),
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(
                f'{path}: {key}={ds[key]!r} disagrees with the config\'s {value!r}; use "auto"'
            )
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        if isinstance(ds.get(section), dict) and ds[section].get("enabled", "auto") == "auto":
            ds[section]["enabled"] = enabled
    ds.setdefault("bf16", {"enabled": bf16})
    ds.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    ds["zero_allow_untested_optimizer"] = True
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices, none for norms, biases and FoPE coefficients."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen: never handed to the optimizer
        (no_decay if p.ndim < 2 or "fope." in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class SkippableStep:
    """Optimizer mixin: with ``skip_next_step`` set, the next ``step()`` changes nothing (no
    update, no optimizer state) and clears the flag. The trainer sets it to drop a ZeRO-0 update
    (``Trainer._drop_update``); DeepSpeed's bf16 wrappers call this step inside theirs, or drop a
    non-finite step themselves without calling it."""

    skip_next_step = False

    def step(self, *args, **kwargs):
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(*args, **kwargs)


def _skippable(cls: type) -> type:
    return type(cls.__name__, (SkippableStep, cls), {"__module__": cls.__module__})


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (DeepSpeed's CPU Adam under ``deepspeed.offload``) whose step can be skipped."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if cfg.deepspeed.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return _skippable(DeepSpeedCPUAdam)(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available():
        return _skippable(torch.optim.AdamW)(groups, fused=True, **kwargs)
    return _skippable(torch.optim.AdamW)(groups, foreach=False, **kwargs)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.steps) / t.lr,
    )


def initialize(cfg: Config, model: torch.nn.Module, ds_config: dict, mpu):
    """``deepspeed.initialize`` with our optimizer, schedule and megatron mpu adapter; the
    schedule's ``optimizer`` is ours (the engine's may be DeepSpeed's wrapper around it)."""
    ensure_accelerator()
    import deepspeed

    ours = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, ours)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=ours,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    from ..checkpoint.async_save import AsyncCheckpointEngine

    # our writer thread behind DeepSpeed's checkpoint-engine interface: it checksums what it
    # writes, and stages a host snapshot for train.async_save
    engine.checkpoint_engine = AsyncCheckpointEngine(engine.checkpoint_engine)
    return engine, optimizer, scheduler


def grad_norm(model: torch.nn.Module, mpu) -> torch.Tensor:
    """Global L2 gradient norm counting tensor-parallel shards once (DeepSpeed's and megatron's
    rule: TP-partitioned params on every TP rank, replicated ones on TP rank 0 only); a float64
    tensor on the device, nothing read back: one fp32 norm per gradient (no copy of it), their
    squares summed in float64."""
    import torch.distributed as dist

    tp_rank = mpu.get_model_parallel_rank()
    norms = [
        torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        for p in model.parameters()
        if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
    ]
    total = torch.zeros((), dtype=torch.float64, device=comm_device())
    if norms:
        total += torch.stack(norms).double().pow(2).sum().to(total.device)
    if mpu.get_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
    return total.sqrt()
