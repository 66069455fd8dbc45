#!/usr/bin/env python
"""Images per second of plain `StableDiffusionInpaintPipeline` against our synthesis
(`infer_defectfill.synthesize`: crop, 8 candidates in one batched call, LPIPS selection, composite,
atomic saves), per generated and per kept image.

    python bench/inference.py                      # the bundled tiny model, 64 px, on the CPU
    python bench/inference.py --model stabilityai/stable-diffusion-2-inpainting --resolution 512   # a GPU

Both sides run the same model, resolution, steps, guidance and number of images per call; timed
interleaved, median over rounds. LPIPS runs with its real code; offline its AlexNet backbone is random
(`--lpips_random_backbone`), which costs the same.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from PIL import Image

from common import REPO_ROOT, TINY_MODEL, machine_description, synchronize

import synthesis

DATA = REPO_ROOT / "data" / "synthetic_mvtec" / "metal_nut"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL), help="Inpainting model (folder or Hub id).")
    parser.add_argument("--resolution", type=int, default=64, help="Generation resolution.")
    parser.add_argument("--num_candidates", type=int, default=8, help="Candidates per (image, mask).")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--lpips_random_backbone", action=argparse.BooleanOptionalAction, default=True,
                        help="LPIPS with a random AlexNet (offline); same cost as the pretrained one.")
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionInpaintPipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipeline = StableDiffusionInpaintPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                              requires_safety_checker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)
    scorer = synthesis.LpipsModel("alex", device, pretrained_backbone=not args.lpips_random_backbone).masked_scores
    image_path, mask_path = DATA / "test" / "good" / "000.png", DATA / "ground_truth" / "color" / "003_mask.png"
    image = Image.open(image_path).convert("RGB").resize((args.resolution, args.resolution))
    mask = Image.open(mask_path).convert("L").resize((args.resolution, args.resolution), Image.NEAREST)
    settings = synthesis.SynthesisSettings("A metal nut with sks", args.resolution, args.num_candidates,
                                           args.num_inference_steps, crop_to_mask=True)

    def plain():
        pipeline("A metal nut with sks", image=image, mask_image=mask, height=args.resolution, width=args.resolution,
                 num_inference_steps=args.num_inference_steps, num_images_per_prompt=args.num_candidates,
                 generator=torch.Generator(device).manual_seed(0))

    def ours():  # the synthesis core with its file reading (the CLI's saving excluded)
        with Image.open(image_path) as clean, Image.open(mask_path) as defect_mask:
            job = synthesis.prepare_job(clean, defect_mask, 0, settings)
        synthesis.synthesize(pipeline, [job], settings, scorer)

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


if __name__ == "__main__":
    main()
