"""The length-generalization study (issue 11): ``python -m fope_megatron.study``."""
