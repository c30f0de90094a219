"""Count the host reads and synchronizing calls of a real trainer process, from the test side.

``python -m fope_megatron.testing.host_reads [fope-train args]`` (also under torchrun) installs
the counters, then runs ``fope_megatron.train`` as ``__main__``; at exit each rank writes
``FOPE_HOST_READS_OUT/rank<R>.json``: ``{"host": {site: n}, "collective": {site: n}}``. The faults
of ``testing/faults.py`` its variables ask for are installed too. Production code never imports
this module.

Counted as host reads (the calls that make the host wait for the device on a GPU):
``Tensor.item``, ``tolist``, ``numpy``, ``cpu``, ``__bool__``, ``__float__``, ``__int__``,
``torch.cuda.synchronize`` and the collectives that return Python objects or block
(``all_gather_object``, ``broadcast_object_list``, ``barrier`` ...). Tensor collectives
(``all_reduce`` ...) are counted apart. A site is the first frame outside torch (``path:line``),
the file path cut to the package (``fope_megatron/train/trainer.py:360``). Left out: calls made
inside another counted call, and torch's optimizers reading their own CPU step counters (no
device sync on a GPU either).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import threading
from collections import Counter
from pathlib import Path

OUT_ENV = "FOPE_HOST_READS_OUT"
TENSOR_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
OBJECT_COLLECTIVES = (
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier",
)  # fmt: skip
TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
)  # fmt: skip
PACKAGES = ("fope_megatron", "deepspeed", "megatron", "torch")

counts: dict[str, Counter] = {"host": Counter(), "collective": Counter()}
_state = threading.local()


def _site() -> str | None:
    """``package/path.py:line`` of the first caller outside torch, or None for torch's
    optimizers (their CPU step counters)."""
    frame = sys._getframe(2)  # _site <- wrapper <- the caller
    here = __file__
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/optim/" in name:
            return None
        if name != here and "/torch/" not in name:
            return f"{_short(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _short(path: str) -> str:
    parts = Path(path).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in PACKAGES:
            return "/".join(parts[i:])
    return Path(path).name


def _counted(kind: str, fn):
    def wrapper(*args, **kwargs):
        if getattr(_state, "inside", False):
            return fn(*args, **kwargs)
        _state.inside = True
        try:
            site = _site()
            if site is not None:
                counts[kind][site] += 1
            return fn(*args, **kwargs)
        finally:
            _state.inside = False

    wrapper.__wrapped__ = fn
    return wrapper


def install() -> None:
    """Wrap the counted calls in this process."""
    import torch
    import torch.distributed as dist

    for name in TENSOR_READS:
        setattr(torch.Tensor, name, _counted("host", getattr(torch.Tensor, name)))
    torch.cuda.synchronize = _counted("host", torch.cuda.synchronize)
    for names, kind in ((OBJECT_COLLECTIVES, "host"), (TENSOR_COLLECTIVES, "collective")):
        for name in names:
            setattr(dist, name, _counted(kind, getattr(dist, name)))
    atexit.register(dump)


def dump() -> None:
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    rank = os.environ.get("RANK", "0")
    Path(out).mkdir(parents=True, exist_ok=True)
    data = {kind: dict(c) for kind, c in counts.items()}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(data, indent=1, sort_keys=True))


def load(out: str | Path, rank: int = 0) -> dict[str, Counter]:
    """One rank's counts written by a run under this module."""
    data = json.loads((Path(out) / f"rank{rank}.json").read_text())
    return {kind: Counter(c) for kind, c in data.items()}


def per_step(short: dict[str, Counter], long: dict[str, Counter], steps: int) -> dict:
    """``{kind: {site: reads per step}}`` from two runs ``steps`` optimizer steps apart (sites
    whose count does not grow with the steps left out)."""
    out = {}
    for kind in long:
        diff = long[kind].copy()
        diff.subtract(short.get(kind, Counter()))
        out[kind] = {site: n / steps for site, n in sorted(diff.items()) if n}
    return out


def main() -> None:
    from . import faults

    install()
    faults.install()
    sys.argv[0] = "fope-train"
    runpy.run_module("fope_megatron.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
