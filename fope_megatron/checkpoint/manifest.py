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


def write(folder: str | Path) -> dict:
    """Write ``folder/manifest.json`` (atomically) for every file now in ``folder``."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "crc32": crc32(p)}
        for p in _files(folder)
    }
    manifest = {"version": 1, "checksum": "crc32", "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def problems(folder: str | Path, checksums: bool = True) -> list[str]:
    """What is wrong with ``folder`` against its manifest (empty: intact). ``checksums=False``
    checks presence and sizes only (cheap). A folder without a manifest (written before
    manifests existed) is reported as unverifiable, not damaged: see ``verify``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return []
    try:
        listed = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return [f"{path}: unreadable manifest ({err})"]
    found = []
    for name, want in listed.items():
        file = folder / name
        if not file.is_file():
            found.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            found.append(f"{file}: {size} bytes, the manifest says {want['size']}")
        elif checksums and crc32(file) != want["crc32"]:
            found.append(f"{file}: CRC-32 {crc32(file)}, the manifest says {want['crc32']}")
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
