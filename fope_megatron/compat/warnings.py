"""Quiet command-line tools: the libraries' notices are hidden unless ``-v`` / ``--verbose``.

megatron-core 0.16.1 warns at import that Transformer Engine and Apex are not installed (on a CPU
machine they never are); transformers, huggingface_hub and datasets print notices and progress
bars. None of that is a tool's own output: every CLI calls :func:`quiet_known_warnings` at entry,
before megatron-core, DeepSpeed or transformers are imported, and :func:`add_verbose_flag` gives
it ``-v`` to show them again.
"""

from __future__ import annotations

import argparse
import os

LIBRARIES = (
    "megatron",
    "deepspeed",
    "transformer_engine",
    "apex",
    "transformers",
    "datasets",
    "torch",
    "triton",
)
"""Top-level packages whose Python warnings a quiet tool hides."""

KNOWN_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
    r"When using async grad allreduce.*",
    r".*torch.jit.script_method.*is deprecated.*",
    r"The following imports from `dynamic_context.py` will be removed.*",
)
"""megatron-core's notices that do not apply to a run, whichever module they are attributed to."""

QUIET_ENV = {  # each read when its library is imported or first logs
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' progress bars too ("Loading weights")
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
"""Library settings a quiet tool starts with; a value already in the environment wins."""


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``-v`` / ``--verbose``: show the libraries' warnings, notices and progress bars."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the libraries' warnings and notices (megatron-core, DeepSpeed, transformers)",
    )


def quiet_known_warnings(verbose: bool = False) -> None:
    """Hide the libraries' warnings and notices for the rest of this process (and the processes
    it starts), unless ``verbose``. A tool's own messages, errors and log lines still show.

    Call it at a CLI's entry, before megatron-core, DeepSpeed or transformers are imported.
    """
    if verbose:
        return
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
