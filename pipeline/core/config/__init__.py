"""Typed run configuration: one YAML, grouped by stage, overridable as ``key.sub=value``.

Every value is read from here and nowhere else. Unknown keys and values of the wrong type
are errors that name the full key (``train.beta``), so a typo never silently falls back to
a default. ``model`` is a group of its own because the policy/reference paths, dtype and
attention implementation are shared by score and train (both must use the same numerics).

Rooms: ``groups`` (model, data, tokenize, score, cluster), ``training`` (the training
settings, the preference loss, the train and sft groups), ``run`` (``PipelineConfig``),
``validate`` (the checks at load) and ``load`` (YAML in, overrides, dicts out).
"""

from .groups import (ClusterConfig, ConfigError, DataConfig, DataError, DeviceConfig, GenerateConfig, ModelConfig, RowSource,
                     ScoreConfig, TokenizeConfig)
from .load import (apply_overrides, as_written, config_from_dict, dump_yaml, for_workers, load_config, read_config, redact,
                   resume_location, to_dict, unchecked)
from .run import PipelineConfig
from .training import (SFT_FROM_TRAIN, TRAIN_ONLY_KEYS, LoraSettings, PreferenceSettings, SFTConfig, SFTDataConfig,
                       TrainConfig, TrainingSettings)
from .validate import PROMPT_SHARING_ATTENTION, build_loss, rename_group, shares_prompt

__all__ = ["ClusterConfig", "ConfigError", "DataConfig", "DataError", "DeviceConfig", "GenerateConfig", "LoraSettings", "ModelConfig",
           "PROMPT_SHARING_ATTENTION", "PipelineConfig", "PreferenceSettings", "RowSource", "SFTConfig", "SFTDataConfig", "SFT_FROM_TRAIN",
           "ScoreConfig", "TRAIN_ONLY_KEYS", "TokenizeConfig", "TrainConfig", "TrainingSettings", "apply_overrides",
           "as_written", "build_loss", "config_from_dict", "dump_yaml", "for_workers", "load_config", "read_config", "redact",
           "rename_group", "resume_location", "shares_prompt", "to_dict", "unchecked"]
