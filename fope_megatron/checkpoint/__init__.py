"""Every byte a run writes or reads for model state lives here.

- ``store``: the on-disk layout (``RUN_DIR/checkpoints/step_N/`` + ``COMPLETE``, atomic
  ``latest``), DeepSpeed save and exact resume, checkpoint resolution (``latest``, ``step_N``).
- ``reshard``: the full (TP=1) state gathered over TP on save and sliced on load.
- ``full_state``: the full state of any checkpoint layout (``model_full.pt``, or ZeRO-3
  partitions consolidated with DeepSpeed's zero_to_fp32), the run's config, a TP=1 model.
- ``extension``: ``train.init_from`` (weights of another run, x+FoPE coefficient growth).
- ``hf``: ``fope-export``, a Hugging Face transformers model directory.

Training and evaluation both go through this package; neither reads the other's files.
"""
