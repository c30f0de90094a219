"""Verification that does not grow with the world: at save the ranks share the checksums of the
manifest, at resume they share the checks and all agree on one checkpoint (a damaged newest one,
whose damaged file only one rank checksums, is skipped by every rank, each naming the file). Counted in bytes each rank reads, on real gloo ranks."""

import json
import zlib

from fope_megatron.checkpoint import manifest, store
from fope_megatron.testing.distributed import run_distributed

SIZES = [5000, 4000, 3000, 3000, 2000, 1000, 700, 300]


def _make_checkpoint(root, step):
    folder = root / store.tag_for(step)
    folder.mkdir(parents=True)
    for i, size in enumerate(SIZES):
        (folder / f"part_{i}.pt").write_bytes(bytes((i * 7 + j + step) % 251 for j in range(size)))
    return folder


def _counting_crc(counter):
    real = manifest.crc32

    def crc32(path):
        counter.append(path.stat().st_size)
        return real(path)

    return crc32


def _save_and_resume(rank, world, tmp):
    """Each rank: bytes read writing step 1's and step 2's manifests, then resuming (step 2
    damaged after it was written), and the checkpoint it resumes from."""
    from pathlib import Path

    import torch.distributed as dist

    root = Path(tmp) / "checkpoints"
    read = []
    manifest.crc32 = _counting_crc(read)  # this process's own function, to count its reads
    for step in (1, 2):
        if rank == 0:
            _make_checkpoint(root, step)
        dist.barrier()
        entries = store.checksum_shared(root / store.tag_for(step))
        if rank == 0:
            manifest.write(root / store.tag_for(step), entries)
            (root / store.tag_for(step) / store.MARKER).write_text("{}\n")
    saved = sum(read)
    dist.barrier()
    if rank == 0:  # one flipped byte in the newest checkpoint, same size
        part = root / "step_00000002" / "part_3.pt"
        data = bytearray(part.read_bytes())
        data[10] ^= 0xFF
        part.write_bytes(bytes(data))
    dist.barrier()
    read.clear()
    import logging

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("fope").addHandler(handler)
    found = store.agree_on_resume("auto", tmp)
    return saved, sum(read), found[1], "\n".join(warned)


def test_ranks_share_checksums_and_agree_on_the_checkpoint(tmp_path):
    world = 2
    results = run_distributed(_save_and_resume, world, str(tmp_path))
    total = sum(SIZES)
    for saved, resumed, tag, warned in results:
        assert tag == "step_00000001"  # every rank skips the damaged newest one
        assert "DAMAGED CHECKPOINT step_00000002" in warned and "part_3.pt" in warned, warned
        assert saved <= 2 * (total / world + max(SIZES))  # two checkpoints, a share of each
        assert resumed <= 2 * (total / world + max(SIZES))  # the damaged one, then the intact
    assert sum(r[0] for r in results) == 2 * total  # each file checksummed once
    for step in (1, 2):
        folder = tmp_path / "checkpoints" / store.tag_for(step)
        files = json.loads((folder / "manifest.json").read_text())["files"]
        assert sorted(files) == [f"part_{i}.pt" for i in range(len(SIZES))]
        if step == 1:  # the entries the ranks computed are the file's own CRC-32
            for name, entry in files.items():
                want = f"{zlib.crc32((folder / name).read_bytes()):08x}"
                assert entry == {"size": (folder / name).stat().st_size, "crc32": want}


def test_share_splits_bytes_evenly_for_any_world():
    files = {f"f{i}": 1000 + 37 * i for i in range(64)}
    total = sum(files.values())
    for world in (1, 2, 8, 64, 512):
        shares = [manifest.share(files, r, world) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(files)  # each file once
        assert max(sum(files[n] for n in s) for s in shares) <= total / world + max(files.values())
