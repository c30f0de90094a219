"""Fault injection into a real trainer process, from the test side.

``python -m fope_megatron.testing.faults [fope-train args]`` (also under torchrun or the deepspeed
launcher: ``launch.train(..., module="fope_megatron.testing.faults")``) reads the variables below,
wraps the trainer's and the checkpoint store's functions accordingly, then runs
``fope_megatron.train`` as ``__main__``. ``testing/host_reads.py`` installs the same faults.
Production code never imports this module and reads none of these variables.

``FOPE_FAULT_LOSS="5:nan,7:10"``
    Rank 0's loss of optimizer step 5 made NaN, of step 7 times 10: every micro-batch's loss (the
    one it back-propagates and the sum it logs) scaled after ``Trainer._forward`` inside
    ``Trainer.train_step``; evaluation is left alone.
``FOPE_FAULT_KILL_IN_SAVE="4"``
    A real SIGKILL of the process (every rank) in step 4's save, after DeepSpeed's save call and
    before the checkpoint is marked complete (the worst moment for a kill): an asynchronous save
    with its background writes in flight (after ``store.save`` returns), a synchronous one once
    its files are written (at the start of ``store.Pending.finish``).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

MODULE = "fope_megatron.testing.faults"  # launch.train(..., module=MODULE)
LOSS_ENV = "FOPE_FAULT_LOSS"
KILL_ENV = "FOPE_FAULT_KILL_IN_SAVE"

_loss_factor: float | None = None  # the running step's factor (rank 0), while it runs


def loss_factors(spec: str) -> dict[int, float]:
    """``{step: factor}`` of a ``FOPE_FAULT_LOSS`` value (``"5:nan,7:10"``)."""
    items = (x.split(":") for x in spec.split(",") if x.strip())
    return {int(step): float(factor) for step, factor in items}


def install_loss(factors: dict[int, float]) -> None:
    """Scale rank 0's training loss at the steps of ``factors``."""
    from fope_megatron.train.trainer import Trainer

    train_step, forward = Trainer.train_step, Trainer._forward

    def faulty_train_step(self, it):
        global _loss_factor
        _loss_factor = factors.get(self.step + 1) if self.rank == 0 else None
        try:
            return train_step(self, it)
        finally:
            _loss_factor = None

    def faulty_forward(self, model, batch):
        loss, total, count = forward(self, model, batch)
        if _loss_factor is not None:
            loss, total = loss * _loss_factor, total * _loss_factor
        return loss, total, count

    Trainer.train_step, Trainer._forward = faulty_train_step, faulty_forward


def install_kill_in_save(step: int) -> None:
    """SIGKILL this process in step ``step``'s save (see the module's docstring)."""
    from fope_megatron.checkpoint import store

    save, finish = store.save, store.Pending.finish

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def faulty_save(engine, run_dir, at, client_state, keep_last, extra=None, asynchronous=False):
        pending = save(engine, run_dir, at, client_state, keep_last, extra, asynchronous)
        if asynchronous and at == step:
            kill()  # the writes in flight
        return pending

    def faulty_finish(self, engine):
        writer = engine.checkpoint_engine
        if self.step == step and not getattr(writer, "staging", False):
            wait = getattr(writer, "wait", None)
            if wait is not None:
                wait()  # a synchronous save's files written
            kill()
        return finish(self, engine)

    store.save, store.Pending.finish = faulty_save, faulty_finish


def install() -> None:
    """The faults the environment asks for, in this process (none: nothing changes)."""
    if os.environ.get(LOSS_ENV):
        install_loss(loss_factors(os.environ[LOSS_ENV]))
    if os.environ.get(KILL_ENV):
        install_kill_in_save(int(os.environ[KILL_ENV]))


def main() -> None:
    install()
    sys.argv[0] = "fope-train"
    runpy.run_module("fope_megatron.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
