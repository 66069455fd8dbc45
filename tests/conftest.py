"""Shared fixtures: the bundled tiny SD2-inpainting model and the bundled synthetic MVTec data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing in the tests may reach the Hub: the bundled model is loaded from its folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = REPO_ROOT / "models" / "tiny-sd2-inpainting"
SYNTHETIC_DATA = REPO_ROOT / "data" / "synthetic_mvtec"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def synthetic_data_dir() -> Path:
    return SYNTHETIC_DATA


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The tiny pipeline loaded as users load SD2-inpainting; tests must not modify it."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(TINY_MODEL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    """A tiny SDXL-inpainting pipeline with random weights, built offline (tests/helpers/tiny_sdxl.py)."""
    from tests.helpers.tiny_sdxl import build_tiny_sdxl_inpainting

    return build_tiny_sdxl_inpainting(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl-inpainting")


@pytest.fixture(scope="session")
def sdxl_run(tiny_sdxl_path, tmp_path_factory) -> Path:
    """Three steps of train_defectfill.py on the tiny SDXL base, checkpointed each step, with gradient checkpointing
    (UNet and both text encoders) and the final validation painted by SDXL's pipeline (tests/helpers/sdxl_training.py);
    tests must not modify it."""
    from tests.helpers.sdxl_training import train_sdxl_run

    return train_sdxl_run(tiny_sdxl_path, tmp_path_factory.mktemp("sdxl_run") / "metal_nut-color")


@pytest.fixture
def copy_of_data(tmp_path, synthetic_data_dir) -> Path:
    """A writable copy of the synthetic dataset for tests that break it."""
    import shutil

    target = tmp_path / "mvtec"
    shutil.copytree(synthetic_data_dir, target)
    return target


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A short DefectFill run on the tiny model (metal_nut / color), shared by the inference tests."""
    import train_defectfill as train

    output_dir = tmp_path_factory.mktemp("tiny_run") / "metal_nut-color"
    train.main(train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(TINY_MODEL),
        "--data_dir", str(SYNTHETIC_DATA), "--output_dir", str(output_dir), "--max_train_steps", "4",
        "--train_batch_size", "2", "--validation_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none",
    ]))
    return output_dir


@pytest.fixture(scope="session")
def offline_lpips_weights(tmp_path_factory) -> Path:
    """LPIPS loads offline: TORCH_HOME (in os.environ, so subprocesses see it too) points at a cache holding random
    AlexNet weights under the file name torchvision downloads. LPIPS uses AlexNet's features (random here, seeded);
    the classifier it drops is saved as one zero expanded to its shape, so the file is 10 MB, not 240."""
    import torch
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = torchvision.models.alexnet(weights=None).state_dict()
    state = {k: v if k.startswith("features.") else torch.zeros(1).expand(v.shape) for k, v in state.items()}
    torch.save(state, checkpoints / Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        yield home
