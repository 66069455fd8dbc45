"""defectfill_step: one DefectFill step on the tiny model: the three losses and their gradients, the [V*]
recording scoped to the step's context, the prompt ids, the latent cache, channels-last and torch.compile."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import train_defectfill as train
from defectfill.cli import settings_from_args
from defectfill.method import LossWeights
from defectfill.models import add_lora_adapters, compile_models, load_models, set_memory_format
from defectfill.step import DefectFillStep, LatentCache, StepConfig
from defectfill.training.data import build_dataloader, load_training_split
from defectfill.training.settings import TrainingSettings
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL


@pytest.fixture
def step_setup(tmp_path):
    """(step, models, batch): the tiny model with LoRA, the tiny config's step and a batch of 2 with per-sample seeds."""
    settings = settings_from_args(TrainingSettings, train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(TINY_MODEL),
        "--data_dir", str(SYNTHETIC_DATA), "--output_dir", str(tmp_path), "--train_batch_size", "2",
    ]))
    models = load_models(settings.model.pretrained_model_name_or_path)
    add_lora_adapters(models, settings.optimization.rank, settings.optimization.lora_alpha)
    step = DefectFillStep.build(models, "metal_nut", "sks", StepConfig.from_settings(settings.method))
    rows, _ = load_training_split(settings, "color")
    batch = next(iter(build_dataloader(rows, settings, 1)))
    return step, models, batch


def step_losses(step, batch, backward: bool = False) -> dict[str, float]:
    """One call of the real step (the batch's per-sample seeds make every call draw the same)."""
    with step(batch) as output:
        if backward:
            output.losses["loss"].backward()
        return {k: v.item() for k, v in output.losses.items()}


def test_step_losses_and_gradients(step_setup):
    step, models, batch = step_setup
    with step(batch) as output:
        terms = output.losses
        assert set(terms) == {"defect", "object", "attention", "loss"}
        assert all(torch.isfinite(v) and v > 0 for v in terms.values())
        weights = step.config.loss_weights
        expected = weights.defect * terms["defect"] + weights.object * terms["object"] + weights.attention * terms["attention"]
        config = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())  # the weights the step was built with
        assert (weights.defect, weights.object, weights.attention) == (
            config["lambda_defect"], config["lambda_object"], config["lambda_attention"])
        assert terms["loss"].item() == pytest.approx(expected.item())
        assert step.store.enabled and len(step.store.maps) == 6  # recording inside the context, for backward
        assert output.attention_map.shape == (2, 1, 32, 32)
        terms["loss"].backward()
    assert not step.store.enabled and step.store.maps == {}  # the context reset the store
    text_lora = [p for n, p in models.text_encoder.named_parameters() if "lora_" in n]
    assert text_lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in text_lora)
    unet_lora = [p for n, p in models.unet.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet_lora)


def test_store_is_reset_when_the_step_fails(step_setup):
    step, _, batch = step_setup
    with pytest.raises(RuntimeError, match="boom"):
        with step(batch):
            raise RuntimeError("boom")
    assert not step.store.enabled and step.store.maps == {}


def test_attention_weight_zero_turns_capture_off(step_setup):
    step, _, batch = step_setup
    step.config = StepConfig(LossWeights(0.5, 0.2, 0.0))
    with step(batch) as output:
        assert output.losses["attention"].item() == 0 and output.attention_map is None
        assert not step.store.enabled and step.store.maps == {}


def test_prompt_ids_locate_the_token(step_setup):
    step, models, _ = step_setup
    position = step.prompt_ids.vstar_weights[0].nonzero().flatten().tolist()
    # <bos> a metal nut with sks: "sks" is the 6th token.
    assert position == [5] and step.prompt_ids.object[0, 5].item() == models.tokenizer.convert_tokens_to_ids("sks</w>")


def test_latent_cache_gives_the_same_losses_with_one_encode(step_setup):
    step, models, batch = step_setup
    batch = {**batch, "row_index": torch.tensor([0, 1])}
    encoded_batches = []
    real_encode = models.vae.encode
    models.vae.encode = lambda x, *a, **k: encoded_batches.append(len(x)) or real_encode(x, *a, **k)
    reference = step_losses(step, batch)
    step.latent_cache = LatentCache()
    first, second = step_losses(step, batch), step_losses(step, batch)
    assert encoded_batches == [6, 4, 2, 2]  # uncached: 3B; cache miss: 2B + B; cache hit: B
    for k in reference:  # same random draws; only the VAE batch sizes differ
        assert first[k] == pytest.approx(reference[k], rel=1e-5) and second[k] == pytest.approx(reference[k], rel=1e-5)


def test_channels_last_changes_the_layout_not_the_losses(step_setup):
    step, models, batch = step_setup
    set_memory_format(models, channels_last=False)
    reference = step_losses(step, batch)
    assert not models.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    set_memory_format(models, channels_last=True)
    conv_weights = [m.weight for model in (models.unet, models.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    for key, value in step_losses(step, batch).items():  # the per-sample seeds make the draws identical
        assert value == pytest.approx(reference[key], rel=1e-4), key


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_gives_the_eager_losses_and_gradients(step_setup):
    step, models, batch = step_setup

    def losses_and_grad():
        losses = step_losses(step, batch, backward=True)
        lora_b = next(p for n, p in models.unet.named_parameters() if "lora_B" in n and "up_blocks" in n)
        grad = lora_b.grad.clone()
        models.unet.zero_grad(set_to_none=True)
        models.text_encoder.zero_grad(set_to_none=True)
        return losses, grad

    eager, eager_grad = losses_and_grad()
    # Dynamo's graphs and AOT autograd's forward and backward graphs, as inductor receives them, without its C++ code
    # generation (minutes on a cold cache, 2 cores); the inductor speed-up is bench/train_step.py's.
    compile_models(models, backend="eager")
    compiled, compiled_grad = losses_and_grad()
    for key in eager:  # the attention term too: the [V*] capture works under dynamo
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3), key
    assert torch.allclose(compiled_grad, eager_grad, rtol=1e-2, atol=1e-6)
    assert "_orig_mod" not in "".join(models.unet.state_dict())  # compiled in place: same keys for saving
