"""Known import-time warnings of megatron-core 0.16.1 (and its optional apex / TE imports)."""

from __future__ import annotations


def quiet_known_warnings() -> None:
    """Silence megatron-core's import-time notices that do not apply to a run (no apex / TE on a
    CPU machine, deprecations inside megatron itself); everything else still shows."""
    import warnings

    for pattern in (
        r".*Transformer Engine and Apex are not installed.*",
        r"Apex is not installed.*",
        r"full scope is deprecated.*",
        r"When using async grad allreduce.*",
        r".*torch.jit.script_method.*is deprecated.*",
        r"The following imports from `dynamic_context.py` will be removed.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
