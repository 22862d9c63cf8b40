"""The whole run's config: its groups, and the values derived from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


from .groups import ClusterConfig, DataConfig, DeviceConfig, GenerateConfig, ModelConfig, ScoreConfig, TokenizeConfig
from .training import SFTConfig, TrainConfig, TrainingSettings


@dataclass
class PipelineConfig:
    # Where every stage writes: a local path, or a URI pyarrow opens (s3://, gs://, hdfs://,
    # file://). On a cluster, storage every node sees.
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # An SFT reference trained by the pipeline (off by default): see SFTConfig.
    sft: SFTConfig = field(default_factory=SFTConfig)
    # Samples of the trained policy and the reference after train (off by default).
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # What one device holds and computes: for `pipeline plan` and the metrics' mfu.
    device: DeviceConfig = field(default_factory=DeviceConfig)

    # Derived values live here so each is computed in one place.
    @property
    def reference_path(self) -> str:
        return self.model.reference_path or self.model.path

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer_path or self.model.path

    def sft_training(self) -> TrainingSettings:
        """The sft stage's training settings (what the shared training machinery reads)."""
        return TrainingSettings(**{f.name: getattr(self.sft, f.name) for f in dataclasses.fields(TrainingSettings)})
