"""Base models: the withdrawn SD2 id loads its community mirror, and a base's family comes from its own
model_index.json (config files only: no weights are needed to tell families apart or to refuse a base)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from defectfill import bases
from defectfill.bases import BaseFamily, InpaintingModelError, detect_base_family, mirror_of, resolve_base_id, same_base

WITHDRAWN = "stabilityai/stable-diffusion-2-inpainting"
MIRROR = "sd2-community/stable-diffusion-2-inpainting"
COMPONENTS = {
    "sd": {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]},
    "sdxl": {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"]},
}


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch):
    """Each test sees a process that has not yet said where a withdrawn id lives."""
    monkeypatch.setattr(bases, "_announced", set())


def write_base(folder: Path, class_name: str, components: dict, unet_channels: int | None = 9) -> Path:
    """A base's config files only: model_index.json and, unless None, unet/config.json with that many input channels."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None], **components}
    if unet_channels is not None:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        (folder / "unet").mkdir(exist_ok=True)
        (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": unet_channels}))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# ----------------------------------------------------------------------------------------------------
# Where the bases live
# ----------------------------------------------------------------------------------------------------


def test_the_withdrawn_sd2_id_loads_the_mirror_and_says_so_once(caplog):
    with caplog.at_level(logging.WARNING, logger="defectfill"):
        assert resolve_base_id(WITHDRAWN) == MIRROR
        assert resolve_base_id(WITHDRAWN) == MIRROR
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{WITHDRAWN} was withdrawn from the Hub by Stability AI in November 2025; loading the community mirror {MIRROR}"]


def test_other_names_load_as_given(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="defectfill"):
        for name in (MIRROR, "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", str(tmp_path)):
            assert resolve_base_id(name) == name
    assert caplog.records == []
    assert resolve_base_id("runwayml/stable-diffusion-inpainting") == "stable-diffusion-v1-5/stable-diffusion-inpainting"


def test_a_local_folder_named_like_the_withdrawn_id_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(WITHDRAWN).mkdir(parents=True)
    assert mirror_of(WITHDRAWN) is None and resolve_base_id(WITHDRAWN) == WITHDRAWN


def test_a_run_trained_on_the_withdrawn_id_has_the_mirror_s_base(tmp_path):
    assert same_base(WITHDRAWN, MIRROR) and same_base(MIRROR, WITHDRAWN)
    assert not same_base(MIRROR, "stable-diffusion-v1-5/stable-diffusion-inpainting")
    assert same_base(str(tmp_path), str(tmp_path / ".." / tmp_path.name)) and not same_base(str(tmp_path), MIRROR)
    assert len({bases.canonical_base(name) for name in (WITHDRAWN, MIRROR, MIRROR)}) == 1


# ----------------------------------------------------------------------------------------------------
# Families, from model_index.json
# ----------------------------------------------------------------------------------------------------


def test_the_bundled_tiny_model_is_sd_family(tiny_model_path):
    assert detect_base_family(str(tiny_model_path)) == BaseFamily(
        str(tiny_model_path), "sd", "StableDiffusionInpaintPipeline", has_text_encoder_2=False, has_tokenizer_2=False, unet_in_channels=9)


def test_sdxl_inpainting_is_told_apart_by_its_model_index(tmp_path):
    base = detect_base_family(str(write_base(tmp_path / "sdxl", "StableDiffusionXLInpaintPipeline", COMPONENTS["sdxl"])))
    assert (base.family, base.pipeline_class, base.has_text_encoder_2, base.has_tokenizer_2) == (
        "sdxl", "StableDiffusionXLInpaintPipeline", True, True)
    assert base.is_sdxl and bases.pipeline_class_of(base).__name__ == "StableDiffusionXLInpaintPipeline"


def test_an_inpainting_unet_saved_under_the_text_to_image_class_is_still_inpainting(tmp_path):
    """Some inpainting models on the Hub are saved as StableDiffusionPipeline; the 9-channel UNet decides."""
    base = detect_base_family(str(write_base(tmp_path / "sd15", "StableDiffusionPipeline", COMPONENTS["sd"])))
    assert base.pipeline_class == "StableDiffusionInpaintPipeline" and base.unet_in_channels == 9


def test_an_unreadable_unet_config_leaves_the_channel_check_to_the_loader(tmp_path):
    folder = write_base(tmp_path / "sd", "StableDiffusionInpaintPipeline", COMPONENTS["sd"])
    (folder / "unet" / "config.json").unlink()
    base = detect_base_family(str(folder))
    assert base.family == "sd" and base.unet_in_channels is None


@pytest.mark.parametrize("class_name, components, channels, named", [
    ("StableDiffusion3Pipeline", {"transformer": ["diffusers", "SD3Transformer2DModel"], **COMPONENTS["sdxl"]}, None,
     ["StableDiffusion3Pipeline", "SD3Transformer2DModel"]),
    ("FluxFillPipeline", {"transformer": ["diffusers", "FluxTransformer2DModel"], **COMPONENTS["sd"]}, None,
     ["FluxFillPipeline", "FluxTransformer2DModel"]),
    ("StableDiffusionPipeline", COMPONENTS["sd"], 4, ["4 input channels", "text-to-image"]),
    ("StableDiffusionXLPipeline", COMPONENTS["sdxl"], 4, ["4 input channels"]),
    ("KandinskyV22InpaintPipeline", {}, None, ["KandinskyV22InpaintPipeline", "no UNet"]),
])
def test_a_base_we_do_not_support_is_refused_naming_what_is_supported(tmp_path, class_name, components, channels, named):
    folder = write_base(tmp_path / "base", class_name, components, channels)
    with pytest.raises(InpaintingModelError) as error:
        detect_base_family(str(folder))
    for words in named + ["StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"]:
        assert words in str(error.value)


def test_the_sdxl_refiner_layout_without_a_first_text_encoder_is_refused(tmp_path):
    components = {**COMPONENTS["sdxl"], "text_encoder": [None, None], "tokenizer": [None, None]}
    folder = write_base(tmp_path / "refiner", "StableDiffusionXLInpaintPipeline", components)
    with pytest.raises(InpaintingModelError, match="has no text_encoder, tokenizer"):
        detect_base_family(str(folder))


def test_a_folder_without_model_index_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(InpaintingModelError, match="has no model_index.json"):
        detect_base_family(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# The Hub path, offline: only the small JSON files, from the cache
# ----------------------------------------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, dict]) -> Path:
    """A Hugging Face cache holding `files` of `repo_id` at main, as `hf_hub_download` leaves it."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return cache


def test_the_withdrawn_id_reads_the_mirror_s_model_index_from_the_cache_offline(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    index = {"_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], **COMPONENTS["sd"]}
    cache = fake_hub_cache(tmp_path / "cache", MIRROR, {"model_index.json": index, "unet/config.json": {"in_channels": 9}})
    with caplog.at_level(logging.WARNING, logger="defectfill"):
        base = detect_base_family(WITHDRAWN, cache_dir=str(cache))
    assert (base.name, base.family, base.unet_in_channels) == (MIRROR, "sd", 9)
    assert [MIRROR in r.getMessage() for r in caplog.records] == [True]


def test_offline_without_the_files_in_the_cache_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InpaintingModelError, match=f"{MIRROR}: its model_index.json is not in the Hugging Face cache"):
        detect_base_family(WITHDRAWN, cache_dir=str(tmp_path))


def test_a_name_that_is_neither_folder_nor_hub_id_is_an_error(tmp_path):
    with pytest.raises(InpaintingModelError, match="no such local folder"):
        detect_base_family(str(tmp_path / "no" / "such" / "model"))
