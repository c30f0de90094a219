"""Metrics: RUN_DIR/metrics.jsonl, one console line per interval, TensorBoard, a progress bar."""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("fope")

# Dense bf16 peak TFLOP/s (no sparsity) per GPU, by device-name fragment; the first fragment found
# in ``torch.cuda.get_device_name()`` wins, so the PCIe/NVL variants come before plain "H100".
DENSE_BF16_PEAK_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``device_name``, or None when it is not in the table."""
    for fragment, value in DENSE_BF16_PEAK_TFLOPS:
        if fragment in device_name:
            return value
    return None


def device_peak_tflops() -> float | None:
    """This process's GPU's dense bf16 peak, or None on CPU or an unknown GPU (no MFU then)."""
    if not torch.cuda.is_available():
        log.info("MFU: not reported on CPU (no dense bf16 peak to compare with)")
        return None
    name = torch.cuda.get_device_name()
    peak = peak_tflops_for(name)
    if peak is None:
        log.warning("MFU: no dense bf16 peak known for %r; MFU is not reported", name)
    else:
        log.info("MFU: against the dense bf16 peak of %s, %.0f TFLOP/s per GPU", name, peak)
    return peak


def flops_per_token(cfg) -> float:
    """Training FLOPs (forward and backward) per token of ``cfg``'s model, counted as Megatron-LM's
    ``num_floating_point_operations`` counts a dense GPT (docs/mfu.md).

    Every matmul costs 2 FLOPs per multiply-add in the forward pass and twice that in the
    backward (input and weight gradients): 6 per weight per token. The weights are the q/k/v
    (GQA: k and v have ``num_query_groups`` heads) and output projections, the MLP (SwiGLU: three
    ``h x ffn`` matrices, else two) and the output layer (``h x padded vocab``, tied or not); the
    input embedding is a lookup and not counted. Causal attention adds ``QK^T`` and ``AV`` over
    ``s / 2`` keys on average. Norms, softmax and the position encoding are not counted.
    """
    from ..model.vocab import padded_vocab_size

    m = cfg.model
    h, seq = m.hidden_size, cfg.train.seq_length
    q_width = m.num_attention_heads * m.head_dim
    kv_width = m.kv_groups * m.head_dim
    ffn = m.ffn_size
    projections = h * (q_width + 2 * kv_width) + q_width * h
    mlp = (3 if m.swiglu else 2) * h * ffn
    attention = 2 * q_width * seq / 2  # QK^T and AV, each over s/2 keys (causal)
    per_layer = projections + mlp + attention
    return 6.0 * (m.num_layers * per_layer + h * padded_vocab_size(cfg))


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[fope rank{rank}] %(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # megatron-core's dataset builder and DeepSpeed log every detail at INFO
    for name in ("megatron", "megatron.core", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops.

    Records are kept in memory and written in batches (``metrics.jsonl``, TensorBoard, W&B, the
    console line and the progress bar) by a writer thread: ``flush()`` at the log steps hands the
    batch over without waiting, ``flush(wait=True)`` (saves, evaluations, stops, exit) returns once
    every record is on disk, so a run killed later loses none before its last checkpoint.
    """

    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        progress: bool = True,
        wandb: bool = False,
    ) -> None:
        self.active = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        self.wandb = None
        self.batch: list[tuple[dict, bool]] = []  # (record, console line) not yet handed over
        self.queue: queue.Queue | None = None
        self.peak = device_peak_tflops()
        if not self.active:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception as e:  # tensorboard missing: keep training
                log.warning("TensorBoard disabled: %s", e)
        if wandb:
            try:
                import wandb as wb

                self.wandb = wb.init(dir=str(run_dir), name=Path(run_dir).name, resume="allow")
            except ImportError:
                log.warning("run.wandb=true but wandb is not installed: logging to W&B is off")
        if progress and os.environ.get("FOPE_NO_PROGRESS") != "1":
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, Slurm output files)
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", disable=None
            )
        self.queue = queue.Queue()
        self.writer = threading.Thread(target=self._writer, name="fope-metrics", daemon=True)
        self.writer.start()

    def write(self, record: dict, console: bool = False) -> None:
        """Keep ``record`` for the next flush."""
        if self.active:
            self.batch.append((record, console))

    def train_step(self, record: dict, flops_per_tok: float, console: bool) -> None:
        if not self.active:
            return
        # per GPU: tokens_per_s is the whole job's, spread over world_size GPUs
        tflops = record["tokens_per_s"] * flops_per_tok / 1e12 / record.get("world_size", 1)
        record["tflops"] = tflops
        record["mfu"] = tflops / self.peak if self.peak else None
        record["memory_gb"] = memory_gb()
        self.write(record, console)

    def flush(self, wait: bool = False) -> None:
        """Hand the kept records to the writer; ``wait``: until they are written."""
        if self.queue is None:
            return
        if self.batch:
            self.queue.put(self.batch)
            self.batch = []
        if wait:
            self.queue.join()

    def _writer(self) -> None:
        while True:
            batch = self.queue.get()
            try:
                if batch is None:
                    return
                self._write_batch(batch)
            except Exception as e:  # a full disk must not kill the run
                log.warning("metrics: could not write %d records: %s", len(batch), e)
            finally:
                self.queue.task_done()

    def _write_batch(self, batch: list[tuple[dict, bool]]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(record) + "\n" for record, _ in batch))
        for record, console in batch:
            step = record["step"]
            if self.tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and value is not None:
                        self.tb.add_scalar(key, value, step)
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
            if "loss" in record and "tflops" in record:
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if console:
                    self._console(record)

    def _console(self, record: dict) -> None:
        mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
        msg = (
            f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
            f"grad-norm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:.0f} | "
            f"TFLOP/s {record['tflops']:.3f} | MFU {mfu} | mem {record['memory_gb']:.2f} GiB"
        )
        use_bar = self.bar is not None and not self.bar.disable
        (self.bar.write if use_bar else log.info)(msg)

    def close(self) -> None:
        if self.queue is not None:
            self.flush(wait=True)
            self.queue.put(None)
            self.writer.join()
            self.queue = None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
