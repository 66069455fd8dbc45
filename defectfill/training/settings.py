"""The settings of a training run: `TrainingSettings`, built once by `train_defectfill.py` from its flags
(`defectfill.cli.settings_from_args`); every field is named as its flag's dest. The defaults here are the flags'
defaults (the parser reads them from `DEFAULTS`), which are the paper's where the paper gives one.

`RECORDED_TRAINING_FIELDS` chooses, by name, what of them the run record keeps under `training`: what decides the
LoRA, not where files are, how the run is watched, or the Hub. A new setting joins the record only when it is
added there."""

from __future__ import annotations

from dataclasses import dataclass, field

from defectfill import method
from defectfill.masks import DEFAULT_CROP_CONTEXT
from defectfill.settings import BaseModelSettings, DataSourceSettings, flat_settings


@dataclass(frozen=True)
class FewShotSettings:
    """Which images train: the defect type (None: the class's only one; "all": one run each) and the split."""

    defect_type: str | None = None
    split_strategy: str = "ordered"
    train_fraction: float = 1 / 3
    train_count: int | None = None
    split_file: str | None = None


@dataclass(frozen=True)
class AugmentationSettings:
    """The training resolution and the paired augmentation of image and mask (`defectfill.data.transform`)."""

    resolution: int = 512
    max_scale: float = 1.125
    defect_crop_probability: float = 0.0
    defect_crop_context: float = DEFAULT_CROP_CONTEXT
    random_flip: bool = False

    @property
    def is_static(self) -> bool:
        """True when a row's transformed pixels are the same every epoch (its latents may be cached)."""
        return self.max_scale == 1.0 and not self.random_flip and self.defect_crop_probability == 0


@dataclass(frozen=True)
class MethodSettings:
    """DefectFill's own settings: the [V*] token, the loss weights and the object branch's random boxes."""

    token: str = method.DEFAULT_TOKEN
    lambda_defect: float = method.DEFAULT_LOSS_WEIGHTS.defect
    lambda_object: float = method.DEFAULT_LOSS_WEIGHTS.object
    lambda_attention: float = method.DEFAULT_LOSS_WEIGHTS.attention
    object_alpha: float = method.DEFAULT_OBJECT_ALPHA
    num_boxes: int = method.DEFAULT_NUM_BOXES
    box_min_fraction: float = method.DEFAULT_BOX_MIN_FRACTION
    box_max_fraction: float = method.DEFAULT_BOX_MAX_FRACTION

    @property
    def loss_weights(self) -> method.LossWeights:
        return method.LossWeights(self.lambda_defect, self.lambda_object, self.lambda_attention)


@dataclass(frozen=True)
class OptimizationSettings:
    """The LoRA and how it is optimised (the optimizer details the paper leaves out are diffusers' LoRA-example defaults)."""

    train_batch_size: int = 4
    max_train_steps: int = 2000
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    text_encoder_lr: float = 4e-5
    train_text_encoder: bool = True
    rank: int = 8
    lora_alpha: int = 16
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    max_nonfinite_steps: int = 10


@dataclass(frozen=True)
class RuntimeSettings:
    """How the computation runs: precision, kernels, memory; the same model up to float rounding."""

    mixed_precision: str | None = None
    allow_tf32: bool = False
    torch_compile: bool = False
    channels_last: bool = True
    enable_xformers_memory_efficient_attention: bool = False
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    dataloader_num_workers: int = 0


@dataclass(frozen=True)
class MonitoringSettings:
    """Checkpoints, logs and validation: how the run is saved and watched, not what it learns."""

    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    logging_steps: int = 10
    validation_steps: int = 200
    num_validation_images: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5


@dataclass(frozen=True)
class HubSettings:
    """Uploading the run folder (the token is not a setting: it is passed to the upload alone, never recorded)."""

    push_to_hub: bool = False
    hub_model_id: str | None = None


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a training run is given, one field per flag of `train_defectfill.py` (grouped)."""

    model: BaseModelSettings = field(default_factory=BaseModelSettings)
    data: DataSourceSettings = field(default_factory=DataSourceSettings)
    few_shot: FewShotSettings = field(default_factory=FewShotSettings)
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    output_dir: str = "defectfill-lora"
    seed: int = 0


DEFAULTS = TrainingSettings()

# What the run record keeps under `training` (the rest of what it says, base model, revision, token, class, defect
# type, resolution, data folder or dataset, and the split itself, are fields of the record of their own).
RECORDED_TRAINING_FIELDS = (
    "seed", "variant",
    "split_strategy", "train_fraction", "train_count",
    "max_scale", "defect_crop_probability", "defect_crop_context", "random_flip",
    "lambda_defect", "lambda_object", "lambda_attention", "object_alpha", "num_boxes", "box_min_fraction", "box_max_fraction",
    "train_batch_size", "max_train_steps", "gradient_accumulation_steps", "learning_rate", "text_encoder_lr",
    "train_text_encoder", "rank", "lora_alpha", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
    "adam_weight_decay", "adam_epsilon", "max_grad_norm", "use_8bit_adam", "max_nonfinite_steps",
    "mixed_precision", "allow_tf32", "torch_compile", "channels_last", "enable_xformers_memory_efficient_attention",
    "gradient_checkpointing", "cache_latents",
)


def recorded_training(settings: TrainingSettings) -> dict:
    """The `training` of the run record: the `RECORDED_TRAINING_FIELDS` of `settings`, by name."""
    flat = flat_settings(settings)
    return {name: flat[name] for name in RECORDED_TRAINING_FIELDS}


def tracker_config(settings: TrainingSettings) -> dict:
    """The scalar settings, by name: what trackers record as hyperparameters (TensorBoard takes no None)."""
    return {name: value for name, value in flat_settings(settings).items() if isinstance(value, (int, float, str, bool))}
