"""The LoRA file of a run: ``pytorch_lora_weights.safetensors`` in diffusers format, written from the peft
adapters training holds and read back into them (resuming, measuring).

Made for every loader users have: the text-encoder keys keep CLIP's ``text_model.`` level, the final LoRA
has its scale folded into the weights, and the adapter metadata holds only the fields every supported peft
version accepts (`ADAPTER_METADATA_FIELDS`); checkpoints keep the raw adapter weights, with their true alpha
and rank in that metadata, so resuming is exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

from defectfill.errors import RunFileError
from defectfill.runs.files import LORA_FILENAME

TEXT_MODEL_PREFIX = "text_model."
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")  # the key prefixes of the text encoders' LoRA (SDXL: both)


def lora_layers(model, adapter_name: str = "default", fold_alpha: bool = False) -> dict:
    """The adapter's weights in diffusers format. With `fold_alpha`, the LoRA scale alpha / rank is multiplied
    into the B (up) matrices, so the file means the same to a loader that reads the alpha from the file's
    metadata and to one that ignores it (and applies alpha = rank)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding is adapted, and 'auto' looks the base model up on the Hub.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    if fold_alpha:
        config = model.peft_config[adapter_name]
        scale = config.lora_alpha / config.r
        state = {key: value * scale if ".lora_B." in key else value for key, value in state.items()}
    return convert_state_dict_to_diffusers(state)


# The adapter config a LoRA file records (`lora_adapter_metadata`), per component: the fields diffusers builds a
# LoraConfig from when a file has no metadata (`diffusers.utils.peft_utils.get_peft_kwargs`). diffusers calls
# `LoraConfig(**metadata)`, so a field an older peft does not know fails the whole load (peft 0.21's full
# `to_dict()` has nine that peft 0.17 refuses); these are known to every peft version the README names, and
# diffusers 0.35 needs `rank_pattern` and `target_modules` to be present. The fields left out are at their
# defaults in the adapters training makes, or only matter while training (dropout, initialisation) or name
# where the adapter was made (base model path, peft version); tests/test_train.py checks both.
ADAPTER_METADATA_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_dora", "lora_bias")


def _adapter_metadata(model, fold_alpha: bool) -> dict:
    """The adapter's `ADAPTER_METADATA_FIELDS`; with `fold_alpha` its alpha is the rank (the scale is in the
    weights), else the adapter's own alpha (checkpoints: resuming reads it back). Target modules sorted, so
    the same run writes the same file."""
    config = model.peft_config["default"].to_dict()
    metadata = {name: config[name] for name in ADAPTER_METADATA_FIELDS}
    if isinstance(metadata["target_modules"], (list, set, tuple)):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    if fold_alpha:
        metadata["lora_alpha"] = metadata["r"]
    return metadata


def text_encoder_layers(text_encoder, fold_alpha: bool) -> dict:
    """A text encoder's LoRA in diffusers format with CLIP's ``text_model.`` level on every key (transformers 5
    saves `CLIPTextModel`'s without it, `CLIPTextModelWithProjection`'s with it; older stacks silently drop keys
    without it)."""
    layers = lora_layers(text_encoder, fold_alpha=fold_alpha)
    return {key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key: value for key, value in layers.items()}


def save_lora(directory: str | os.PathLike, unet, text_encoder=None, fold_alpha: bool = True, text_encoder_2=None) -> None:
    """`pytorch_lora_weights.safetensors` in diffusers format (keys `unet.` / `text_encoder.text_model.`, and for
    SDXL `text_encoder_2.text_model.`, as `StableDiffusionXLInpaintPipeline.save_lora_weights` writes them), with
    the adapter configs' shared fields as metadata (`_adapter_metadata`), readable by the usual file mode.

    Made for every loader users have: the text-encoder keys keep CLIP's ``text_model.`` level, and with
    `fold_alpha` (the final LoRA) the scale is inside the weights. Checkpoints keep the raw adapter weights
    (`fold_alpha=False`) so that resuming is exact."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    kwargs = {"unet_lora_layers": lora_layers(unet, fold_alpha=fold_alpha),
              "unet_lora_adapter_metadata": _adapter_metadata(unet, fold_alpha)}
    for component, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if encoder is not None and getattr(encoder, "peft_config", None):
            kwargs[f"{component}_lora_layers"] = text_encoder_layers(encoder, fold_alpha)
            kwargs[f"{component}_lora_adapter_metadata"] = _adapter_metadata(encoder, fold_alpha)
    pipeline_class = StableDiffusionXLInpaintPipeline if text_encoder_2 is not None else StableDiffusionInpaintPipeline
    pipeline_class.save_lora_weights(directory, safe_serialization=True, **kwargs)
    path = Path(directory) / LORA_FILENAME
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; others on a shared machine must be able to read it


def _file_lora_scales(path: Path) -> dict[str, float]:
    """{"unet": alpha / r, "text_encoder": ..., "text_encoder_2": ...} as the file's metadata records them (1.0 where it records none,
    as loaders then take alpha = r)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    adapters = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    scales = {}
    for component in ("unet", *TEXT_ENCODER_COMPONENTS):
        alpha, rank = adapters.get(f"{component}.lora_alpha"), adapters.get(f"{component}.r")
        scales[component] = alpha / rank if alpha and rank else 1.0
    return scales


def _set_lora_state(model, peft_state: dict, file_scale: float, where: str) -> None:
    """Put PEFT-format LoRA weights into a model's "default" adapter, rescaling B from the file's scale to the
    adapter's; any key the model does not have is an error (a LoRA for another architecture)."""
    from peft.utils import set_peft_model_state_dict

    config = model.peft_config["default"]
    factor = file_scale / (config.lora_alpha / config.r)
    if factor != 1.0:
        peft_state = {key: value * factor if ".lora_B." in key else value for key, value in peft_state.items()}
    result = set_peft_model_state_dict(model, peft_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RunFileError(f"{where}: LoRA keys the model does not have, e.g. {unexpected[:3]}: is it a LoRA of another base model?")


def load_lora_into(directory: str | os.PathLike, unet, text_encoder=None, text_encoder_2=None) -> None:
    """Inverse of `save_lora` for models that already carry the adapters (resuming, measuring). UNet and
    text-encoder keys are checked alike."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    path = Path(directory) / LORA_FILENAME
    state_dict, _ = StableDiffusionInpaintPipeline.lora_state_dict(str(directory))
    scales = _file_lora_scales(path)
    unet_state = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
    _set_lora_state(unet, convert_unet_state_dict_to_peft(unet_state), scales["unet"], f"{path} (UNet)")
    for component, encoder in zip(TEXT_ENCODER_COMPONENTS, (text_encoder, text_encoder_2)):
        if encoder is not None and getattr(encoder, "peft_config", None):
            _load_text_encoder(state_dict, component, encoder, scales[component], f"{path} ({component.replace('_', ' ')})")


def _load_text_encoder(state_dict: dict, component: str, text_encoder, file_scale: float, where: str) -> None:
    """The `component.` keys of a LoRA file into a text encoder's adapter, with or without CLIP's ``text_model.``
    level as the model's own peft keys have it."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding is adapted, and 'auto' looks the base model up on the Hub.
    keys = get_peft_model_state_dict(text_encoder, save_embedding_layers=False)
    model_has_level = any(k.startswith(TEXT_MODEL_PREFIX) for k in keys)
    prefix = f"{component}."
    text_state = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            if not model_has_level and key.startswith(TEXT_MODEL_PREFIX):
                key = key[len(TEXT_MODEL_PREFIX):]
            text_state[key] = value
    _set_lora_state(text_encoder, convert_state_dict_to_peft(convert_state_dict_to_diffusers(text_state)), file_scale, where)
