"""Non-finite and loss-spike guard: a bad step never reaches a saved optimizer state.

Checked twice per step, on values every rank agrees on (one all-reduce gives every rank the same
global loss):

* before the update (last micro-batch, before its backward): the global-batch loss is non-finite,
  or above ``train.loss_spike`` x the median of the last ``train.loss_spike_window`` good losses
  (``limit()``). Under ``skip`` this is decided on the device (``device_bad``) and poisons the
  last backward there, so the host waits for nothing before the update;
* after the update: the global gradient norm is non-finite.

The host learns the step's loss and gradient norm in the step's one read and takes the same
decision again (``before_update``, ``after_update``) for the verdict, the counts and the stop.

``train.on_nonfinite=stop`` (default) ends the run at the first bad step without saving it (the
last good checkpoint stays ``latest``; exit code ``NONFINITE_EXIT_CODE``, ``exit_status.json``
names the step). ``skip`` drops the update instead -- DeepSpeed's overflow path: a poisoned
gradient makes the ZeRO optimizers discard the step and leave the lr schedule where it was, and
the trainer does the same for ZeRO-0 -- counts it (``skipped`` / ``skipped_total`` in
metrics.jsonl) and stops after ``train.max_consecutive_skips`` skips in a row. A bad step whose
update the engine did not drop stops the run whatever the policy.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

NONFINITE_EXIT_CODE = 3
"""Exit code of a run stopped by the guard (a diverged run must not be requeued)."""


@dataclass
class Verdict:
    """What the guard decided about one step."""

    reason: str | None = None  # why the step is bad (None: good step)
    stop: bool = False  # end the run now, without saving this step

    @property
    def bad(self) -> bool:
        return self.reason is not None


class Guard:
    """Tracks the recent losses and the consecutive skips of one run (same state on every rank)."""

    def __init__(self, train_cfg) -> None:
        self.policy = train_cfg.on_nonfinite
        self.max_skips = train_cfg.max_consecutive_skips
        self.spike = train_cfg.loss_spike
        self.history: deque[float] = deque(maxlen=max(1, train_cfg.loss_spike_window))
        self.consecutive = 0
        self.total_skipped = 0

    def limit(self) -> float:
        """The loss above which a step is a spike (inf while the window fills, or check off)."""
        if self.spike and len(self.history) == self.history.maxlen:
            return self.spike * statistics.median(self.history)
        return math.inf

    def before_update(self, loss: float) -> str | None:
        """Why the update of a step with this global loss must not happen (None if it may)."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if loss > self.limit():
            median = statistics.median(self.history)
            return f"loss spike {loss:.4f} > {self.spike} x median {median:.4f}"
        return None

    def device_bad(self, loss):
        """``before_update`` on the device: a bool tensor, true where the update must not
        happen (same comparison, same float64 numbers, so the host's verdict agrees)."""
        import torch

        return ~torch.isfinite(loss) | (loss > self.limit())

    @property
    def poison(self) -> bool:
        """Skip policy: make the gradients non-finite so the engine drops the update."""
        return self.policy == "skip"

    def after_update(self, reason: str | None, loss: float, grad_norm: float, dropped: bool):
        """The step's verdict from the pre-update reason, the grad norm and whether the engine
        dropped the update."""
        if reason is None and not math.isfinite(grad_norm):
            reason = f"non-finite grad norm {grad_norm}"
        if reason is None:
            self.consecutive = 0
            self.history.append(loss)
            return Verdict()
        if self.policy == "stop":
            return Verdict(reason, stop=True)
        if not dropped:
            return Verdict(f"{reason}; the engine applied the update, so the run stops", stop=True)
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_skips:
            return Verdict(f"{reason}; {self.consecutive} consecutive skipped steps", stop=True)
        return Verdict(reason)

    def state(self) -> dict:
        return {"skipped_total": self.total_skipped, "recent_losses": list(self.history)}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.total_skipped = int(state.get("skipped_total", 0))
            self.history.extend(state.get("recent_losses", []))
