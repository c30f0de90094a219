"""The run configuration: ``schema`` (the dataclasses), loading and validation."""

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
    check_data,
    check_vocab,
    load_config,
)

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
    "check_vocab",
    "load_config",
]
