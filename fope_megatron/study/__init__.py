"""The length-generalization study: ``python -m fope_megatron.study`` (docs/evaluation.md)."""
