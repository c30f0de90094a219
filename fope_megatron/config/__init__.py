"""The run configuration: ``schema`` (the dataclasses and their documentation), ``load`` (YAML
and dotted overrides) and ``validate`` (every check that needs no process group).

Every public name is re-exported here: ``from fope_megatron.config import Config, load_config``.
"""

from .load import config_from_dict, load_config
from .schema import (
    DEEPSPEED_CONFIG_DIR,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    DistConfig,
    FoPESection,
    ModelConfig,
    ParallelConfig,
    PositionConfig,
    RunConfig,
    TrainConfig,
    describe_fields,
    field_docs,
    help_text,
)
from .validate import check_data, check_recompute, check_vocab, validate_config

__all__ = [
    "DEEPSPEED_CONFIG_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DistConfig",
    "FoPESection",
    "ModelConfig",
    "ParallelConfig",
    "PositionConfig",
    "RunConfig",
    "TrainConfig",
    "check_data",
    "check_recompute",
    "check_vocab",
    "config_from_dict",
    "describe_fields",
    "field_docs",
    "help_text",
    "load_config",
    "validate_config",
]
