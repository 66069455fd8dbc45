"""The LoRA files we write load in the stacks users already have: the suite's own, and an older one (diffusers 0.35,
transformers 4, peft 0.17) installed beside it with `pip install --target` and put first on PYTHONPATH in a
subprocess, offline, as a user loads a run: `load_lora_weights(run, weight_name=...)`, and the model card's snippet."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from defectfill.runs.files import LORA_FILENAME
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL
from tests.helpers.lora_load_probe import TEXT_ENCODERS, WEIGHT_NAME, probe

# The older stack: a common mid-2025 one. transformers 4.57 needs huggingface_hub < 1.0, which today's diffusers does
# not accept, so it comes with the diffusers of its time; the rest (torch, accelerate, safetensors) is the suite's.
OLD_STACK = ("diffusers==0.35.2", "transformers==4.57.6", "peft==0.17.1", "huggingface_hub==0.36.2", "tokenizers==0.22.1")
DEMO_RUN = REPO_ROOT / "models" / "demo-lora-metal_nut-color"
IMAGE = SYNTHETIC_DATA / "metal_nut" / "train" / "good" / "000.png"
MASK = SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "003_mask.png"
PROBE = REPO_ROOT / "tests" / "helpers" / "lora_load_probe.py"
PIP_NETWORK_TIMEOUT = 15  # seconds per request: an unreachable index fails the install quickly


def old_stack_target() -> Path:
    """Where the older stack is installed once per machine: outside the repository, keyed by the pins."""
    digest = hashlib.sha256(" ".join(OLD_STACK).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "defectfill-tests" / f"old-stack-{digest}"


def old_stack_dir() -> Path:
    """The older stack, installed once and reused. Without it and without a package index pip can reach (offline,
    a firewall), the test skips, saying so: pip waits PIP_NETWORK_TIMEOUT seconds per request and retries once."""
    target = old_stack_target()
    if (target / "INSTALLED").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)  # an install that did not finish
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--timeout", str(PIP_NETWORK_TIMEOUT), "--retries", "1", "--target", str(partial), *OLD_STACK]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        failure = result.stderr.strip().splitlines()[-3:] if result.returncode else None
    except subprocess.TimeoutExpired:
        failure = ["pip did not finish within 600 s"]
    if failure:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.skip(f"pip could not install the older stack {' '.join(OLD_STACK)} (not cached in {target}; it needs a "
                    f"package index, e.g. PyPI): {' / '.join(failure)}")
    (partial / "INSTALLED").write_text("\n".join(OLD_STACK) + "\n")
    try:
        os.replace(partial, target)
    except OSError:  # another session installed it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return target


def card_snippet(run: Path) -> str:
    return re.search(r"```python\n(.*?)```", (run / "README.md").read_text(), re.S).group(1)


def probe_in_old_stack(base: Path, loras: dict[str, str], run: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Run the probe on `base` with each of `loras` and the card snippet of `run` in the older stack, offline, in a
    subprocess; ({name/what: array}, info) as `probe` returns them in the suite's stack."""
    old_stack = old_stack_dir()
    snippet = tmp_path / "card_snippet.py"
    snippet.write_text(card_snippet(run))
    output = tmp_path / "old.npz"
    command = [sys.executable, str(PROBE), "--base", str(base), "--image", str(IMAGE),
               "--mask", str(MASK), "--output", str(output), "--snippet", str(snippet)]
    command += [f"--lora={name}={folder}" for name, folder in loras.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(old_stack), os.environ.get("PYTHONPATH")])))
    # cwd: the card names the run by its folder name, as a user who trained it next door does
    result = subprocess.run(command, cwd=run.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    old_info = json.loads(output.with_suffix(".json").read_text())
    assert old_info["versions"] == {pin.split("==")[0]: pin.split("==")[1] for pin in OLD_STACK[:3]}
    assert old_info["snippet_image_size"] == [64, 64]
    return dict(np.load(output)), old_info


def assert_same_in_both_stacks(base: Path, loras: dict[str, str], old: dict, old_info: dict, models: tuple[str, ...]) -> None:
    """The suite stack's probe gives the old stack's adapted-layer counts, base embeddings (to 1e-5: the base text
    encoders were not re-initialised), LoRA embeddings and images (to 1e-4); in the old stack each of `models` got
    adapted layers, each text-encoder LoRA changed its embedding and the UNet LoRA the image."""
    current, info = probe(str(base), str(IMAGE), str(MASK), loras)
    assert info["layers"] == old_info["layers"]
    embeddings = [TEXT_ENCODERS[model] for model in models if model in TEXT_ENCODERS]
    for name in loras:
        assert set(old_info["layers"][name]) == set(models) and all(old_info["layers"][name][m] > 0 for m in models), name
        for what in embeddings:
            np.testing.assert_allclose(old[f"{name}/base_{what}"], current[f"{name}/base_{what}"], atol=1e-5)
            np.testing.assert_allclose(old[f"{name}/{what}"], current[f"{name}/{what}"], atol=1e-4)
            assert np.abs(old[f"{name}/{what}"] - old[f"{name}/base_{what}"]).max() > 1e-3, (name, what)  # text-encoder LoRA applied
        np.testing.assert_allclose(old[f"{name}/image"], current[f"{name}/image"], atol=1e-4)
        assert np.abs(old[f"{name}/image"] - old[f"{name}/base_image"]).max() > 1e-3, name


@pytest.mark.slow
def test_lora_files_load_the_same_in_an_older_stack(tiny_run, tmp_path):
    """A LoRA the suite trains and the bundled demo run, loaded offline in diffusers 0.35 / transformers 4.57 / peft
    0.17, give the suite stack's text embedding and image (64 px, 10 steps, a fixed generator) to 1e-4; the base
    text encoder is the bundled one (not re-initialised), both LoRAs adapt as many layers in either stack, the
    text-encoder LoRA changes the embedding and the UNet LoRA the image, and the model card's snippet runs."""
    loras = {"suite": str(tiny_run), "demo": str(DEMO_RUN)}
    old, old_info = probe_in_old_stack(TINY_MODEL, loras, tiny_run, tmp_path)
    assert_same_in_both_stacks(TINY_MODEL, loras, old, old_info, ("text_encoder", "unet"))


@pytest.mark.slow
def test_an_sdxl_lora_file_loads_the_same_in_an_older_stack(sdxl_run, tiny_sdxl_path, tmp_path):
    """The SDXL LoRA train_defectfill.py writes on the tiny SDXL base (keys `unet.`, `text_encoder.text_model.`,
    `text_encoder_2.text_model.`), loaded offline by `StableDiffusionXLInpaintPipeline` in diffusers 0.35 /
    transformers 4.57 / peft 0.17: both text encoders' embeddings (base: to 1e-5, so neither base encoder was
    re-initialised; with the LoRA: to 1e-4) and the image to 1e-4 of the suite's stack, as many layers adapted in
    each of text_encoder, text_encoder_2 and unet, each of the three LoRAs changes something there, and the card's
    SDXL snippet runs."""
    loras = {"sdxl": str(sdxl_run)}
    old, old_info = probe_in_old_stack(tiny_sdxl_path, loras, sdxl_run, tmp_path)
    assert_same_in_both_stacks(tiny_sdxl_path, loras, old, old_info, ("text_encoder", "text_encoder_2", "unet"))


def test_without_the_cached_stack_and_an_index_the_old_stack_test_skips(tmp_path, monkeypatch):
    """Offline (here: pip told to use no index and no local wheels) and nothing cached: a skip naming the stack and
    why, and no half-installed folder taken for the stack next time; a cached stack is reused without pip."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(pytest.skip.Exception, match=r"could not install the older stack diffusers==0\.35\.2 .*needs a package index"):
        old_stack_dir()
    assert list(tmp_path.glob("defectfill-tests/*")) == []
    old_stack_target().mkdir(parents=True)
    (old_stack_target() / "INSTALLED").write_text("\n".join(OLD_STACK) + "\n")
    assert old_stack_dir() == old_stack_target()


def test_snippets_name_the_weight_file():
    """diffusers 0.35 offline refuses `load_lora_weights(folder)` without `weight_name=`: every Python snippet of the
    README and docs/ that loads a LoRA names the file (the model card's: tests/test_train.py)."""
    assert WEIGHT_NAME == LORA_FILENAME
    pages = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]
    blocks = [block for page in pages for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    calls = [call for block in blocks for call in re.findall(r"load_lora_weights\((.*?)\)\n", block)]
    assert calls and all(f'weight_name="{LORA_FILENAME}"' in call for call in calls), calls


def test_readme_names_the_stacks_the_lora_file_is_tested_in():
    """docs/compatibility.md names the older stack this file installs and the suite's own versions."""
    section = (REPO_ROOT / "docs" / "compatibility.md").read_text()
    for pin in OLD_STACK[:3]:
        name, version = pin.split("==")
        assert f"{name} {version}" in section, pin
    for name in ("diffusers", "transformers", "peft"):
        major_minor = ".".join(importlib.metadata.version(name).split(".")[:2])
        assert f"{name} {major_minor}" in section, (name, major_minor)


def test_the_bundled_text_encoder_keeps_clips_text_model_level(tiny_pipeline, tmp_path):
    """transformers 5 saves a CLIPTextModel's keys without `text_model.`, and transformers 4 then initialises the
    text encoder at random (a warning, no error). The bundled file has every key under `text_model.`; transformers 5
    loads each tensor of it unchanged (transformers 4: the older-stack test's base embedding), and the code that
    writes the tiny model writes it so."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from defectfill.runs.lora import TEXT_MODEL_PREFIX
    from scripts.tiny.model import TEXT_ENCODER_WEIGHTS, save_pipeline

    stored = load_file(TINY_MODEL / TEXT_ENCODER_WEIGHTS)
    assert stored and all(key.startswith(TEXT_MODEL_PREFIX) for key in stored)
    loaded = CLIPTextModel.from_pretrained(TINY_MODEL, subfolder="text_encoder").state_dict()
    unprefixed = {key[len(TEXT_MODEL_PREFIX):]: value for key, value in stored.items()}
    assert loaded.keys() == unprefixed.keys()
    assert all(torch.equal(loaded[key], unprefixed[key]) for key in loaded)

    save_pipeline(tiny_pipeline, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / TEXT_ENCODER_WEIGHTS)
    assert saved.keys() == stored.keys() and all(torch.equal(saved[key], stored[key]) for key in saved)


def test_the_tiny_sdxl_text_encoders_keep_clips_text_model_level(tiny_sdxl_path):
    """The tiny SDXL base is saved as transformers 4 loads it (the older-stack SDXL test's base embeddings check it
    there): every key of both text encoders under `text_model.` but the projection's, which transformers 4's
    CLIPTextModelWithProjection keeps beside it, and the slow tokenizer's files in both tokenizer folders."""
    from safetensors.torch import load_file

    from defectfill.runs.lora import TEXT_MODEL_PREFIX

    first = load_file(tiny_sdxl_path / "text_encoder" / "model.safetensors")
    second = load_file(tiny_sdxl_path / "text_encoder_2" / "model.safetensors")
    assert first and all(key.startswith(TEXT_MODEL_PREFIX) for key in first)
    assert {key for key in second if not key.startswith(TEXT_MODEL_PREFIX)} == {"text_projection.weight"}
    for folder in ("tokenizer", "tokenizer_2"):
        assert all((tiny_sdxl_path / folder / name).is_file() for name in ("vocab.json", "merges.txt")), folder
