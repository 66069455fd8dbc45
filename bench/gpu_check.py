#!/usr/bin/env python
"""The GPU check, one command of a few minutes: on the SD2-inpainting shape (random weights from its config) at
512 px in bf16,

1. the training step: ours (`defectfill.step.DefectFillStep`) against the one-pass baseline and the naive step
   (`bench/train_step.py`'s variants, median of interleaved rounds), its model FLOPs (torch's FLOP counter) and MFU;
2. the peak memory of our step at batch 4: plain, with gradient checkpointing, with 8-bit Adam (when bitsandbytes
   imports), with both;
3. synthesis per kept image: the paper's 8 candidates x 50 steps scored finished against the fast defaults of
   configs/tiny_infer.yaml (`bench/inference.py`'s fast part), UNet passes and wall time;
4. SDXL inpainting (random weights from bench/sdxl_inpainting_configs.json) at 1024 px: one training step
   (`bench/sdxl_memory.py`'s step: frozen weights bf16, LoRA fp32, gradient checkpointing, bf16 autocast) with 8-bit
   Adam (AdamW where bitsandbytes does not import: the table says which), batch 1 and 2: peak memory and step time,
   against the 24 GB of the cards users have.

    bash bench/gpu_check.sh                       # on the GPU machine: installs bench/wheels/*.whl, then this
    python bench/gpu_check.py --smoke             # the same code on a CPU with the tiny model, in seconds

Each figure is printed as it is measured, and `gpu_check.json` and `gpu_check.md` (in `--output_dir`) are rewritten
after each part, so a run cut short still holds what it measured. `bench/RESULTS.md` says how to run it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import traceback
from pathlib import Path

import torch
from common import PRESETS, REPO_ROOT, machine_description, synchronize

# Dense bf16 peaks (TFLOP/s) for MFU; another device gets no MFU (say --peak_tflops).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


class Report:
    """The figures so far, written to JSON and markdown after every part."""

    def __init__(self, output_dir: Path, smoke: bool, device):
        self.output_dir, self.rows = output_dir, []
        self.data = {"date": datetime.date.today().isoformat(), "device": machine_description(device), "smoke": smoke,
                     "torch": torch.__version__, "parts": {}}
        output_dir.mkdir(parents=True, exist_ok=True)

    def add(self, part: str, figures: dict, lines: list[str]) -> None:
        self.data["parts"][part] = figures
        self.rows += [f"### {part}", "", *lines, ""]
        print("\n".join([f"### {part}", *lines]), flush=True)
        self.write()

    def fail(self, part: str, error: BaseException) -> None:
        self.data["parts"][part] = {"error": f"{type(error).__name__}: {error}"}
        self.rows += [f"### {part}", "", f"failed: `{type(error).__name__}: {error}`", ""]
        traceback.print_exc()
        self.write()

    def write(self) -> None:
        (self.output_dir / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        header = [f"## {self.data['date']}: `python bench/gpu_check.py` on {self.data['device']}, torch {self.data['torch']}"
                  + (" (smoke: the tiny model on a CPU)" if self.data["smoke"] else ""), ""]
        (self.output_dir / "gpu_check.md").write_text("\n".join(header + self.rows) + "\n")


def training_step_part(args) -> tuple[dict, list[str]]:
    import train_step

    argv = ["--preset", args.preset, "--repeats", str(args.repeats), "--warmup", "1", "--no-compile"]
    if args.peak_tflops:
        argv += ["--peak_tflops", str(args.peak_tflops)]
    result = train_step.main(argv)
    medians = result["medians_s"]
    lines = ["| variant | median step (s) | peak memory (GiB) |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.3f} | {result['peak_gb'].get(name, float('nan')):.1f} |" for name, seconds in medians.items()]
    mfu = f"{100 * result['mfu']:.1f} %" if "mfu" in result else "n/a (no known peak for this device)"
    lines += ["", f"ours / baseline {result['ours_over_baseline']:.2f}x, ours / naive {result['ours_over_naive']:.2f}x; "
                  f"{result['ours_tflop_per_step']:.2f} TFLOP a step of ours, MFU {mfu}"]
    return result, lines


def memory_part(args, device) -> tuple[dict, list[str]]:
    """Peak memory of our step at the preset's batch: plain, gradient checkpointing, 8-bit Adam, both."""
    import train_step
    from common import build_components

    from defectfill.attention import VStarAttentionStore, install_vstar_capture
    from defectfill.method import DEFAULT_TOKEN
    from defectfill.models import Models, add_lora_adapters
    from defectfill.step import StepConfig, build_prompt_ids

    preset = PRESETS[args.preset]
    models = Models(*build_components(preset, device))
    add_lora_adapters(models, 8, 16)
    from diffusers.training_utils import cast_training_params

    cast_training_params([models.unet, models.text_encoder], dtype=torch.float32)
    store = VStarAttentionStore()
    install_vstar_capture(models.unet, store)
    batch = train_step.make_batch(preset, device)
    prompt_ids = build_prompt_ids(models.tokenizer, "metal_nut", DEFAULT_TOKEN)
    params = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
    try:
        import bitsandbytes

        eight_bit = bitsandbytes.optim.AdamW8bit
    except Exception as error:  # no wheel on this machine (or no CUDA build): say so, measure the rest
        eight_bit, why = None, f"{type(error).__name__}: {error}"
    figures, lines = {}, ["| setting | peak memory (GiB) |", "|---|---|"]
    for checkpointing in (False, True):
        for use_8bit in (False, True):
            name = ("gradient checkpointing" if checkpointing else "plain") + (" + 8-bit Adam" if use_8bit else "")
            if use_8bit and eight_bit is None:
                figures[name] = None
                lines.append(f"| {name} | n/a ({why}) |")
                continue
            models.unet.enable_gradient_checkpointing() if checkpointing else models.unet.disable_gradient_checkpointing()
            models.unet.train()
            optimizer = (eight_bit if use_8bit else torch.optim.AdamW)(params, lr=1e-5)
            for _ in range(2):  # the second step has the optimizer's state allocated
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                train_step.ours_step(models, batch, prompt_ids, optimizer, store, StepConfig())
                synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            figures[name] = peak
            lines.append(f"| {name} | {peak:.1f} |" if peak is not None else f"| {name} | n/a (CPU) |")
            del optimizer
    return figures, [f"batch {preset.batch}, {preset.resolution} px, {str(preset.dtype).replace('torch.', '')}, LoRA rank 8", "",
                     *lines]


def synthesis_part(args, device) -> tuple[dict, list[str]]:
    """The paper's synthesis against the fast defaults, per kept image."""
    import inference

    argv = ["--part", "fast", "--fast_repeats", "1" if args.smoke else str(args.repeats)]
    if args.smoke:  # the same code, a fraction of the work
        argv += ["--sd2_repeats", "0", "--paper_candidates", "3"]
    else:
        argv += ["--sd2_repeats", "1", "--sd2_resolution", str(PRESETS[args.preset].resolution)]
    result = inference.main(argv)["fast"]
    lines = ["| model | paper: UNet passes | paper: s | fast: UNet passes | fast: s | passes ratio | time ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        (paper_s, paper_passes), (fast_s, fast_passes) = row["paper"], row["fast"]
        lines.append(f"| {name}, {row['resolution']} px | {paper_passes:g} | {paper_s:.2f} | {fast_passes:g} | {fast_s:.2f} | "
                     f"{row['passes_ratio']:.2f}x | {row['time_ratio']:.2f}x |")
    return result, [f"fast defaults: {result['settings']}", "", *lines]


CONSUMER_CARD_GIB = 24 * 10**9 / 2**30  # a "24 GB" card, in GiB


def sdxl_part(args, device) -> tuple[dict, list[str]]:
    """SDXL inpainting at 1024 px (smoke: its structure at width 32, 64 px), batch 1 and 2: peak memory and the median
    step time after the first (which allocates the optimizer state)."""
    import sdxl_memory

    name, resolution = ("sdxl_tiny", 64) if args.smoke else ("sdxl", 1024)
    shape = sdxl_memory.build_shape(name, device)
    params = sdxl_memory.add_lora(shape)
    optimizer_class, optimizer_name = torch.optim.AdamW, "AdamW"
    if device.type == "cuda":
        try:
            import bitsandbytes

            optimizer_class, optimizer_name = bitsandbytes.optim.AdamW8bit, "8-bit AdamW"
        except Exception as error:  # no wheel on this machine: the LoRA's optimizer state is small either way
            optimizer_name = f"AdamW (bitsandbytes: {type(error).__name__})"
    figures = {"shape": name, "resolution": resolution, "optimizer": optimizer_name, "batches": {}}
    lines = [f"{name}, {resolution} px, frozen weights bf16, LoRA rank 8, gradient checkpointing, {optimizer_name}", "",
             "| images per step (UNet rows) | peak memory (GiB) | fits 24 GB | median step (s) |", "|---|---|---|---|"]
    for batch in (1, 2):
        optimizer = optimizer_class(params, lr=1e-5)
        try:
            seconds = []
            for step in range(1 if args.smoke else 4):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.perf_counter()
                sdxl_memory.training_step(shape, optimizer, batch, resolution, device, seed=step)
                synchronize(device)
                seconds.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            timed = sorted(seconds[1:] or seconds)
            row = {"peak_gib": peak, "step_s": timed[len(timed) // 2], "fits_24gb": None if peak is None else peak < CONSUMER_CARD_GIB}
            fits = "n/a (CPU)" if peak is None else ("yes" if row["fits_24gb"] else "no")
            lines.append(f"| {batch} ({2 * batch}) | {'n/a (CPU)' if peak is None else f'{peak:.1f}'} | {fits} | {row['step_s']:.2f} |")
        except torch.cuda.OutOfMemoryError as error:
            row = {"error": f"out of memory: {error}"}
            lines.append(f"| {batch} ({2 * batch}) | out of memory | no | |")
        figures["batches"][batch] = row
        del optimizer
    return figures, lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="The same code on a CPU with the tiny model, in seconds.")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "gpu_check"), help="Where the JSON and markdown go.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds of the training step and the tiny synthesis.")
    parser.add_argument("--peak_tflops", type=float, default=None, help="The device's dense bf16 peak for MFU (default: known GPUs).")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.preset = "tiny" if args.smoke else "sd2"
    args.repeats = 1 if args.smoke else args.repeats
    args.peak_tflops = args.peak_tflops or peak_tflops(device)
    report = Report(Path(args.output_dir), args.smoke, device)
    started = time.perf_counter()
    for part, run in (("training step", lambda: training_step_part(args)), ("peak memory", lambda: memory_part(args, device)),
                      ("synthesis per kept image", lambda: synthesis_part(args, device)),
                      ("sdxl training step", lambda: sdxl_part(args, device))):
        try:
            report.add(part, *run())
        except Exception as error:  # keep what the other parts measure
            report.fail(part, error)
        print(f"({time.perf_counter() - started:.0f} s so far)", flush=True)
    return report.data


if __name__ == "__main__":
    main()
