"""Context extension: start a run from another run's weights (``train.init_from``).

x+FoPE (spec section 5): a longer ``train_seq_len`` lowers the floor, so ``D_in`` (and possibly
``D_out``) grows. With ``fope.expand_on_extension=true`` the new coefficient tensors are
initialised as the spec's section 2 on the new full shape and the old block is copied into
``[..., :D_in0, :D_out0]`` (shrinking keeps the leading block). Without it, a shape change is an
error that names both shapes and the two fixes, never a silent mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config  # the config schema only
from ..errors import ConfigError
from ..fope import FourierPositionEmbedding


def fope_coefficient_keys(model: torch.nn.Module):
    """``(state key, module, 'cos'|'sin')`` for every FoPE coefficient tensor of ``model``."""
    for prefix, module in model.named_modules():
        if isinstance(module, FourierPositionEmbedding):
            for kind in ("cos", "sin"):
                yield f"{prefix}.coef_{kind}", module, kind


def adapt_fope_coefficients(full: dict, model: torch.nn.Module, expand: bool) -> dict:
    """``full`` (a TP=1 state dict of the source run) with FoPE coefficients fitted to ``model``."""
    out = dict(full)
    for key, module, kind in fope_coefficient_keys(model):
        if key not in full:
            raise ConfigError(f"train.init_from: the checkpoint has no {key} (not a FoPE model?)")
        old = full[key]
        g = module.config.groups
        new_shape = (old.shape[0], g, module.d_in, module.d_out)
        if tuple(old.shape) == new_shape:
            continue
        if not expand:
            raise ConfigError(
                f"train.init_from: {key} has shape {tuple(old.shape)} in the checkpoint but "
                f"{new_shape} for fope.train_seq_len={module.config.train_seq_len}; set "
                "fope.expand_on_extension=true to grow the coefficients (x+FoPE), or set "
                "fope.train_seq_len to the checkpoint's training length to keep its floor"
            )
        layers = [0] if module.config.shared_across_layers else module.layers
        fresh = []
        for i, layer in enumerate(layers):
            a_cos, a_sin = module.init_coefficients(layer)
            t = (a_cos if kind == "cos" else a_sin).clone()
            di, do = min(old.shape[2], t.shape[1]), min(old.shape[3], t.shape[2])
            t[:, :di, :do] = old[i, :, :di, :do].to(t)
            fresh.append(t)
        out[key] = torch.stack(fresh)
    return out


def load_init_weights(model: torch.nn.Module, cfg: Config, source: Path) -> None:
    """Load ``source`` (a checkpoint folder of any layout) into ``model`` (any TP layout),
    fitting the FoPE coefficients to the new length (x+FoPE)."""
    from .full_state import checkpoint_full_state, load_full_state

    full = adapt_fope_coefficients(
        checkpoint_full_state(source), model, cfg.fope.expand_on_extension
    )
    load_full_state(model, full, source)
