"""Checkpoints: DeepSpeed engine state per step, made "latest" only once complete.

Layout: ``RUN_DIR/checkpoints/step_00000100/`` (DeepSpeed's files plus ``COMPLETE``) and
``RUN_DIR/checkpoints/latest`` (the tag, replaced atomically). A kill at any moment of a save
leaves ``latest`` naming the previous complete checkpoint; incomplete folders are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch.distributed as dist

from . import manifest

log = logging.getLogger("fope")
MARKER = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(tags)


def find_latest(root: Path) -> str | None:
    """The tag named by ``latest`` if complete, else the newest complete tag, else None."""
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / MARKER).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def newest_intact(root: Path) -> str | None:
    """The newest complete checkpoint under ``root`` that matches its manifest (None if there is
    no complete one). Damaged newer ones are skipped with a loud warning naming their files.

    Raises:
        manifest.CheckpointDamaged: every complete checkpoint is damaged.
    """
    latest = find_latest(root)
    order = ([latest] if latest else []) + [t for t in reversed(complete_tags(root)) if t != latest]
    damaged = []
    for tag in order:
        bad = manifest.damaged_files(root / tag)
        if not bad:
            if damaged:
                listed = "\n  ".join(f for _, files in damaged for f in files)
                log.warning(
                    "!!! DAMAGED CHECKPOINT%s %s skipped; using %s, the newest intact one.\n  %s",
                    "S" if len(damaged) > 1 else "", ", ".join(t for t, _ in damaged),
                    root / tag, listed,
                )  # fmt: skip
            return tag
        damaged.append((tag, bad))
    if damaged:
        listed = "; ".join(f for _, files in damaged for f in files)
        raise manifest.CheckpointDamaged(f"every checkpoint in {root} is damaged: {listed}")
    return None


def resolve_resume(resume: str, run_dir: str | Path) -> tuple[Path, str] | None:
    """``auto`` -> the newest intact checkpoint of ``run_dir`` (or None), ``none`` -> None,
    a path -> that checkpoint folder (``.../step_N``, verified, no fallback) or a checkpoints
    root / run dir (its newest intact checkpoint)."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        tag = newest_intact(root)
        return (root, tag) if tag else None
    path = Path(resume)
    if (path / MARKER).is_file():
        manifest.verify(path)
        return path.parent, path.name
    if path.is_dir():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        tag = newest_intact(root)
        if tag:
            return root, tag
    raise FileNotFoundError(
        f"train.resume={resume!r}: no complete checkpoint there (a folder step_N holding "
        f"{MARKER}, a checkpoints/ folder, or a run dir)"
    )


def resolve_checkpoint(run_dir: str | Path, checkpoint: str = "latest") -> Path:
    """The complete checkpoint folder ``checkpoint`` names in ``run_dir``.

    ``checkpoint``: ``latest``, a tag (``step_00000100``, ``step_100``), or a path to a
    checkpoint folder, a checkpoints root or a run dir. Raises FileNotFoundError naming the input,
    ``manifest.CheckpointDamaged`` naming the damaged files of a named checkpoint (no fallback:
    evaluation and export must not silently use another one).
    """
    root = checkpoint_root(run_dir)
    if checkpoint in ("latest", "auto"):
        tag = find_latest(root)
        if tag is None:
            raise FileNotFoundError(
                f"no complete checkpoint in {root} (a step_N folder holding {MARKER})"
            )
        manifest.verify(root / tag)
        return root / tag
    found = re.fullmatch(r"step_(\d+)", checkpoint)
    if found and not Path(checkpoint).exists():
        tag = tag_for(int(found.group(1)))
        if (root / tag / MARKER).is_file():
            manifest.verify(root / tag)
            return root / tag
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r}: {root / tag} is not a complete checkpoint; complete "
            f"ones: {', '.join(complete_tags(root)) or 'none'}"
        )
    try:
        found_root, tag = resolve_resume(checkpoint, run_dir)
    except (FileNotFoundError, TypeError):
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r}: not 'latest', a step_N tag of {root} (complete ones: "
            f"{', '.join(complete_tags(root)) or 'none'}) or a checkpoint folder"
        ) from None
    return found_root / tag


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine, run_dir: str | Path, step: int, client_state: dict, keep_last: int, extra=None
) -> Path:
    """Save on every rank; rank 0 marks it complete, points ``latest`` at it, prunes old ones.

    ``extra(folder)``, if given, runs on every rank after DeepSpeed's files are written and before
    the checkpoint is marked complete (the trainer writes the full, layout-free model state).
    """
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if extra is not None:
        extra(root / tag)
    if os.environ.get("FOPE_FAULT_KILL_IN_SAVE") == str(step):
        # Fault injection for tests: a real SIGKILL after DeepSpeed wrote its files, before the
        # checkpoint is marked complete (the worst moment for a kill).
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if dist.get_rank() == 0:
        manifest.write(root / tag)  # every rank's files are written: the barrier above
        _atomic_write(root / tag / MARKER, json.dumps({"step": step}) + "\n")
        _atomic_write(root / "latest", tag + "\n")
        if keep_last > 0:
            prune(root, keep_last)
    dist.barrier()
    return root / tag


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints older than the last ``keep_last``, never the newest one whose
    files match its manifest's names and sizes (a cheap check; resume verifies checksums)."""
    tags = complete_tags(root)
    intact = (t for t in reversed(tags) if not manifest.problems(root / t, checksums=False))
    keep = set(tags[-keep_last:]) | {next(intact, None)}
    for old in tags:
        if old not in keep:
            shutil.rmtree(root / old, ignore_errors=True)


def load(engine, root: Path, tag: str, module_only: bool = False) -> dict:
    """Load a checkpoint into ``engine``; returns its client state."""
    path, client = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_module_only=module_only,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {root / tag}")
    return client or {}
