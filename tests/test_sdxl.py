"""SDXL inpainting on a tiny offline model: the model itself, the conditioning functions against what the pipeline
feeds its UNet, the [V*] attention capture on SDXL's decoder, and a LoRA on the UNet and both text encoders written
as `StableDiffusionXLInpaintPipeline.save_lora_weights` writes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from defectfill import sdxl
from defectfill.attention import VStarAttentionStore, install_vstar_capture, remove_vstar_capture
from defectfill.bases import detect_base_family
from defectfill.errors import InpaintingModelError

PROMPT = "A photo of a bottle with sks"
SIZE = 64


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path):
    """The tiny SDXL-inpainting pipeline as users load one; tests must not modify it."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipeline = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def clean_and_mask():
    image = Image.new("RGB", (SIZE, SIZE), (128, 100, 60))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 40, 40))
    return image, mask


def paint(pipeline, **kwargs) -> np.ndarray:
    image, mask = clean_and_mask()
    return pipeline(PROMPT, image=image, mask_image=mask, num_inference_steps=2, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_the_tiny_sdxl_model_reloads_offline_paints_and_is_detected_as_sdxl(pipe, tiny_sdxl_path):
    result = paint(pipe)
    assert result.shape == (1, SIZE, SIZE, 3) and np.isfinite(result).all()
    base = detect_base_family(str(tiny_sdxl_path))
    assert (base.family, base.pipeline_class, base.has_text_encoder_2, base.unet_in_channels) == (
        "sdxl", "StableDiffusionXLInpaintPipeline", True, 9)


def unet_inputs_of_a_pipeline_call(pipeline, **kwargs) -> dict:
    """The keyword arguments the pipeline's first UNet call received."""
    seen = {}

    def keep(module, args, call_kwargs):
        seen.setdefault("call", call_kwargs)  # the pipeline passes encoder_hidden_states and added_cond_kwargs by name

    handle = pipeline.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        paint(pipeline, **kwargs)
    finally:
        handle.remove()
    return seen["call"]


def test_conditioning_is_what_the_pipeline_feeds_its_unet(pipe):
    """guidance 1: no unconditional half, so the pipeline's UNet rows are the prompt's own."""
    fed = unet_inputs_of_a_pipeline_call(pipe, guidance_scale=1.0)
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    with torch.no_grad():
        hidden, added = sdxl.conditioning(encoders, sdxl.tokenize_prompts(tokenizers, [PROMPT]), [(SIZE, SIZE)], (SIZE, SIZE))
    assert hidden.shape == (1, 77, 64)  # two 32-wide encoders, concatenated per position
    assert torch.equal(hidden, fed["encoder_hidden_states"])
    assert torch.equal(added["text_embeds"], fed["added_cond_kwargs"]["text_embeds"])
    assert torch.equal(added["time_ids"], fed["added_cond_kwargs"]["time_ids"])
    assert added["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]]


def test_the_prompt_embeddings_match_encode_prompt(pipe):
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    with torch.no_grad():
        ours, ours_pooled = sdxl.encode_prompt_ids((pipe.text_encoder, pipe.text_encoder_2),
                                                   sdxl.tokenize_prompts((pipe.tokenizer, pipe.tokenizer_2), [PROMPT]))
    assert torch.equal(ours, embeds) and torch.equal(ours_pooled, pooled)


def test_a_training_batch_of_two_branches_runs_in_one_unet_call_with_gradients(pipe):
    """Defect and object rows, each with its prompt and sizes, in one UNet call; the loss reaches the text encoders."""
    prompts, sizes, corners = ["A bottle with sks", "A photo of a bottle"], [(700, 700), (64, 64)], [(12, 30), (0, 0)]
    ids = sdxl.tokenize_prompts((pipe.tokenizer, pipe.tokenizer_2), prompts)
    pipe.text_encoder_2.requires_grad_(True)
    try:
        hidden, added = sdxl.conditioning((pipe.text_encoder, pipe.text_encoder_2), ids, sizes, (SIZE, SIZE), corners)
        latents = torch.randn(2, 9, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
        prediction = pipe.unet(latents, torch.tensor([10, 500]), hidden, added_cond_kwargs=added).sample
        prediction.square().mean().backward()
        assert prediction.shape == (2, 4, SIZE // 2, SIZE // 2)
        assert added["time_ids"].tolist() == [[700, 700, 12, 30, SIZE, SIZE], [SIZE, SIZE, 0, 0, SIZE, SIZE]]
        assert pipe.text_encoder_2.text_projection.weight.grad.abs().sum() > 0
    finally:
        pipe.text_encoder_2.requires_grad_(False)
        pipe.text_encoder_2.zero_grad(set_to_none=True)


def test_the_added_conditioning_dimensions_are_checked(pipe, tiny_pipeline):
    sdxl.check_added_conditioning(pipe.unet, pipe.text_encoder_2.config.projection_dim)
    with pytest.raises(InpaintingModelError, match="aesthetic-score"):
        sdxl.check_added_conditioning(pipe.unet, pipe.text_encoder_2.config.projection_dim + 8)
    with pytest.raises(InpaintingModelError, match="not an SDXL UNet"):
        sdxl.check_added_conditioning(tiny_pipeline.unet, 32)


def test_the_vstar_token_sits_at_the_same_positions_in_both_tokenizations(pipe):
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    weights = sdxl.vstar_weights(tokenizers, sdxl.tokenize_prompts(tokenizers, [PROMPT, "sks on a bottle"]), "sks")
    assert weights.shape == (2, 77) and weights[0, 7] == 1 and weights[1, 1] == 1 and weights.sum() == 2


def test_the_vstar_capture_records_every_decoder_layer_of_sdxl_and_changes_nothing(pipe):
    """SDXL's decoder blocks hold several transformer layers each (here 3 attentions x 2 layers at one level): all are
    captured, each map placed on the latent grid, and the UNet's output is the one without the capture."""
    tokenizers, encoders = (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)
    ids = sdxl.tokenize_prompts(tokenizers, [PROMPT])
    latent = SIZE // 2
    latents = torch.randn(1, 9, latent, latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, added = sdxl.conditioning(encoders, ids, [(SIZE, SIZE)], (SIZE, SIZE))
        plain = pipe.unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
    store = VStarAttentionStore()
    names = install_vstar_capture(pipe.unet, store)
    try:
        assert names == [f"up_blocks.0.attentions.{a}.transformer_blocks.{t}.attn2" for a in range(3) for t in range(2)]
        with torch.no_grad(), store.recording(sdxl.vstar_weights(tokenizers, ids, "sks"), (latent, latent)):
            captured = pipe.unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
            maps, aggregate = dict(store.maps), store.aggregate()
    finally:
        remove_vstar_capture(pipe.unet)
    assert sorted(maps) == sorted(names) and all(m.shape == (1, 1, latent // 2, latent // 2) for m in maps.values())
    assert aggregate.shape == (1, 1, latent, latent) and 0 < aggregate.min() and aggregate.max() < 1
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)


def test_a_lora_on_the_unet_and_both_text_encoders_saves_as_sdxl_does_and_changes_the_painting(pipe, tiny_sdxl_path, tmp_path):
    """The recipe's LoRA targets exist on SDXL's UNet and on both CLIP encoders; the file has `unet.`, `text_encoder.`
    and `text_encoder_2.` keys and `load_lora_weights` loads all of it into a fresh pipeline."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    from defectfill.models import TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS
    from defectfill.runs.lora import lora_layers

    trained = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_path)
    layers = {}
    for name, targets in (("unet", UNET_LORA_TARGETS), ("text_encoder", TEXT_ENCODER_LORA_TARGETS),
                          ("text_encoder_2", TEXT_ENCODER_LORA_TARGETS)):
        model = getattr(trained, name)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:  # trained LoRAs have non-zero up matrices
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        layers[f"{name}_lora_layers"] = lora_layers(model)
    StableDiffusionXLInpaintPipeline.save_lora_weights(tmp_path, safe_serialization=True, **layers)

    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    prefixes = {key.split(".")[0] for key in keys}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert sum(key.startswith("unet.") for key in keys) == 2 * 4 * 2 * 6 * 2  # A, B x 4 targets x attn1/2 x 6 layers x down/up
    assert sum(key.startswith("text_encoder_2.") for key in keys) == 2 * 4 * 5  # A, B x 4 projections x 5 layers

    before = paint(pipe)
    fresh = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_path)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(fresh.get_list_adapters())
    assert np.abs(paint(fresh) - before).max() > 1e-3


def test_the_bench_s_sdxl_inpainting_configs_build_the_published_shape():
    """bench/sdxl_inpainting_configs.json (the real model's component configs, sources cited in it) builds, on the
    meta device, SDXL inpainting's parameter counts, a 9-channel UNet whose added embedding takes 6 time ids x 256 + the
    1280-wide pooled text embedding, and 36 decoder cross-attention layers for the [V*] capture (3 x 10 + 3 x 2)."""
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from defectfill.attention import decoder_cross_attention_modules
    from tests.conftest import REPO_ROOT

    configs = json.loads((REPO_ROOT / "bench" / "sdxl_inpainting_configs.json").read_text())
    fields = {name: {k: v for k, v in config.items() if not k.startswith("_")} for name, config in configs.items() if name != "_about"}
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel(**fields["unet"]), "vae": AutoencoderKL(**fields["vae"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**fields["text_encoder"])),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**fields["text_encoder_2"]))}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {"unet": 2_567_478_084, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    unet = models["unet"]
    assert unet.config.in_channels == 9 and unet.add_embedding.linear_1.in_features == 6 * 256 + 1280
    layers = decoder_cross_attention_modules(unet)
    assert len(layers) == 36 and sum(name.startswith("up_blocks.0.") for name in layers) == 30
