"""Schedule and optimizer settings changed between a checkpoint and the run resuming from it.

Every checkpoint records the settings below in ``train_settings.json``. On resume they are
compared with the config; ``train.resume_changes`` decides (modelled on Megatron-LM, whose
default refuses a mismatch unless ``--override-opt_param-scheduler`` takes the new values or
``--use-checkpoint-opt_param-scheduler`` keeps the saved ones):

* ``apply`` (default): the config wins. Each change is logged ``old -> new`` and applied to the
  restored optimizer and schedule (peak lr, min lr, warmup and total steps reshape the schedule
  at the current step; AdamW betas and weight decay go into the parameter groups; gradient
  clipping comes from the DeepSpeed config built from this run's config).
* ``refuse``: a ``ConfigError`` naming every changed key, before any process group starts;
  resume with the checkpoint's values or set ``train.resume_changes=apply``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config, ConfigError

log = logging.getLogger("fope")

SETTINGS_FILE = "train_settings.json"
KEYS = ("lr", "min_lr", "warmup_steps", "steps", "weight_decay", "adam_beta1", "adam_beta2",
        "clip_grad")  # fmt: skip


def settings_of(cfg: Config) -> dict:
    return {key: getattr(cfg.train, key) for key in KEYS}


def write_settings(cfg: Config, folder: Path) -> None:
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings_of(cfg), indent=1) + "\n")


def changes(cfg: Config, folder: Path) -> list[tuple[str, object, object]]:
    """``(key, saved, configured)`` for every setting that differs from the checkpoint's."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        log.warning("%s has no %s: changed lr/schedule settings cannot be detected", folder,
                    SETTINGS_FILE)  # fmt: skip
        return []
    saved = json.loads(path.read_text())
    now = settings_of(cfg)
    return [(k, saved[k], now[k]) for k in KEYS if k in saved and saved[k] != now[k]]


def check(cfg: Config, folder: Path) -> list[tuple[str, object, object]]:
    """The changes against checkpoint ``folder``; ConfigError under ``train.resume_changes=refuse``."""
    found = changes(cfg, folder)
    if found and cfg.train.resume_changes == "refuse":
        listed = ", ".join(
            f"train.{k}: checkpoint {old!r}, config {new!r}" for k, old, new in found
        )
        raise ConfigError(
            f"resuming from {folder} with changed settings ({listed}) and "
            "train.resume_changes=refuse; set them back to the checkpoint's values or set "
            "train.resume_changes=apply to take the config's"
        )
    return found


def apply(cfg: Config, scheduler, found: list[tuple[str, object, object]]) -> None:
    """Put the config's values into the restored schedule and optimizer groups; log each change."""
    for key, old, new in found:
        log.warning("resume: train.%s changed %r -> %r (applied: train.resume_changes=apply)", key,
                    old, new)  # fmt: skip
    t = cfg.train
    groups = scheduler.optimizer.param_groups
    # the restored LambdaLR keeps the saved peak lr as base_lrs; its lambda already uses this
    # config's warmup/steps/min_lr, so resetting the base reshapes the whole schedule
    scheduler.base_lrs = [t.lr for _ in groups]
    lambdas = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    for i, (group, (base, fn)) in enumerate(zip(groups, lambdas, strict=True)):
        group["lr"] = base * fn(scheduler.last_epoch)
        group["betas"] = (t.adam_beta1, t.adam_beta2)
        if i == 0:  # engine.param_groups: the decay group first, the no-decay group stays at 0
            group["weight_decay"] = t.weight_decay
    scheduler._last_lr = [group["lr"] for group in groups]
