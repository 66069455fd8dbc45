#!/usr/bin/env python
"""Peak memory and time of one training step of the real SDXL-inpainting shape beside the SD2-inpainting shape, on
a CPU at 512 px with gradient checkpointing, random weights, offline. Each shape runs in its own subprocess, which
reports its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and the step's wall time.

    PYTHONPATH=$PWD python bench/sdxl_memory.py                       # sd2 and sdxl at 512 px, batch 1; writes
                                                                       # outputs/sdxl_memory/sdxl_memory.{json,md}
    PYTHONPATH=$PWD python bench/sdxl_memory.py --results_md bench/RESULTS.md   # and appends the markdown there

On a CPU shared with other jobs run it with OMP_NUM_THREADS=1: with more threads than free cores, torch's OpenMP
threads wait on each other and a step takes many times longer.

What a step is here. SDXL's DefectFill training step (`defectfill.step` on SDXL) was being written in parallel when
this script was, so it measures what dominates a step's memory directly with diffusers and peft, as the recipe sets
it up (`defectfill.models` targets, rank 8 / alpha 16, gradient checkpointing on the UNet and the text encoders):
- frozen weights in bf16 (the UNet, the VAE, the text encoder(s); what `--mixed_precision bf16` casts them to), the
  LoRA parameters in fp32 (`cast_training_params`), the step under CPU autocast to bf16, as accelerate runs it;
- one VAE encode (no grad) of 3 x batch images (image, masked image, and the object branch's image: DefectFill's one
  VAE call), the text encoders forward with their LoRA (grad), one UNet call of 2 x batch rows (defect and object
  branch) with SDXL's `added_cond_kwargs` (pooled embeddings and time ids, `defectfill.sdxl`), MSE on the noise,
  backward, and an AdamW step on the LoRA parameters;
- not measured: the [V*] attention capture and the attention loss (a few small maps), the 8-bit optimizer (the LoRA
  state is small either way), the first step's compile-free warm-up beyond this one step.
The weights are built on the meta device (`accelerate.init_empty_weights`), cast to bf16 there, allocated with
`to_empty` and filled by a fast init (normal / sqrt(fan_in), norms 1, biases 0): initialising 2.5B parameters with
torch's defaults takes minutes. One step is timed (the first: there is no memory left for two runs on a shared
machine); peak memory is reached in it. Components come from `bench/sdxl_inpainting_configs.json` (SDXL inpainting)
and `bench/common.py` (SD2 inpainting).

`bench/gpu_check.py` imports `build_shape` and `training_step` for its SDXL part (1024 px, bf16, 8-bit Adam).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SDXL_CONFIGS = REPO_ROOT / "bench" / "sdxl_inpainting_configs.json"
PROMPT_LENGTH = 77


@dataclass
class Shape:
    """A base's components with random weights: the UNet, the VAE, the text encoders (one for SD, two for SDXL)."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    vocab_size: int

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def configs(name: str) -> dict:
    """Component configs (no bookkeeping keys) of a shape: "sdxl" (the real SDXL inpainting), "sd2" (the real SD2
    inpainting), "sdxl_tiny" (SDXL's structure at width 32/64, the smoke run's)."""
    if name == "sdxl":
        raw = json.loads(SDXL_CONFIGS.read_text())
        return {key: {k: v for k, v in value.items() if not k.startswith("_")} for key, value in raw.items() if key != "_about"}
    text = dict(hidden_act="gelu", max_position_embeddings=PROMPT_LENGTH, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if name == "sd2":
        from common import SD2_UNET, SD2_VAE

        return {"unet": SD2_UNET, "vae": SD2_VAE, "text_encoder": dict(text, vocab_size=49408, hidden_size=1024,
                intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=1024)}
    if name == "sdxl_tiny":
        small = dict(text, vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                     projection_dim=32)
        unet = dict(sample_size=32, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                    cross_attention_dim=64)
        vae = dict(block_out_channels=(32, 64), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
        return {"unet": unet, "vae": vae, "text_encoder": small, "text_encoder_2": small}
    raise ValueError(f"unknown shape {name!r} (sd2, sdxl, sdxl_tiny)")


def fast_init_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill allocated-but-empty parameters: weights normal / sqrt(fan_in), 1-D weights (norms) 1, biases 0."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, fan_in**-0.5, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)


def empty_then_fill(build, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """`build()` on the meta device, cast there, allocated on `device` (`to_empty`) and filled (`fast_init_`); the
    buffers built for real (position ids) are put back."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to(dtype=dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            saved = buffers[name]
            buffer.copy_(saved.to(buffer.dtype) if saved.is_floating_point() else saved)
    fast_init_(model, torch.Generator(device=device).manual_seed(seed))
    model.requires_grad_(False)
    return model


def build_shape(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Shape:
    """The shape's components with random weights in `dtype` on `device` (frozen)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = configs(name)
    unet = empty_then_fill(lambda: UNet2DConditionModel(**parts["unet"]), dtype, device, 0)
    vae = empty_then_fill(lambda: AutoencoderKL(**parts["vae"]), dtype, device, 1)
    encoders = [empty_then_fill(lambda: CLIPTextModel(CLIPTextConfig(**parts["text_encoder"])), dtype, device, 2)]
    if "text_encoder_2" in parts:
        encoders.append(empty_then_fill(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**parts["text_encoder_2"])),
                                        dtype, device, 3))
    return Shape(name, unet, vae, encoders, parts["text_encoder"]["vocab_size"])


def add_lora(shape: Shape, rank: int = 8, alpha: int = 16, checkpointing: bool = True) -> list[torch.nn.Parameter]:
    """The recipe's LoRA on the UNet and every text encoder (fp32 parameters), gradient checkpointing on; returns the
    trained parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from defectfill.models import TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS

    shape.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    for encoder in shape.text_encoders:
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS))
    models = [shape.unet, *shape.text_encoders]
    cast_training_params(models, dtype=torch.float32)
    if checkpointing:
        shape.unet.enable_gradient_checkpointing()
        for encoder in shape.text_encoders:
            encoder.gradient_checkpointing_enable()
    for model in models:
        model.train()
    return [p for model in models for p in model.parameters() if p.requires_grad]


def training_step(shape: Shape, optimizer, batch: int, resolution: int, device: torch.device, seed: int = 0) -> float:
    """One step (see the module docstring) under bf16 autocast; returns the loss."""
    from defectfill import sdxl

    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = (torch.rand(3 * batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device, torch.bfloat16)
    input_ids = torch.randint(3, shape.vocab_size, (2 * batch, PROMPT_LENGTH), generator=generator).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            latents = shape.vae.encode(images).latent_dist.sample() * shape.vae.config.scaling_factor
        side = latents.shape[-1]
        target, masked, _ = latents.float().chunk(3)
        noise = torch.randn(2 * batch, 4, side, side, generator=generator).to(device)
        mask = torch.zeros(2 * batch, 1, side, side, device=device)
        mask[..., side // 4 : side // 2, side // 4 : side // 2] = 1
        sample = torch.cat([noise + torch.cat([target, target]), mask, torch.cat([masked, masked])], dim=1)
        timesteps = torch.randint(0, 1000, (2 * batch,), generator=generator).to(device)
        if shape.is_sdxl:
            hidden, pooled = sdxl.encode_prompt_ids(shape.text_encoders, [input_ids, input_ids])
            ids = sdxl.time_ids([(resolution, resolution)] * (2 * batch), (resolution, resolution), device=device)
            added = sdxl.added_cond_kwargs(pooled, ids)
        else:
            hidden, added = shape.text_encoders[0](input_ids)[0], None
        prediction = shape.unet(sample, timesteps, hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_here(name: str, resolution: int, batch: int) -> dict:
    """Build, one step, figures: in the calling process (the parent runs this in a fresh subprocess per shape)."""
    device = torch.device("cpu")
    started = time.perf_counter()
    after_import = peak_rss_gib()
    shape = build_shape(name, device)
    counts = {"unet": sum(p.numel() for p in shape.unet.parameters()), "vae": sum(p.numel() for p in shape.vae.parameters()),
              "text_encoders": sum(p.numel() for e in shape.text_encoders for p in e.parameters())}
    params = add_lora(shape)
    built_s, after_build = time.perf_counter() - started, peak_rss_gib()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    step_started = time.perf_counter()
    loss = training_step(shape, optimizer, batch, resolution, device)
    return {"shape": name, "resolution": resolution, "batch": batch, "parameters": counts, "load_average": os.getloadavg(),
            "lora_parameters": sum(p.numel() for p in params), "build_s": round(built_s, 1),
            "step_s": round(time.perf_counter() - step_started, 1), "loss": loss, "threads": torch.get_num_threads(),
            "peak_rss_gib": {"after_import": round(after_import, 2), "after_build": round(after_build, 2),
                             "after_step": round(peak_rss_gib(), 2)}}


def markdown(rows: list[dict], machine: str, command: str) -> str:
    lines = [f"## {datetime.date.today().isoformat()} — {machine}, torch {torch.__version__}", "",
             f"### `{command}`", "",
             "One training step per shape, each in its own process (see the script's docstring for what a step is: "
             "frozen weights bf16, LoRA rank 8 fp32, gradient checkpointing, bf16 autocast, UNet batch = 2 x images), "
             f"{rows[0].get('threads', '?')} torch thread(s). "
             "Load average (1, 5, 15 min) at the end of each step: "
             + "; ".join(f"{r['shape']} {', '.join(f'{x:.1f}' for x in r['load_average'])}" for r in rows if "load_average" in r)
             + " (the step times are of a shared machine: compare them within this table only).", "",
             "| shape | px | images | UNet params | text encoder params | peak RSS after import (GiB) | after building (GiB) | "
             "peak RSS of the step (GiB) | build (s) | step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | | | | | failed: `{r['error']}` | | | | |")
            continue
        rss = r["peak_rss_gib"]
        lines.append(f"| {r['shape']} | {r['resolution']} | {r['batch']} | {r['parameters']['unet'] / 1e9:.2f} B | "
                     f"{r['parameters']['text_encoders'] / 1e6:.0f} M | {rss['after_import']:.2f} | {rss['after_build']:.2f} | "
                     f"{rss['after_step']:.2f} | {r['build_s']:.0f} | {r['step_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="sd2,sdxl", help="Comma-separated shapes: sd2, sdxl, sdxl_tiny.")
    parser.add_argument("--resolution", type=int, default=512, help="Image size in pixels.")
    parser.add_argument("--batch", type=int, default=1, help="Defect images per step (the UNet sees twice as many rows).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "sdxl_memory"), help="Where the JSON and markdown go.")
    parser.add_argument("--results_md", default=None, help="Also append the markdown to this file (bench/RESULTS.md).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure_here(args.child, args.resolution, args.batch)), flush=True)
        return []
    from common import machine_description

    rows = []
    for name in args.shapes.split(","):
        command = [sys.executable, __file__, "--child", name, "--resolution", str(args.resolution), "--batch", str(args.batch)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][len("RESULT "):]) if done.returncode == 0 and lines else {
            "shape": name, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "sdxl_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, machine_description(torch.device("cpu")), "python bench/sdxl_memory.py " + " ".join(argv or sys.argv[1:]))
    (output / "sdxl_memory.md").write_text(text)
    if args.results_md:
        with open(args.results_md, "a") as handle:
            handle.write("\n" + text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
