"""Multi-rank test helper: spawn ``world_size`` processes on gloo, free port, rank-tagged logs.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in each rank with
``torch.distributed`` initialised (gloo on CPU) and returns the list of per-rank return values.
A failure in any rank raises with that rank's traceback and the tail of every rank's log.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ..parallel.setup import free_port


class _Array:
    """A tensor sent between processes as a numpy copy: torch's shared-memory tensors vanish when
    the sending rank exits, and ``queue.get`` then fails intermittently."""

    def __init__(self, t) -> None:
        self.dtype = str(t.dtype).removeprefix("torch.")
        t = t.detach().cpu()
        self.array = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()

    def tensor(self):
        return torch.from_numpy(self.array).to(getattr(torch, self.dtype))


def _pack(obj):
    if isinstance(obj, torch.Tensor):
        return _Array(obj)
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj):
    if isinstance(obj, _Array):
        return obj.tensor()
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


def _worker(rank, world_size, port, logdir, fn, args, queue):
    import sys

    import torch
    import torch.distributed as dist

    log = open(Path(logdir) / f"rank{rank}.log", "w", buffering=1)
    sys.stdout = sys.stderr = log
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, _pack(result)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
        log.close()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    ``fn`` must be importable (a module-level function) and its results picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fope-dist-") as logdir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, logdir, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout)
                (results if ok else errors)[rank] = payload
                if errors:
                    break
        except Exception as e:  # queue.Empty on timeout
            errors[-1] = f"timed out after {timeout}s: {e!r}"
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.terminate()
        if errors:
            logs = "\n".join(
                f"----- rank{r}.log (tail) -----\n"
                + (Path(logdir) / f"rank{r}.log").read_text(errors="replace")[-3000:]
                for r in range(world_size)
                if (Path(logdir) / f"rank{r}.log").exists()
            )
            first = min(errors)
            raise RuntimeError(f"rank {first} failed:\n{errors[first]}\n{logs}")
        return [_unpack(results[r]) for r in range(world_size)]
