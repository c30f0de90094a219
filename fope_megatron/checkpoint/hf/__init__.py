"""Hugging Face hand-off: ``fope-export`` writes a transformers model directory.

- ``mapping``: megatron-core full (TP=1) state -> transformers Llama names (the table).
- ``configuration_fope_llama.py`` / ``modeling_fope_llama.py``: copied verbatim into the export
  (``trust_remote_code``); transformers' Llama with only the position encoding replaced.
- ``export``: config.json, safetensors, generation_config.json, tokenizer files; the CLI.
"""
