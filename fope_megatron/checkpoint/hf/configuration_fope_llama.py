"""FoPE Llama configuration (written by fope-megatron's ``fope-export``; needs only transformers).

transformers' own ``LlamaConfig`` plus one ``fope`` block that fixes the position encoding:

- ``kind``: ``fope`` | ``rope`` | ``none``.
- ``rotary_dim`` (``d_r`` = ``head_dim * rotary_percent``), ``rotary_percent``, ``rope_theta``,
  ``interleaved`` (pair layout ``(2j, 2j+1)`` instead of ``(j, j + d_r/2)``).
- FoPE (arXiv:2412.17739): ``train_seq_len`` and ``floor_ratio`` (frequencies below
  ``floor_ratio * 2*pi / train_seq_len`` are zeroed), ``d_in`` (kept frequencies), ``d_out``
  (output pairs with a Fourier series; the rest are zero-frequency pairs with ``C = 1``,
  ``S = zero_freq_sin``), ``sigma``, ``shared_across_layers``. The trained coefficients are
  weights (``model.layers.N.self_attn.coef_cos`` / ``coef_sin``, float32 ``[G, d_in, d_out]``).
- ``scaling``: ``none`` | ``pi`` | ``yarn`` with ``factor``, ``original_max_position_embeddings``,
  ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim`` (applied to the frequencies before
  the floor; YaRN's concentration enters as the attention softmax scale).
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class FoPELlamaConfig(LlamaConfig):
    model_type = "fope_llama"

    fope: dict | None = None


__all__ = ["FoPELlamaConfig"]
