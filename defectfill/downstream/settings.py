"""What a downstream comparison is asked for, as `downstream_defectfill.py`'s flags say it: one frozen
`DownstreamSettings` (field names are the flags' dests; `defectfill.cli.settings_from_args` fills it), with the
models' shape and their training schedule as pieces."""

from __future__ import annotations

from dataclasses import dataclass, field

from defectfill.downstream.sources import BASELINES
from defectfill.settings import DataSourceSettings


@dataclass(frozen=True)
class DetectorModelSettings:
    """The localizer (a segmentation-models-pytorch U-Net) and the classifier (a torchvision ResNet), and the side
    every image is resized to."""

    resolution: int = 256
    encoder: str = "resnet34"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    encoder_weights: str = "none"
    classifier: str = "resnet34"


@dataclass(frozen=True)
class DetectorTrainingSettings:
    """How both models train (AnomalyDiffusion's schedule by default), and optional early stopping."""

    epochs: int = 200
    samples_per_epoch: int = 500
    batch_size: int = 8
    learning_rate: float = 1e-4
    classifier_epochs: int = 30
    classifier_repeats: int = 5
    validation_fraction: float = 0.0
    patience: int = 20
    progress: bool = True


@dataclass(frozen=True)
class DownstreamSettings:
    """Everything `downstream_defectfill.py` is asked for. `data` (data_dir, object_class) overrides the synthesis
    folders' records."""

    synthetic: tuple[str, ...] | None = None
    data: DataSourceSettings = field(default_factory=DataSourceSettings)
    split_file: tuple[str, ...] | None = None
    baselines: tuple[str, ...] = BASELINES
    copy_paste_count: int | None = None
    with_real: bool = True
    synthetic_shares: tuple[float, ...] = ()
    allow_test_leak: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    model: DetectorModelSettings = field(default_factory=DetectorModelSettings)
    training: DetectorTrainingSettings = field(default_factory=DetectorTrainingSettings)
    output_dir: str = "downstream-results"
