"""FoPEConfig: every knob of Fourier Position Embedding, validated at construction.

The numbers these settings produce are fixed by ``shared/FOPE_SPEC.md`` (sections 1-3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


class FoPEConfigError(ValueError):
    """An impossible FoPE setting; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class FoPEConfig:
    head_dim: int
    """Attention head dimension ``d``."""
    train_seq_len: int
    """Training context length ``L`` the floor is computed from (a property of the trained model)."""
    num_attention_heads: int
    """Query heads ``H``."""
    num_layers: int
    """Transformer layers; every layer has its own coefficients unless shared_across_layers."""
    num_query_groups: int | None = None
    """KV groups ``G`` (None: MHA, G = H)."""
    rotary_percent: float = 1.0
    """Fraction of the head dim that is rotated; ``d_r = int(d * rotary_percent)`` must be even."""
    rotary_base: float = 10000.0
    """RoPE base ``theta``."""
    floor_ratio: float = 1.0
    """``rho``: frequencies below ``rho * 2*pi / L`` become zero-frequency (0 disables the floor)."""
    sigma: float = 0.3
    """Xavier-normal gain of the random Fourier coefficients (0: identity coefficients)."""
    seed: int = 1234
    """Coefficient seed; layer ``l`` draws from a generator seeded by ``(seed, l)`` alone."""
    learnable: bool = False
    """Train the coefficients (the reference keeps them frozen)."""
    zero_freq_sin: float = 1.0
    """Value of the sin table in zero-frequency pairs: 1.0 as the reference, 0.0 as some ports."""
    d_out: int | None = None
    """Number of output frequency pairs; None: ``min(D_in, d_r // 4)`` (reference default)."""
    interleaved: bool = False
    """Pairs are ``(2j, 2j+1)`` instead of ``(j, j + d_r/2)`` (megatron-core default: False)."""
    shared_across_layers: bool = False
    """One coefficient set for all layers (xtuner-style variant)."""

    def __post_init__(self) -> None:
        def bad(field: str, value, allowed: str) -> FoPEConfigError:
            return FoPEConfigError(f"FoPEConfig.{field}={value!r} is invalid: {allowed}")

        for field in ("head_dim", "train_seq_len", "num_attention_heads", "num_layers"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(field, v, "must be a positive integer")
        if not (0.0 < self.rotary_percent <= 1.0):
            raise bad("rotary_percent", self.rotary_percent, "must be in (0, 1]")
        d_r = int(self.head_dim * self.rotary_percent)
        if d_r < 2 or d_r % 2:
            raise bad(
                "rotary_percent",
                self.rotary_percent,
                f"head_dim * rotary_percent = {self.head_dim} * {self.rotary_percent} = {d_r} "
                "must be an even number >= 2",
            )
        if not (self.rotary_base > 1.0 and math.isfinite(self.rotary_base)):
            raise bad("rotary_base", self.rotary_base, "must be a finite number > 1")
        if not (self.floor_ratio >= 0.0 and math.isfinite(self.floor_ratio)):
            raise bad("floor_ratio", self.floor_ratio, "must be a finite number >= 0")
        if not (self.sigma >= 0.0 and math.isfinite(self.sigma)):
            raise bad("sigma", self.sigma, "must be a finite number >= 0")
        if self.zero_freq_sin not in (0.0, 1.0):
            raise bad("zero_freq_sin", self.zero_freq_sin, "allowed: 1.0 (reference) or 0.0")
        g = self.groups
        if g <= 0 or self.num_attention_heads % g:
            raise bad(
                "num_query_groups",
                self.num_query_groups,
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.d_out is not None and not (0 <= self.d_out <= d_r // 2):
            raise bad("d_out", self.d_out, f"must be in [0, d_r/2 = {d_r // 2}]")

    @property
    def groups(self) -> int:
        """KV groups ``G``."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dims ``d_r``."""
        return int(self.head_dim * self.rotary_percent)

    def to_dict(self) -> dict:
        return asdict(self)
