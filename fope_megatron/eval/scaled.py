"""Training-free context extension at evaluation time: the trained weights, scaled frequencies.

``fope-eval --position-scaling pi|ntk|dynamic-ntk|yarn [--scaling-factor F]`` rebuilds the model
for every evaluation length ``L`` with its base frequencies scaled (``fope.scaling``), loads the
unchanged checkpoint and evaluates that length. No parameter changes; only the tables and, for
YaRN, the attention temperature (the concentration factor ``m`` on cos and sin, i.e. ``m^2`` on
the logits, applied as the softmax scale exactly as training with ``position.scaling=yarn`` does).

The factor: ``--scaling-factor F`` for every length, or by default ``max(1, L / L_train)`` per
length (so at 1x every mode is the unscaled model). ``dynamic-ntk`` scales itself by the sequence
length (transformers' ``dynamic``); its factor defaults to 1 and its base is computed for the
evaluation length ``L`` (the few generated passkey tokens reuse that base).

FoPE: the frequencies are scaled first and the floor is then taken at ``F * L_train`` (the
length the scaled model covers, as an x+YaRN continuation would), which keeps the trained
``D_in`` for PI and for YaRN with ``floor_ratio = 1``; any other combination that would change the
coefficient shapes is refused with a ``ValueError``.
"""

from __future__ import annotations

import dataclasses

from ..fope.scaling import SCALING_MODES, scaled_frequencies

__all__ = ["SCALING_MODES", "scaled_eval_config", "scaling_factor", "build_scaled_model"]


def scaling_factor(mode: str, factor: float | None, length: int, train_len: int) -> float:
    """The factor used at ``length``: ``factor`` if given, else the default of ``mode``."""
    if factor is not None:
        if factor < 1.0:
            raise ValueError(f"--scaling-factor must be >= 1, got {factor}")
        return float(factor)
    if mode == "dynamic-ntk":
        return 1.0
    return max(1.0, length / train_len)


def scaled_eval_config(cfg, mode: str, factor: float, length: int):
    """``(cfg', frequencies)``: the run config with the scaling applied for ``length``.

    ``cfg'.position`` carries YaRN's temperature (the builder turns it into the softmax scale);
    the frequencies are passed to the builder explicitly (every mode, also ``dynamic-ntk``).
    """
    if mode not in SCALING_MODES:
        raise ValueError(
            f"--position-scaling {mode!r} unknown; allowed: {', '.join(SCALING_MODES)}"
        )
    m = cfg.model
    if m.position_embedding not in ("rope", "fope"):
        raise ValueError(f"position scaling needs a rope or fope model, got {m.position_embedding}")
    train_len, pos = cfg.fope_train_seq_len, cfg.position
    w = scaled_frequencies(
        m.rotary_dim, float(m.rotary_base), mode, factor, cfg.original_max_positions,
        pos.beta_fast, pos.beta_slow, seq_len=length,
    )  # fmt: skip
    yarn = mode == "yarn" and factor > 1.0
    position = dataclasses.replace(
        pos, scaling="yarn" if yarn else "none", factor=factor if yarn else 1.0
    )
    fope = cfg.fope
    if m.position_embedding == "fope":
        # floor at the covered length; keeps the trained D_in (checked after the build)
        fope = dataclasses.replace(fope, train_seq_len=int(round(train_len * factor)))
    return dataclasses.replace(cfg, position=position, fope=fope), tuple(float(x) for x in w)


def build_scaled_model(cfg, state: dict, source, mode: str, factor: float, length: int):
    """The TP=1 eval-mode model of ``cfg`` with ``mode`` scaling for ``length``, ``state`` loaded.

    Raises:
        ValueError: the scaled FoPE floor would change the trained coefficient shapes.
    """
    from ..checkpoint.full_state import load_full_state, single_rank
    from ..model.builder import build_gpt

    scaled, freqs = scaled_eval_config(single_rank(cfg), mode, factor, length)
    model = build_gpt(scaled, frequencies=freqs).eval()
    want = {k: tuple(v.shape) for k, v in state.items() if "coef_" in k}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if "coef_" in k}
    bad = {k: (want[k], got.get(k)) for k in want if got.get(k) != want[k]}
    if bad:
        k, (w, g) = next(iter(bad.items()))
        raise ValueError(
            f"--position-scaling {mode} (factor {factor:g}) changes FoPE's floored frequency "
            f"count: {k} was trained as {w}, the scaled model needs {g}; use pi or yarn with "
            "fope.floor_ratio 1, or no scaling"
        )
    load_full_state(model, state, source)
    return model
