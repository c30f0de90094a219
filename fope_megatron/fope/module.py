"""FourierPositionEmbedding: the FoPE nn.Module (coefficients as state) and its RoPE twin.

Both expose ``tables(positions, layer, groups)`` and ``apply(x, positions, layer, groups)`` so the
attention code treats them alike. The module holds the coefficients of the layers and KV groups
it is given (a pipeline stage's layers, a TP rank's groups); the numbers always come from the
full per-layer tensor drawn from ``(seed, layer)``, then sliced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .config import FoPEConfig
from .math import (
    apply_tables,
    base_frequencies,
    coefficient_generator,
    default_d_out,
    floor_frequencies,
    fope_tables,
    init_coefficients,
    rope_tables,
)


def _as_range(groups: range | Sequence[int] | None, total: int) -> range:
    if groups is None:
        return range(total)
    r = groups if isinstance(groups, range) else range(groups[0], groups[-1] + 1)
    if r.step != 1 or r.start < 0 or r.stop > total or len(r) == 0:
        raise ValueError(f"groups={groups!r} must be a non-empty contiguous range in [0, {total})")
    return r


class FourierPositionEmbedding(nn.Module):
    """FoPE for queries and keys (spec sections 1-3).

    Args:
        config: the FoPE settings.
        layers: global layer indices (0-based) whose coefficients this module holds
            (default: all ``config.num_layers``; ignored when ``shared_across_layers``).
        groups: the contiguous KV groups held (default: all ``G``); a TP rank passes its slice.
        frequencies: optional pre-scaled base frequencies (YaRN / PI), floored as usual.

    State: ``coef_cos`` and ``coef_sin`` shaped ``[n_layers_held, n_groups_held, D_in, D_out]``,
    float32; buffers when frozen, parameters when ``config.learnable``.
    """

    def __init__(
        self,
        config: FoPEConfig,
        layers: Sequence[int] | None = None,
        groups: range | None = None,
        frequencies: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        d_r = config.rotary_dim
        w = base_frequencies(d_r, config.rotary_base) if frequencies is None else frequencies
        w = w.to(torch.float32)
        if w.shape != (d_r // 2,):
            raise ValueError(f"frequencies must have shape [{d_r // 2}], got {tuple(w.shape)}")
        w, d_in = floor_frequencies(w, config.train_seq_len, config.floor_ratio)
        self.d_in = d_in
        self.d_out = default_d_out(d_in, d_r) if config.d_out is None else min(config.d_out, d_in)
        self.register_buffer("frequencies", w, persistent=False)
        self.groups = _as_range(groups, config.groups)
        if config.shared_across_layers:
            self.layers: list[int] = [0]
        else:
            self.layers = list(range(config.num_layers)) if layers is None else list(layers)
        for layer in self.layers:
            if not 0 <= layer < config.num_layers:
                raise ValueError(f"layer {layer} outside [0, {config.num_layers})")
        cos_list, sin_list = [], []
        for layer in self.layers:
            a_cos, a_sin = self.init_coefficients(layer)
            cos_list.append(a_cos[self.groups.start : self.groups.stop])
            sin_list.append(a_sin[self.groups.start : self.groups.stop])
        coef_cos, coef_sin = torch.stack(cos_list), torch.stack(sin_list)
        if config.learnable:
            self.coef_cos = nn.Parameter(coef_cos)
            self.coef_sin = nn.Parameter(coef_sin)
        else:
            self.register_buffer("coef_cos", coef_cos)
            self.register_buffer("coef_sin", coef_sin)

    # ------------------------------------------------------------------ coefficients
    def init_coefficients(self, layer: int) -> tuple[Tensor, Tensor]:
        """The initial FULL ``(A_cos, A_sin)`` of ``layer``, ``[G, D_in, D_out]``, float32."""
        key = 0 if self.config.shared_across_layers else layer
        gen = coefficient_generator(self.config.seed, key)
        return init_coefficients(self.config.groups, self.d_in, self.d_out, self.config.sigma, gen)

    def _slot(self, layer: int) -> int:
        if self.config.shared_across_layers:
            return 0
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} is not held here (held: {self.layers})") from None

    def coefficients(self, layer: int) -> tuple[Tensor, Tensor]:
        """The FULL ``[G, D_in, D_out]`` float32 ``(A_cos, A_sin)`` of ``layer``.

        When this module holds every group, these are its (possibly trained) tensors; a module
        holding a TP slice returns the deterministic initial full tensors.
        """
        if len(self.groups) == self.config.groups:
            i = self._slot(layer)
            return self.coef_cos[i].float(), self.coef_sin[i].float()
        return self.init_coefficients(layer)

    def _local(self, layer: int, groups: range | None) -> tuple[Tensor, Tensor]:
        i = self._slot(layer)
        g = self.groups if groups is None else _as_range(groups, self.config.groups)
        if g.start < self.groups.start or g.stop > self.groups.stop:
            raise ValueError(f"groups {g} not held here (held: {self.groups})")
        lo, hi = g.start - self.groups.start, g.stop - self.groups.start
        return self.coef_cos[i, lo:hi], self.coef_sin[i, lo:hi]

    # ------------------------------------------------------------------ tables / apply
    def tables(
        self, positions: Tensor, layer: int, groups: range | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(C_full, S_full)``, float32 ``[len(positions), n_groups, d_r]``."""
        a_cos, a_sin = self._local(layer, groups)
        return fope_tables(
            positions.to(self.frequencies.device),
            self.frequencies[: self.d_in],
            a_cos,
            a_sin,
            self.config.rotary_dim,
            self.config.zero_freq_sin,
            self.config.interleaved,
        )

    def forward(
        self, x: Tensor, positions: Tensor, layer: int, groups: range | None = None
    ) -> Tensor:
        """FoPE on ``x`` ``[s, b, heads, head_dim]`` whose heads belong to ``groups``."""
        c, s = self.tables(positions, layer, groups)
        return apply_tables(x, c, s, self.config.interleaved)

    def apply_qk(
        self,
        q: Tensor,
        k: Tensor,
        positions: Tensor,
        layer: int,
        groups: range | None = None,
        fusion: str = "torch",
    ) -> tuple[Tensor, Tensor]:
        """FoPE on queries and keys of ``groups`` (default: all held), by ``fusion``.

        ``torch``: tables once, applied to both. ``triton``: one fused launch for q and k that
        keeps nothing activation-sized for backward (see :mod:`.triton_apply`).
        """
        if fusion == "triton":
            from .triton_apply import fope_apply_qk

            a_cos, a_sin = self._local(layer, groups)
            cfg = self.config
            return fope_apply_qk(
                q, k, positions.to(q.device), self.frequencies[: self.d_in], a_cos, a_sin,
                cfg.rotary_dim, cfg.zero_freq_sin, cfg.interleaved,
            )  # fmt: skip
        if fusion != "torch":
            raise ValueError(f"FoPE fusion {fusion!r} unknown; allowed: torch, triton")
        c, s = self.tables(positions, layer, groups)
        return apply_tables(q, c, s, self.config.interleaved), apply_tables(
            k, c, s, self.config.interleaved
        )

    def apply(self, x, positions=None, layer=None, groups=None):
        """``apply(x, positions, layer, groups)`` is :meth:`forward`; ``apply(fn)`` keeps
        ``nn.Module.apply`` (DeepSpeed and others walk modules with it)."""
        if positions is None and callable(x) and not isinstance(x, Tensor):
            return super().apply(x)
        return self.forward(x, positions, layer, groups)

    def _apply(self, fn, recurse: bool = True):
        # Keep the coefficients float32 through model.half()/.bfloat16() (the spec's "float32
        # throughout"): remember them, let fn move them, then restore full-precision values.
        saved = {n: getattr(self, n).detach().clone() for n in ("coef_cos", "coef_sin")}
        super()._apply(fn, recurse)
        for name, ref in saved.items():
            t = getattr(self, name)
            if t.dtype != torch.float32:
                t.data = ref.to(device=t.device)
        return self


class RotaryEmbeddingTables(nn.Module):
    """Plain RoPE with FoPE's interface (megatron-core's frequencies and apply), CPU or GPU.

    Args:
        rotary_dim: ``d_r``.
        rotary_base: ``theta``.
        interleaved: pair layout.
        frequencies: optional pre-scaled frequencies (YaRN / PI).
    """

    def __init__(
        self,
        rotary_dim: int,
        rotary_base: float = 10000.0,
        interleaved: bool = False,
        frequencies: Tensor | None = None,
    ) -> None:
        super().__init__()
        w = base_frequencies(rotary_dim, rotary_base) if frequencies is None else frequencies
        self.register_buffer("frequencies", w.to(torch.float32), persistent=False)
        self.interleaved = interleaved

    def tables(self, positions: Tensor, layer: int = 0, groups: range | None = None):
        return rope_tables(
            positions.to(self.frequencies.device), self.frequencies, self.interleaved
        )

    def forward(self, x: Tensor, positions: Tensor, layer: int = 0, groups: range | None = None):
        c, s = self.tables(positions)
        return apply_tables(x, c, s, self.interleaved)

    def apply_qk(
        self,
        q: Tensor,
        k: Tensor,
        positions: Tensor,
        layer: int = 0,
        groups: range | None = None,
        fusion: str = "torch",
    ) -> tuple[Tensor, Tensor]:
        """RoPE on queries and keys: ``torch`` tables, the ``triton`` kernel's RoPE limit, or
        ``te`` (transformer-engine's fused RoPE through megatron-core)."""
        positions = positions.to(q.device)
        if fusion == "triton":
            from .triton_apply import rope_apply_qk

            d_r = 2 * self.frequencies.shape[0]
            return rope_apply_qk(q, k, positions, self.frequencies, d_r, self.interleaved)
        if fusion == "te":
            from .fusion import te_rope_apply_qk

            return te_rope_apply_qk(q, k, positions, self.frequencies, self.interleaved)
        if fusion != "torch":
            raise ValueError(f"RoPE fusion {fusion!r} unknown; allowed: torch, triton, te")
        c, s = self.tables(positions)
        return apply_tables(q, c, s, self.interleaved), apply_tables(k, c, s, self.interleaved)

    def apply(self, x, positions=None, layer=0, groups=None):
        """As :meth:`FourierPositionEmbedding.apply`: RoPE on ``x``, or ``nn.Module.apply(fn)``."""
        if positions is None and callable(x) and not isinstance(x, Tensor):
            return super().apply(x)
        return self.forward(x, positions, layer, groups)
