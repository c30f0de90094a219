"""Saves through DeepSpeed's checkpoint-engine interface: a writer thread per rank that also
checksums what it wrote, and (``train.async_save``) a host snapshot so training goes on.

DeepSpeed hands every file of a save to its checkpoint engine (``save(state_dict, path)``). This
engine queues it for one writer thread (``torch.save``, ``fsync``, the CRC-32 of the bytes as
they are written), so each rank checksums the files it wrote and nothing else: the manifest
costs no read of the filesystem. With ``staging`` on, ``save`` first copies the state to host
memory (training goes on changing the live tensors) and returns: the write overlaps the
following steps. The host buffers are kept and reused by the next save (pinned on a GPU), so a
save costs one copy into memory already mapped, and the rank holds about its own checkpoint
bytes in host memory from the first asynchronous save on. The engine says it is *decoupled*, so DeepSpeed does not
commit at the end of ``save_checkpoint``, and it never offers a commit itself
(``get_commit_info`` is None): ``store.Pending.finish`` waits for the writer (``wait``) once
every rank's writer is idle (or at once, for a synchronous save), then writes the manifest,
``COMPLETE`` and ``latest``. A kill before that leaves the previous checkpoint ``latest``.

Loading goes to DeepSpeed's own engine (``TorchCheckpointEngine``) unchanged.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine


def snapshot(obj, memo: dict | None = None, reuse: list | None = None, made: list | None = None):
    """``obj`` with every tensor copied to host memory (one copy per tensor object, so tensors
    that are the same object stay shared). ``reuse``: the host buffers the previous snapshot of
    the same file made, in order, copied into where shape and dtype match (no allocation, no
    page faults: the steady-state cost is one memory copy); ``made`` collects this one's."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            made = [] if made is None else made
            old = reuse[len(made)] if reuse and len(made) < len(reuse) else None
            if old is None or old.shape != obj.shape or old.dtype != obj.dtype:
                pinned = obj.is_cuda  # pinned host memory: the copy overlaps, no bounce buffer
                old = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=pinned)
            memo[id(obj)] = old.copy_(obj.detach(), non_blocking=obj.is_cuda)
            made.append(old)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = snapshot(v, memo, reuse, made)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(snapshot(v, memo, reuse, made) for v in obj)
    return obj


class AsyncCheckpointEngine(CheckpointEngine):
    """A writer thread that checksums what it writes; ``staging``: snapshot, then return."""

    def __init__(self, inner: CheckpointEngine) -> None:
        super().__init__()
        self.name = "fope-writer"
        self.inner = inner
        self.staging = False
        self.written: dict[str, dict] = {}  # path -> {"size", "crc32"} of the files written
        self.bytes_staged = 0
        self._buffers: dict[str, list] = {}  # file name -> the host buffers of its last snapshot
        self._inflight: set[str] = set()  # file names queued or being written
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="fope-ckpt-writer", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                state, path = item
                with open(path, "wb") as f:
                    stream = _Checksummed(f)
                    torch.save(state, stream)  # the zip writer writes in order, never seeks
                    f.flush()
                    os.fsync(f.fileno())
                size = os.path.getsize(path)
                if size != stream.size:
                    raise OSError(f"{path}: {size} bytes on disk, {stream.size} written")
                self.written[path] = {"size": size, "crc32": f"{stream.crc:08x}"}
            except BaseException as err:  # raised by the next save or wait
                self._error = err
            finally:
                with self._lock:
                    self._pending -= 1
                    if item is not None:
                        self._inflight.discard(os.path.basename(item[1]))
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint write failed: {err!r}") from err

    def idle(self) -> bool:
        """Whether every queued file is written (and checksummed)."""
        return self._pending == 0

    def wait(self) -> dict[str, dict]:
        """Block until the writer is idle; returns (and forgets) what it wrote."""
        self._queue.join()
        self._raise()
        written, self.written = self.written, {}
        return written

    # DeepSpeed's interface
    def create(self, info) -> None:
        self._raise()

    def save(self, state_dict, path: str) -> None:
        self._raise()
        if self.staging:
            made, name = [], os.path.basename(path)
            with self._lock:  # never into buffers the writer is still writing from
                reuse = None if name in self._inflight else self._buffers.get(name)
            state_dict = snapshot(state_dict, reuse=reuse, made=made)
            self._buffers[name] = made
            if any(t.is_pinned() for t in made):
                torch.cuda.current_stream().synchronize()  # the copies are done before the write
            self.bytes_staged += sum(t.numel() * t.element_size() for t in _tensors(state_dict))
        with self._lock:
            self._pending += 1
            self._inflight.add(os.path.basename(path))
        self._queue.put((state_dict, path))

    def commit(self, info) -> bool:
        self.wait()
        return True

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def makedirs(self, path, exist_ok=False) -> None:
        self.inner.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank) -> bool:
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self) -> bool:
        return True  # DeepSpeed leaves the commit to us

    def get_commit_info(self):
        return None  # ... and never commits in engine.step(): store.Pending.finish does

    def cleanup(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Checksummed:
    """A write-only file that keeps the CRC-32 and the size of what went through it (the same
    CRC-32 as ``manifest.crc32`` of the file), so no file is read back to checksum it."""

    def __init__(self, f) -> None:
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
