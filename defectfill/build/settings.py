"""What a build is asked to make, as `build_dataset_defectfill.py`'s flags say it: one frozen `BuildSettings`
(field names are the flags' dests; `defectfill.cli.settings_from_args` fills it), in pieces by flag group."""

from __future__ import annotations

from dataclasses import dataclass, field

from defectfill.build.augment import AugmentSettings
from defectfill.errors import BuildError
from defectfill.masks import MaskSource
from defectfill.settings import BaseModelSettings, DataSourceSettings

PREVIEW_ROWS = 8  # rows of preview.png (clean | mask | generated), spread over the labels


@dataclass(frozen=True)
class BuildMaskSettings:
    """Where a build's masks come from (`mask_from`: the runs' training or held-out masks, or `dir`, the user's
    folder `mask_dir`) and how they are used: new masks drawn from them (`mask_augment`) or as they are."""

    mask_from: MaskSource = MaskSource.TRAIN
    mask_dir: str | None = None
    mask_augment: bool = True
    mask_max_rotation: float = 180.0
    mask_scale: tuple[float, float] = (0.75, 1.25)
    mask_elastic: float = 0.04
    mask_flip: bool = True
    mask_jitter: float | None = None
    mask_attempts: int = 50
    foreground_dir: str | None = None
    object_type: str = "auto"
    min_on_object: float = 0.9
    defects_per_image: str = "1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_from", MaskSource(self.mask_from))
        if (self.mask_from is MaskSource.DIR) != bool(self.mask_dir):
            raise BuildError(f"masks from {self.mask_from.value} with --mask_dir {self.mask_dir}: a folder of masks is "
                             "mask_from dir, and mask_from dir needs the folder (--mask_dir)")

    @property
    def augment(self) -> AugmentSettings:
        """How far a new mask may depart from the real one it is drawn from."""
        return AugmentSettings(flip=self.mask_flip, max_rotation=self.mask_max_rotation, min_scale=self.mask_scale[0],
                               max_scale=self.mask_scale[1], elastic=self.mask_elastic, jitter=self.mask_jitter)


@dataclass(frozen=True)
class BuildGenerationSettings:
    """How each defect is painted and kept: the sampler, the candidates and their LPIPS selection, the redraws."""

    scheduler: str | None = None
    resolution: int | None = None
    num_candidates: int = 8
    min_lpips: float = 0.0
    max_redraws: int = 2
    batch_size: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    crop_to_mask: bool | None = None
    crop_context: float | None = None
    lpips_net: str = "alex"

    @property
    def scores_candidates(self) -> bool:
        """Whether LPIPS is needed: to choose among candidates, or to reject weak results."""
        return self.num_candidates > 1 or self.min_lpips > 0


@dataclass(frozen=True)
class BuildOutputSettings:
    output_dir: str = "defectfill-dataset"
    save_candidates: bool = False
    export: str = "none"
    export_dir: str | None = None
    export_good: str = "copy"
    push_to_hub: bool = False  # the token is not a setting: it goes to the upload alone, never recorded
    hub_dataset_id: str | None = None


@dataclass(frozen=True)
class BuildSettings:
    """Everything `build_dataset_defectfill.py` is asked for. `model` and `data` override the runs' records."""

    lora: tuple[str, ...] = ()
    model: BaseModelSettings = field(default_factory=BaseModelSettings)
    data: DataSourceSettings = field(default_factory=DataSourceSettings)
    mixed_precision: str = "no"
    device: str | None = None
    defect_types: tuple[str, ...] | None = None
    image_dir: str | None = None
    good_split: str = "train"
    num_images: int = 10
    masks: BuildMaskSettings = field(default_factory=BuildMaskSettings)
    generation: BuildGenerationSettings = field(default_factory=BuildGenerationSettings)
    output: BuildOutputSettings = field(default_factory=BuildOutputSettings)
