"""A real SDXL run through train_defectfill.py on the tiny SDXL base (`tests/helpers/tiny_sdxl.py`), shared by the
SDXL training tests and the LoRA compatibility test (the session fixture `sdxl_run` in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO_ROOT, SYNTHETIC_DATA

SIZE = 64
# The fixture run: gradient checkpointing (UNet and both text encoders) and the final validation painted by SDXL's pipeline.
RUN_EXTRA = ("--gradient_checkpointing", "--validation_steps", "10", "--num_validation_images", "1", "--num_inference_steps", "2")


def sdxl_args(base: Path | str, output_dir: Path, *extra: str):
    """The tiny config on the tiny SDXL base: 64 px, batch 1, 3 steps at a high rate, no tracker, no validation."""
    import train_defectfill as train

    return train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(base),
        "--data_dir", str(SYNTHETIC_DATA), "--output_dir", str(output_dir), "--resolution", str(SIZE),
        "--train_batch_size", "1", "--max_train_steps", "3", "--rank", "4", "--lora_alpha", "8",
        "--learning_rate", "5e-3", "--text_encoder_lr", "5e-3", "--lr_warmup_steps", "0",
        "--validation_steps", "0", "--checkpointing_steps", "1", "--report_to", "none", "--logging_steps", "1", *extra,
    ])


def train_sdxl_run(base: Path, output_dir: Path) -> Path:
    """Three steps on the SDXL `base`, checkpointed each step, with `RUN_EXTRA`; returns the run folder."""
    import train_defectfill as train

    train.main(sdxl_args(base, output_dir, *RUN_EXTRA))
    return output_dir
