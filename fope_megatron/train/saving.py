"""The trainer's checkpoint steps: which tag a resume loads (the universal checkpoint after a
layout change), restoring the step, data position and guard, and saving (synchronous or
asynchronous, with ``layout.json`` and ``train_settings.json`` beside DeepSpeed's files)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..checkpoint import store as checkpoint
from . import resume

log = logging.getLogger("fope")


class CheckpointSteps:
    """The ``Trainer``'s checkpoint methods (a mixin: they use the trainer's ``cfg``, ``engine``,
    ``scheduler``, ``guard``, ``metrics``, ``run_dir``, ``rank``, ``world``, ``step``,
    ``consumed_samples``, ``resume_from``, ``load_tag``, ``ds_config``, ``split_dims``,
    ``universal_info`` and the save state ``pending``, ``save_clock``, ``last_save_s``)."""

    def _resume_layout(self) -> str | None:
        """The tag the engine loads: the checkpoint's, or (a resume on another layout under
        ZeRO 1-3) its universal checkpoint, made by all ranks if it is not there yet; the engine's
        config then says ``checkpoint.load_universal``."""
        if self.resume_from is None:
            return None
        from ..checkpoint import layout, universal

        root, tag = self.resume_from
        reshard = layout.check(self.cfg, self.world, root / tag)
        if not layout.needs_universal(reshard, self.cfg.deepspeed.zero_stage):
            return tag
        universal.convert(root / tag)  # collective: each rank its share
        self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return universal.folder_for(root / tag).name

    def _restore(self) -> None:
        if self.resume_from is not None:
            root, tag = self.resume_from
            client = checkpoint.load(self.engine, root, self.load_tag)
            self.step = int(client["step"])
            self.consumed_samples = int(client["consumed_samples"])
            self.guard.load_state(client.get("guard"))
            log.info("resumed from %s at step %d", root / tag, self.step)
            changed = resume.check(self.cfg, root / tag)
            if changed:
                resume.apply(self.cfg, self.scheduler, changed)

    def save(self, asynchronous: bool = False) -> Path:
        """Save a checkpoint at this step; ``asynchronous``: completed later (``finish_save``).
        Each save adds ``save_blocked_s`` (the loop waited) and ``save_total_s`` (until it was
        complete) to ``metrics.jsonl``; the records kept so far are written first."""
        self.finish_save()  # at most one save in flight
        if self.metrics is not None:
            self.metrics.flush(wait=True)
        start = time.perf_counter()
        client = {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "guard": self.guard.state(),
        }
        if self.universal_info is not None:  # how a resume on another layout merges over TP
            client["universal_checkpoint_info"] = self.universal_info
        pending = checkpoint.save(
            self.engine, self.run_dir, self.step, client, self.cfg.train.keep_last,
            extra=self._save_extras, asynchronous=asynchronous,
        )  # fmt: skip
        self.pending = pending
        self.save_clock = (start, time.perf_counter() - start)
        if asynchronous:
            log.info("saving checkpoint %s (asynchronous)", pending.path)
        else:
            self.finish_save()
        return pending.path

    def finish_save(self) -> None:
        """Complete the save in flight (the loop calls it once every rank's writer is done, as
        the step's read says, so all of them complete it at the same step)."""
        if self.pending is None:
            return
        start, blocked = self.save_clock
        now = time.perf_counter()
        path = self.pending.finish(self.engine)
        self.pending = None
        blocked += time.perf_counter() - now
        total = time.perf_counter() - start
        self.last_save_s = total
        log.info("saved checkpoint %s (%.2f s, the loop waited %.2f s)", path, total, blocked)
        if self.metrics is not None:
            self.metrics.write({"step": self.step, "save": path.name, "save_blocked_s": blocked,
                                "save_total_s": total})  # fmt: skip
            self.metrics.flush()

    def _save_extras(self, folder: Path) -> None:
        """Beside DeepSpeed's files, from rank 0 (nothing gathered): the schedule and optimizer
        settings (``train_settings.json``) and the layout (``layout.json``, with the model's TP
        split dims that evaluation and export join the TP ranks' model files by) a resume
        compares its config with."""
        if self.rank == 0:
            from ..checkpoint import layout

            resume.write_settings(self.cfg, folder)
            layout.write(self.cfg, self.world, folder, self.split_dims)
