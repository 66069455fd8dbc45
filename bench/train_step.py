#!/usr/bin/env python
"""Time one training step of DefectFill against the diffusers LoRA-example step it is compared with.

    python bench/train_step.py --preset cpu            # width-64 SD2-inpainting shape, 256 px, batch 1, fp32
    python bench/train_step.py --preset sd2            # the real SD2-inpainting shape, 512 px, batch 4, bf16 (GPU)

Variants, all with the same models, LoRA (rank 8 on the UNet attention and the text encoder), batch,
resolution and dtype, timed interleaved (one step of each per round; median over rounds):
- baseline: a step as diffusers' LoRA examples write it: two VAE encodes (image, masked image), one
  inpainting UNet pass, SDPA attention, MSE on the noise.
- naive:    DefectFill as the public re-implementations write it: three separate VAE encodes, two UNet
  passes, the classic (non-SDPA) attention processor on every cross-attention layer, storing every map.
- ours:     `defectfill.step.DefectFillStep` (imported, not copied): one VAE call for the three
  images, one UNet call of batch 2B, [V*] capture on the decoder cross-attention of the object half only,
  channels-last convolution weights (the training script's default, `defectfill.models.set_memory_format`).
- ours_contiguous: the same step with `--no-channels_last` (the layout baseline and naive use).
- ours_compiled: the same step with `--torch_compile` (`defectfill.models.compile_models`), on a copy of the
  models (compiling is in place); compiles in the warm-up rounds (`--no-compile` skips it).
- ours_no_capture: the same with the attention loss off (capture overhead = ours / ours_no_capture - 1).
Each step includes backward and an AdamW step.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
from common import PRESETS, build_components, machine_description, synchronize

from defectfill.attention import VStarAttentionStore, install_vstar_capture
from defectfill.masks import mask_to_latent
from defectfill.method import DEFAULT_TOKEN, LossWeights, attention_loss, defect_loss, object_loss, random_box_mask, total_loss
from defectfill.models import Models, add_lora_adapters, compile_models, set_memory_format
from defectfill.step import DefectFillStep, LatentCache, StepConfig, build_prompt_ids, encode_latents


class NaiveStoringProcessor:
    """What re-implementations do: classic attention (baddbmm + softmax) on every cross-attention layer,
    every map kept (all heads, all tokens) for both branches."""

    def __init__(self, name: str, maps: dict):
        self.name, self.maps = name, maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probabilities = attn.get_attention_scores(query, key, None)
        self.maps.setdefault(self.name, []).append(probabilities)
        hidden = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](hidden))


def make_batch(preset, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(preset.batch, 3, preset.resolution, preset.resolution, generator=generator) * 2 - 1
    masks = torch.zeros(preset.batch, 1, preset.resolution, preset.resolution)
    side = preset.resolution // 5
    masks[..., side : 2 * side, side : 2 * side] = 1
    return {"pixel_values": images.to(device, preset.dtype), "masks": masks.to(device, preset.dtype),
            "row_index": torch.arange(preset.batch), "sample_seed": torch.arange(preset.batch) + 1000}


def add_lora(models, rank=8):
    add_lora_adapters(models, rank, 2 * rank)
    from diffusers.training_utils import cast_training_params

    cast_training_params([models.unet, models.text_encoder], dtype=torch.float32)
    params = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5)


def optimizer_step(loss, optimizer):
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def baseline_step(models, batch, prompt_ids, optimizer, device):
    images, masks = batch["pixel_values"], batch["masks"]
    latents = encode_latents(models.vae, images)
    masked = encode_latents(models.vae, images * (1 - masks))
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (len(latents),), device=device)
    noisy = models.noise_scheduler.add_noise(latents, noise, t)
    mask = mask_to_latent(masks, latents.shape[-2:])
    embeds = models.text_encoder(prompt_ids.object.to(device))[0].expand(len(latents), -1, -1)
    prediction = models.unet(torch.cat([noisy, mask, masked], 1), t, embeds, return_dict=False)[0]
    optimizer_step(F.mse_loss(prediction.float(), noise.float()), optimizer)


def naive_step(models, batch, prompt_ids, optimizer, device, maps, config):
    images, masks = batch["pixel_values"], batch["masks"]
    b, _, h, w = images.shape
    random_masks = random_box_mask(b, h, w).to(device, images.dtype)
    latents = encode_latents(models.vae, images)
    defect_background = encode_latents(models.vae, images * (1 - masks))
    object_background = encode_latents(models.vae, images * (1 - random_masks))
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (b,), device=device)
    noisy = models.noise_scheduler.add_noise(latents, noise, t)
    size = latents.shape[-2:]
    mask, random_mask = mask_to_latent(masks, size), mask_to_latent(random_masks, size)
    defect_embeds = models.text_encoder(prompt_ids.defect.to(device))[0].expand(b, -1, -1)
    object_embeds = models.text_encoder(prompt_ids.object.to(device))[0].expand(b, -1, -1)
    maps.clear()
    defect_pred = models.unet(torch.cat([noisy, mask, defect_background], 1), t, defect_embeds, return_dict=False)[0]
    maps.clear()
    object_pred = models.unet(torch.cat([noisy, random_mask, object_background], 1), t, object_embeds, return_dict=False)[0]
    position = int(prompt_ids.vstar_weights[0].argmax())
    decoder = []
    for name, layer_maps in maps.items():
        if name.startswith("up_blocks"):
            probabilities = layer_maps[-1]  # (B * heads, N, K)
            per_head = probabilities[..., position].reshape(b, -1, probabilities.shape[1])
            side = int(per_head.shape[-1] ** 0.5)
            decoder.append(F.interpolate(per_head.mean(1).reshape(b, 1, side, side).float(), size=tuple(size), mode="bilinear"))
    attention = torch.stack(decoder).mean(0)
    terms = {"defect": defect_loss(defect_pred.float(), noise.float(), mask),
             "object": object_loss(object_pred.float(), noise.float(), mask),
             "attention": attention_loss(attention, mask)}
    optimizer_step(total_loss(terms, config.loss_weights), optimizer)


def ours_step(models, batch, prompt_ids, optimizer, store, config, latent_cache=None):
    step = DefectFillStep(models.unet, models.vae, models.text_encoder, models.noise_scheduler, prompt_ids, config, store,
                             latent_cache)
    with step(batch) as output:
        output.losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def model_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="Model size, resolution, batch and dtype.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds (one step of each variant per round).")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Enable UNet gradient checkpointing in every variant.")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="Also time ours with --torch_compile (compiles in the warm-up rounds; --no-compile skips it).")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="The GPU's dense bf16 peak, for MFU (H100 SXM: 989).")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, text_encoder, vae, unet, scheduler = build_components(preset, device)
    models = Models(tokenizer, text_encoder, vae, unet, scheduler)
    optimizer = add_lora(models)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    models.unet.train()
    batch = make_batch(preset, device)
    prompt_ids = build_prompt_ids(tokenizer, "metal_nut", DEFAULT_TOKEN)
    config = StepConfig()  # the paper's weights, boxes and alpha
    no_capture = StepConfig(LossWeights(0.5, 0.2, 0.0))
    sdpa = dict(unet.attn_processors)
    store, naive_maps, latent_cache = VStarAttentionStore(), {}, LatentCache()

    # Layout changes happen here, outside the timed step: baseline and naive use the default layout.
    def with_sdpa():
        set_memory_format(models, channels_last=False)
        unet.set_attn_processor(dict(sdpa))

    def with_capture(channels_last=True):
        set_memory_format(models, channels_last)
        unet.set_attn_processor(dict(sdpa))
        install_vstar_capture(unet, store)

    def with_naive():
        set_memory_format(models, channels_last=False)
        processors = {name: NaiveStoringProcessor(name[: -len(".processor")], naive_maps) if ".attn2." in name else sdpa[name]
                      for name in sdpa}
        unet.set_attn_processor(processors)

    variants = {
        "baseline": (with_sdpa, lambda: baseline_step(models, batch, prompt_ids, optimizer, device)),
        "naive": (with_naive, lambda: naive_step(models, batch, prompt_ids, optimizer, device, naive_maps, config)),
        "ours": (with_capture, lambda: ours_step(models, batch, prompt_ids, optimizer, store, config)),
        "ours_no_capture": (with_capture, lambda: ours_step(models, batch, prompt_ids, optimizer, store, no_capture)),
        "ours_cached_latents": (with_capture, lambda: ours_step(models, batch, prompt_ids, optimizer, store, config, latent_cache)),
        "ours_contiguous": (lambda: with_capture(channels_last=False),
                            lambda: ours_step(models, batch, prompt_ids, optimizer, store, config)),
    }
    if args.compile:
        import copy

        compiled = Models(tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(vae), copy.deepcopy(unet), scheduler)
        compiled_optimizer = torch.optim.AdamW([p for m in (compiled.unet, compiled.text_encoder) for p in m.parameters()
                                                if p.requires_grad], lr=1e-5)
        compiled_store = VStarAttentionStore()
        compiled.unet.set_attn_processor(dict(sdpa))
        install_vstar_capture(compiled.unet, compiled_store)
        set_memory_format(compiled, channels_last=True)
        compile_models(compiled)
        variants["ours_compiled"] = (lambda: None, lambda: ours_step(compiled, batch, prompt_ids, compiled_optimizer,
                                                                     compiled_store, config))
    import statistics
    import time

    times = {name: [] for name in variants}
    peaks = {}
    for round_index in range(args.warmup + args.repeats):
        for name, (setup, step) in variants.items():
            setup()
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device) / 2**30)
    medians = {name: statistics.median(values) for name, values in times.items()}

    with_capture()
    flops = model_flops(variants["ours"][1])
    result = {"preset": preset.name, "device": machine_description(device), "medians_s": medians, "peak_gb": peaks,
              "ours_over_baseline": medians["ours"] / medians["baseline"], "ours_over_naive": medians["ours"] / medians["naive"],
              "naive_over_baseline": medians["naive"] / medians["baseline"],
              "capture_overhead": medians["ours"] / medians["ours_no_capture"] - 1, "ours_tflop_per_step": flops / 1e12,
              "cached_over_baseline": medians["ours_cached_latents"] / medians["baseline"],
              "cached_over_naive": medians["ours_cached_latents"] / medians["naive"],
              "contiguous_over_baseline": medians["ours_contiguous"] / medians["baseline"],
              "contiguous_over_naive": medians["ours_contiguous"] / medians["naive"]}
    if "ours_compiled" in medians:
        result["compiled_over_baseline"] = medians["ours_compiled"] / medians["baseline"]
        result["compiled_over_naive"] = medians["ours_compiled"] / medians["naive"]
    if device.type == "cuda":
        result["mfu"] = flops / medians["ours"] / (args.peak_tflops * 1e12)
    print_report(result, args, preset)
    return result


def print_report(result: dict, args, preset) -> None:
    print(f"# bench/train_step.py --preset {preset.name}  ({datetime.date.today()}, {result['device']})")
    print(f"resolution {preset.resolution}, batch {preset.batch}, {preset.dtype}, LoRA rank 8, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.repeats} interleaved rounds after {args.warmup}")
    print("| variant | median step (s) | peak memory (GB) |")
    print("|---|---|---|")
    for name, seconds in result["medians_s"].items():
        peak = result["peak_gb"].get(name)
        print(f"| {name} | {seconds:.3f} | {'n/a (CPU)' if peak is None else f'{peak:.2f}'} |")
    print(f"ours / baseline: {result['ours_over_baseline']:.2f}x   (target <= 1.7)")
    print(f"ours / naive:    {result['ours_over_naive']:.2f}x   (target <= 0.85)")
    print(f"naive / baseline: {result['naive_over_baseline']:.2f}x")
    print(f"ours with cached latents (--max_scale 1): {result['cached_over_baseline']:.2f}x baseline, "
          f"{result['cached_over_naive']:.2f}x naive")
    print(f"ours with --no-channels_last: {result['contiguous_over_baseline']:.2f}x baseline, "
          f"{result['contiguous_over_naive']:.2f}x naive")
    if "compiled_over_naive" in result:
        print(f"ours with --torch_compile: {result['compiled_over_baseline']:.2f}x baseline, "
              f"{result['compiled_over_naive']:.2f}x naive   (target <= 0.85)")
    print(f"capture overhead: {100 * result['capture_overhead']:+.1f}%   (target <= 5%)")
    print(f"model FLOPs of our step: {result['ours_tflop_per_step']:.3f} TFLOP" +
          (f", MFU {100 * result['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s" if "mfu" in result else ""))


if __name__ == "__main__":
    main()
