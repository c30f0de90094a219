"""Stop signals: SIGTERM / SIGUSR1 make the loop save and exit with ``REQUEUE_EXIT_CODE``."""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 99
"""Exit code after a signal-triggered save: the job should be requeued (Slurm scripts use it)."""


class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; the loop saves at the end of the step where every rank has
    learnt it (the flag travels in the step's one all-reduce, ``Trainer._share``) and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum
