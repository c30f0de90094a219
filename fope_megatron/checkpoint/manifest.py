"""Checkpoint manifests: every file's name, size and CRC-32, written before ``COMPLETE``.

``step_N/manifest.json`` lists each file of the checkpoint folder (DeepSpeed's, ``model_full.pt``,
``train_settings.json``, ...). Readers verify a checkpoint against it before they trust it:
resume (falling back to the newest intact checkpoint, see ``store.resolve_resume``),
``train.init_from``, ``fope-eval`` and the export. CRC-32 (zlib, streamed in 16 MiB blocks) is
the fast checksum: it catches truncation and flipped or zeroed blocks, which is what disks and
interrupted copies do; it is not a defence against deliberate tampering.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zlib
from pathlib import Path

log = logging.getLogger("fope")

MANIFEST = "manifest.json"
_SKIP = {MANIFEST, "COMPLETE"}
_BLOCK = 16 << 20


class CheckpointDamaged(ValueError):
    """A checkpoint's files do not match its manifest (names every damaged file)."""


def crc32(path: Path) -> str:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            value = zlib.crc32(block, value)
    return f"{value:08x}"


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in _SKIP and not p.name.endswith(".tmp")
    )


def sizes(folder: str | Path) -> dict[str, int]:
    """``{name: size}`` of every file now in ``folder`` (what a manifest lists)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.stat().st_size for p in _files(folder)}


def share(files: dict[str, int], rank: int, world: int) -> list[str]:
    """The names of ``files`` (``{name: size}``) rank ``rank`` of ``world`` checksums: largest
    first, each to the rank with the fewest bytes so far (the same answer on every rank), so a
    rank reads about ``1/world`` of the checkpoint, however large the world."""
    load = [0] * world
    mine = []
    for name in sorted(files, key=lambda n: (-files[n], n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += files[name]
        if owner == rank:
            mine.append(name)
    return mine


def write(folder: str | Path, entries: dict | None = None) -> dict:
    """Write ``folder/manifest.json`` (atomically): ``entries`` (``{name: {"size", "crc32"}}``,
    checksummed by the ranks, see ``store.save``) or every file now in ``folder``."""
    folder = Path(folder)
    files = entries if entries is not None else {
        name: {"size": size, "crc32": crc32(folder / name)} for name, size in sizes(folder).items()
    }  # fmt: skip
    manifest = {"version": 1, "checksum": "crc32", "files": dict(sorted(files.items()))}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def listed(folder: str | Path) -> dict | None:
    """The manifest's ``{name: {"size", "crc32"}}`` (None: no manifest; ValueError: unreadable)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["files"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None


def problems(
    folder: str | Path, checksums: bool = True, only: list[str] | None = None
) -> list[str]:
    """What is wrong with ``folder`` against its manifest (empty: intact). ``checksums=False``
    checks presence and sizes only (cheap); ``only`` checks those names of the manifest (one
    rank's share). A folder without a manifest (written before manifests existed) is reported
    as unverifiable, not damaged: see ``verify``."""
    folder = Path(folder)
    try:
        files = listed(folder)
    except ValueError as err:
        return [str(err)]
    if files is None:
        return []
    if only is not None:
        files = {name: files[name] for name in only if name in files}
    found = []
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            found.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            found.append(f"{file}: {size} bytes, the manifest says {want['size']}")
        elif checksums and (got := crc32(file)) != want["crc32"]:
            found.append(f"{file}: CRC-32 {got}, the manifest says {want['crc32']}")
    return found


@functools.lru_cache(maxsize=64)
def _cached(folder: str, stamp: tuple) -> tuple[str, ...]:
    return tuple(problems(folder))


def damaged_files(folder: str | Path) -> list[str]:
    """``problems`` with full checksums, computed once per process for an unchanged folder."""
    folder = Path(folder)
    stamp = tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
    ) if folder.is_dir() else ()  # fmt: skip
    return list(_cached(str(folder), stamp))


def verify(folder: str | Path) -> None:
    """Raise ``CheckpointDamaged`` naming every damaged file of ``folder``; warn once when the
    checkpoint has no manifest to verify against."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        log.warning("%s has no %s (written before manifests): not verified", folder, MANIFEST)
        return
    found = damaged_files(folder)
    if found:
        raise CheckpointDamaged(
            f"checkpoint {folder} is damaged: {'; '.join(found)}. Use another checkpoint "
            "(--checkpoint step_N) or restore these files"
        )
