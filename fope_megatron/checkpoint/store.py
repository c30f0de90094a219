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
from dataclasses import dataclass
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


def _newest_first(root: Path) -> list[str]:
    latest = find_latest(root)
    return ([latest] if latest else []) + [t for t in reversed(complete_tags(root)) if t != latest]


def _first_intact(root: Path, order: list[str], damaged_in) -> str | None:
    """The first of ``order`` that ``damaged_in(tag)`` finds nothing wrong with; damaged newer
    ones are skipped with a loud warning naming their files.

    Raises:
        manifest.CheckpointDamaged: every one is damaged.
    """
    damaged = []
    for tag in order:
        bad = damaged_in(tag)
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


def newest_intact(root: Path, checksums: bool = True) -> str | None:
    """The newest complete checkpoint under ``root`` that matches its manifest (None if there is
    no complete one); ``checksums=False`` compares names and sizes only (no file is read).

    Raises:
        manifest.CheckpointDamaged: every complete checkpoint is damaged.
    """
    if checksums:
        return _first_intact(root, _newest_first(root), lambda t: manifest.damaged_files(root / t))
    check = lambda t: manifest.problems(root / t, checksums=False)  # noqa: E731
    return _first_intact(root, _newest_first(root), check)


def resolve_resume(
    resume: str, run_dir: str | Path, checksums: bool = True
) -> tuple[Path, str] | None:
    """``auto`` -> the newest intact checkpoint of ``run_dir`` (or None), ``none`` -> None,
    a path -> that checkpoint folder (``.../step_N``, verified, no fallback) or a checkpoints
    root / run dir (its newest intact checkpoint). ``checksums=False``: names and sizes only
    (preflight; the ranks then share the checksums, see ``agree_on_resume``)."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        tag = newest_intact(root, checksums)
        return (root, tag) if tag else None
    path = Path(resume)
    if (path / MARKER).is_file():
        if checksums:
            manifest.verify(path)
        elif bad := manifest.problems(path, checksums=False):
            raise manifest.CheckpointDamaged(f"checkpoint {path} is damaged: {'; '.join(bad)}")
        return path.parent, path.name
    if path.is_dir():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        tag = newest_intact(root, checksums)
        if tag:
            return root, tag
    raise FileNotFoundError(
        f"train.resume={resume!r}: no complete checkpoint there (a folder step_N holding "
        f"{MARKER}, a checkpoints/ folder, or a run dir)"
    )


def agree_on_resume(resume: str, run_dir: str | Path) -> tuple[Path, str] | None:
    """``resolve_resume`` for every rank at once (collective): rank 0 names the candidates
    (newest first, names and sizes matching their manifests), every rank checksums its share of
    each candidate's files (``manifest.share``: about ``1/world`` of the bytes) until one is
    intact on all ranks; every rank returns that same checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = [None]
    if rank == 0:
        try:
            found = resolve_resume(resume, run_dir, checksums=False)  # warns of damaged sizes
            pinned = found is not None and (Path(resume) / MARKER).is_file()
            if found is None or pinned:
                plan = [(found and found[0], found and [found[1]], pinned)]
            else:
                root = found[0]
                order = [t for t in _newest_first(root)
                         if not manifest.problems(root / t, checksums=False)]  # fmt: skip
                plan = [(root, order, False)]
        except (FileNotFoundError, manifest.CheckpointDamaged) as err:
            plan = [err]
    dist.broadcast_object_list(plan, src=0)
    if isinstance(plan[0], Exception):
        raise plan[0]
    root, order, pinned = plan[0]
    if root is None:
        return None

    def damaged_in(tag: str) -> list[str]:
        files = manifest.listed(root / tag) or {}
        mine = manifest.share({n: f["size"] for n, f in files.items()}, rank, world)
        bad = [None] * world
        dist.all_gather_object(bad, manifest.problems(root / tag, only=mine))
        return sorted(f for part in bad for f in part)

    if pinned:
        if bad := damaged_in(order[0]):
            raise manifest.CheckpointDamaged(
                f"checkpoint {root / order[0]} is damaged: {'; '.join(bad)}"
            )
        return root, order[0]
    tag = _first_intact(root, order, damaged_in)
    return (root, tag) if tag else None


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
    engine,
    run_dir: str | Path,
    step: int,
    client_state: dict,
    keep_last: int,
    extra=None,
    asynchronous: bool = False,
) -> Pending:
    """Save on every rank; rank 0 marks it complete, points ``latest`` at it, prunes old ones.

    ``extra(folder)``, if given, runs on every rank after DeepSpeed's save call and before the
    checkpoint is marked complete (the trainer writes its small records). ``asynchronous``: the
    engine's writer (``async_save.AsyncCheckpointEngine``) is still writing a host snapshot
    when this returns; :meth:`Pending.finish` completes it. Until then ``latest`` names the
    previous checkpoint, so a kill or crash meanwhile costs nothing but this one.
    """
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    writer = engine.checkpoint_engine
    if hasattr(writer, "staging"):
        writer.staging = asynchronous
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if extra is not None:
        extra(root / tag)
    pending = Pending(root, tag, step, keep_last)
    if not asynchronous:
        pending.finish(engine)
    return pending


@dataclass
class Pending:
    """A saved checkpoint not yet marked complete."""

    root: Path
    tag: str
    step: int
    keep_last: int

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @staticmethod
    def written(engine) -> bool:
        """Whether this rank's writer is done (always, for DeepSpeed's synchronous engines)."""
        idle = getattr(engine.checkpoint_engine, "idle", None)
        return idle is None or idle()

    def finish(self, engine) -> Path:
        """Wait for this rank's writer; the manifest from the checksums each rank took of the
        files it wrote (the rest, e.g. the trainer's records, shared out); rank 0 writes it,
        ``COMPLETE`` and ``latest`` and prunes. Collective."""
        wait = getattr(engine.checkpoint_engine, "wait", None)
        written = wait() if wait is not None else {}
        root, tag = self.root, self.tag
        dist.barrier()  # every rank's files are written
        entries = checksum_shared(root / tag, written)
        if dist.get_rank() == 0:
            manifest.write(root / tag, entries)
            _atomic_write(root / tag / MARKER, json.dumps({"step": self.step}) + "\n")
            _atomic_write(root / "latest", tag + "\n")
            if self.keep_last > 0:
                prune(root, self.keep_last)
        dist.barrier()
        return root / tag


def checksum_shared(folder: Path, written: dict | None = None) -> dict | None:
    """The manifest entries of ``folder``: what each rank's writer checksummed as it wrote
    (``written``, ``{path: entry}``), the other files checksummed by the ranks in shares
    (``manifest.share``). Rank 0 gets all of them, the others None. Collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {
        str(Path(p).relative_to(folder)): e
        for p, e in (written or {}).items()
        if Path(p).is_relative_to(folder)
    }
    known = [None] * world
    dist.all_gather_object(known, sorted(mine))
    listing = [manifest.sizes(folder) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    claimed = set().union(*known)
    rest = {n: s for n, s in listing[0].items() if n not in claimed}
    for name in manifest.share(rest, rank, world):
        mine[name] = {"size": rest[name], "crc32": manifest.crc32(folder / name)}
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if rank == 0 else None


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints older than the last ``keep_last``, never the newest one whose
    files match its manifest's names and sizes (a cheap check; resume verifies checksums)."""
    tags = complete_tags(root)
    intact = (t for t in reversed(tags) if not manifest.problems(root / t, checksums=False))
    keep = set(tags[-keep_last:]) | {next(intact, None)}
    for old in tags:
        if old not in keep:
            shutil.rmtree(root / old, ignore_errors=True)
    for made in root.glob("step_*_universal"):  # a universal copy goes with its checkpoint
        if made.name.removesuffix("_universal") not in keep:
            shutil.rmtree(made, ignore_errors=True)


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
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
        from ..compat.deepspeed_universal import restore_zero3_groups

        restore_zero3_groups(engine, Path(root) / tag)
    return client or {}
