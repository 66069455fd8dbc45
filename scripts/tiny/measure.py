"""Measure what the pre-trained tiny model has learned, against the same architecture at random init.

    python scripts/measure_tiny_model.py                       # prints the table
    python scripts/measure_tiny_model.py --update_readme       # also writes it into the model's README.md

Figures for the pre-trained model, against a freshly built random one (`make_tiny_model.py`), the same
prompt without the word, or the base model without the LoRA:
- VAE round trip: mean absolute error (pixels in [0, 1]) on held-out synthetic clean images;
- base inpainting: empty prompt, a 24 px box in the middle of held-out clean images, distance of the mean
  generated colour in the box to the mean colour of the 6 px around it (does it continue the surroundings);
- following words (`--prompt_following`): does a colour or texture word change what fills a box;
- learning a defect: after `configs/tiny.yaml` (a 40-step DefectFill run on metal_nut / color, a blue-green
  stain no clean class has), with the object prompt, inside held-out masks: the distance of the mean
  generated colour to the stain colour (base model vs. base + LoRA, loaded with diffusers'
  `load_lora_weights`) and the share of the [V*] decoder attention that falls inside the mask; images and
  masks cropped around the mask at full resolution, as `infer_defectfill.py` does by default.

`tests/test_pretrained_tiny_model.py` asserts bounds on the same functions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectfill import painting, pipelines
from defectfill.data.mask_files import open_mask
from defectfill.data.mvtec import list_good_images, list_heldout_masks
from defectfill.data.transform import PairTransform
from defectfill.models import add_lora_adapters, load_models
from defectfill.runs.lora import load_lora_into
from defectfill.runs.records import RunRecord
from defectfill.runs.settings import RunOverrides, plan_run
from defectfill.step import DefectFillStep

from .paths import CONFIGS, REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL
from .synthetic_data import STAIN_RGB

DEMO_CONFIG = CONFIGS / "tiny.yaml"
RESOLUTION = 64
HELD_OUT_CLEAN = [SYNTHETIC_DATA / c / "test" / "good" / f"{i:03d}.png" for c in ("wood", "metal_nut") for i in range(4)]
STEPS = 20


def load_pipeline(path):
    return pipelines.load_pipeline(str(path), device="cpu")


def build_random_model(output_dir: Path) -> Path:
    from .model import main as build

    return build(["--output_dir", str(output_dir)])


def load_rgb(path, resample=Image.BICUBIC) -> Image.Image:
    return Image.open(path).convert("RGB").resize((RESOLUTION, RESOLUTION), resample)


def vae_round_trip_error(model_path) -> float:
    """Mean absolute error of decode(encode(x)) on the held-out clean images, in [0, 1] pixel units."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(model_path), subfolder="vae")
    arrays = np.stack([np.asarray(load_rgb(p), dtype=np.float32) for p in HELD_OUT_CLEAN]) / 127.5 - 1
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    return (reconstruction - images).abs().mean().item() / 2


def centre_box_mask(side: int) -> Image.Image:
    mask = Image.new("L", (RESOLUTION, RESOLUTION), 0)
    start = (RESOLUTION - side) // 2
    mask.paste(255, (start, start, start + side, start + side))
    return mask


def inpainting_error(pipe, side: int = 24, ring: int = 6) -> float:
    """Empty prompt, no guidance, a centred `side` px box: distance (0-255 RGB) between the mean colour
    generated in the box and the mean colour of the `ring` px of the clean image around it. The box covers
    the metal nut's hole, which the context cannot predict, so the reference is the surroundings (what
    "continues the texture" means), not the hidden truth."""
    mask = centre_box_mask(side)
    inside = np.asarray(mask) > 0
    start = (RESOLUTION - side) // 2
    around = np.zeros_like(inside)
    around[start - ring : start + side + ring, start - ring : start + side + ring] = True
    around &= ~inside
    errors = []
    for index, path in enumerate(HELD_OUT_CLEAN):
        image = load_rgb(path)
        out = pipe("", image=image, mask_image=mask, height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS,
                   guidance_scale=1.0, generator=torch.Generator().manual_seed(index), output_type="np").images[0]
        surroundings = np.asarray(image, dtype=np.float32)[around].mean(0)
        errors.append(float(np.linalg.norm(out[inside].mean(0) * 255 - surroundings)))
    return float(np.mean(errors))


PROMPT_COLOURS = ("red", "yellow", "green", "blue")
CLASS_WORDS = {"wood": "wood", "metal_nut": "metal nut"}


def named_colour_rgb(colour: str) -> np.ndarray:
    """The centre of a pre-training colour name's HSV range, as RGB (0-255)."""
    import colorsys

    from .pretrain import NAMED_COLOURS

    hue, saturation, value = NAMED_COLOURS[colour]
    return np.asarray(colorsys.hsv_to_rgb(hue / 360, np.mean(saturation), np.mean(value))) * 255


def prompt_following(pipe, side: int = 20) -> dict[str, float]:
    """Does the base UNet follow colour and texture words? On the held-out clean images, a centred `side` px
    box inpainted with guidance 7.5 (the same seed for every prompt of an image): the distance (0-255) of its
    mean RGB to a named colour's, prompted "a wood with a red spot" vs. the class alone ("a wood"), over
    `PROMPT_COLOURS`; and the local contrast inside the box (`defect_families.local_contrast`) prompted
    "a wood with a striped patch" vs. the class alone."""
    from .families import RegionStatistics

    mask = centre_box_mask(side)
    inside = np.asarray(mask) > 0
    named, plain, striped, unstriped = [], [], [], []
    for index, path in enumerate(HELD_OUT_CLEAN):
        image, word = load_rgb(path), CLASS_WORDS[path.parents[2].name]
        prompts = [f"a {word}", f"a {word} with a striped patch", *(f"a {word} with a {c} spot" for c in PROMPT_COLOURS)]
        outputs = pipe(prompts, image=[image] * len(prompts), mask_image=[mask] * len(prompts), height=RESOLUTION,
                       width=RESOLUTION, num_inference_steps=STEPS,
                       generator=[torch.Generator().manual_seed(index) for _ in prompts]).images
        class_only, stripes, *coloured = [RegionStatistics.of(out, inside) for out in outputs]
        for colour, statistics in zip(PROMPT_COLOURS, coloured):
            named.append(np.linalg.norm(statistics.colour - named_colour_rgb(colour)))
            plain.append(np.linalg.norm(class_only.colour - named_colour_rgb(colour)))
        striped.append(stripes.texture)
        unstriped.append(class_only.texture)
    return {"colour_named": float(np.mean(named)), "colour_class_only": float(np.mean(plain)),
            "contrast_striped": float(np.mean(striped)), "contrast_class_only": float(np.mean(unstriped))}


def run_repo_script(*command: str) -> None:
    """`python <repo script> <args>` from the repo root, as users run it; its stderr's tail in the error."""
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")


def train_demo_run(model_path, output_dir: Path, *extra: str, data_dir: Path = SYNTHETIC_DATA) -> Path:
    """The README demo's training command (configs/tiny.yaml), without validation and checkpoints, run as
    users run it (`extra` flags override the config's)."""
    run_repo_script(str(REPO_ROOT / "train_defectfill.py"), "--config", str(DEMO_CONFIG), "--pretrained_model_name_or_path",
                    str(model_path), "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--validation_steps", "0",
                    "--checkpointing_steps", "100000", "--report_to", "none", *extra)
    return output_dir


def heldout_pairs(run_dir: Path) -> list[tuple[Path, Path]]:
    """(clean test image, held-out defect mask) pairs of the run's object class and defect type."""
    record = RunRecord.read(run_dir)
    masks = list_heldout_masks(SYNTHETIC_DATA, record.split, record.defect_type)
    goods = list_good_images(SYNTHETIC_DATA, record.object_class, splits=("test",))
    return painting.round_robin(goods, masks, len(masks))


def regions(pairs, record: RunRecord) -> list[tuple[Image.Image, Image.Image]]:
    """(image, mask) at model resolution, prepared as `infer_defectfill.py` prepares them for this run (at the
    run's training scale: cropped around the mask for the demo config)."""
    settings = plan_run(None, record, RunOverrides(resolution=RESOLUTION)).settings
    jobs = [painting.prepare_job(Image.open(image), open_mask(mask), i, settings) for i, (image, mask) in enumerate(pairs)]
    return [(job.region, job.region_mask) for job in jobs]


def distance_to_stain(pipe, regions, prompt: str) -> float:
    """Mean over the (image, mask) regions of |mean generated RGB inside the mask - the stain's RGB| (0-255 units)."""
    distances = []
    for index, (image, mask) in enumerate(regions):
        out = pipe(prompt, image=image, mask_image=mask, height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(index), output_type="np").images[0]
        inside = np.asarray(mask) > 127
        distances.append(float(np.linalg.norm(out[inside].mean(0) * 255 - STAIN_RGB)))
    return float(np.mean(distances))


def vstar_mask_overlaps(model_path, run_dir: Path, regions) -> dict[str, float]:
    """Share of the [V*] decoder attention (object branch, training's capture) that falls inside the mask,
    averaged over the regions at fixed noise and timesteps: {"base": fresh LoRA adapters (their B is zero,
    so the base model's maps), "trained": the run's LoRA loaded into them}."""
    record = RunRecord.read(run_dir)
    models = load_models(str(model_path))
    add_lora_adapters(models, record.rank, record.lora_alpha, record.train_text_encoder)
    step = DefectFillStep.build(models, record.object_class, record.token)
    transform = PairTransform(RESOLUTION)
    batches = [transform(image, mask_image) for image, mask_image in regions]

    def mean_overlap() -> float:
        overlaps = []
        for index, (image, mask) in enumerate(batches):
            batch = {"pixel_values": image[None], "masks": mask[None], "sample_seed": torch.tensor([index])}
            with torch.no_grad(), step(batch) as output:
                attention = output.attention_map[0, 0]
            latent_mask = torch.nn.functional.interpolate(mask[None], size=tuple(attention.shape))[0, 0]
            overlaps.append((attention * latent_mask).sum().item() / attention.sum().item())
        return float(np.mean(overlaps))

    base = mean_overlap()
    load_lora_into(run_dir, models.unet, models.text_encoder)
    return {"base": base, "trained": mean_overlap()}


def measure(model_path=TINY_MODEL, work_dir: Path | None = None, with_prompt_following: bool = False,
            run_dir: Path | None = None) -> dict:
    """Every figure of the table; the LoRA is a fresh run of the README demo's training command, or `run_dir` (a run
    of it already made, e.g. the bundled demo run)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        random_model = build_random_model(work / "random")
        run_dir = run_dir or train_demo_run(model_path, work / "run")
        record = RunRecord.read(run_dir)
        heldout = regions(heldout_pairs(run_dir), record)
        prompt = record.object_prompt
        pipe = load_pipeline(model_path)
        results = {
            "vae_error": {"pretrained": vae_round_trip_error(model_path), "random": vae_round_trip_error(random_model)},
            "inpainting_error": {"pretrained": inpainting_error(pipe), "random": inpainting_error(load_pipeline(random_model))},
            "stain_distance": {"base": distance_to_stain(pipe, heldout, prompt)},
            "vstar_overlap": vstar_mask_overlaps(model_path, run_dir, heldout),
            "mask_share": float(np.mean([(np.asarray(mask) > 127).mean() for _, mask in heldout])),
        }
        if with_prompt_following:
            results["prompt_following"] = prompt_following(pipe)
        pipe.load_lora_weights(str(run_dir))
        results["stain_distance"]["trained"] = distance_to_stain(pipe, heldout, prompt)
    return results


def prompt_following_rows(results: dict) -> list[str]:
    f = results.get("prompt_following")
    if f is None:
        return []
    return [
        "Does the base model follow words? (`--prompt_following`: a centred 20 px box on the same images, guidance 7.5, "
        f"{STEPS} PNDM steps)",
        "",
        "| measure | prompt names it | prompt names the class only |",
        "|---|---|---|",
        f"| distance of the mean RGB in the box to a named colour ({', '.join(PROMPT_COLOURS)}): \"a wood with a red spot\" "
        f"| {f['colour_named']:.1f} | {f['colour_class_only']:.1f} |",
        "| local contrast in the box (0-255): \"a wood with a striped patch\" "
        f"| {f['contrast_striped']:.1f} | {f['contrast_class_only']:.1f} |",
        "",
    ]


def as_markdown(results: dict) -> str:
    r = results
    return "\n".join([
        "| measure | pre-trained | random init |",
        "|---|---|---|",
        "| VAE round trip, mean abs. error (pixels in [0, 1]), 8 held-out clean images "
        f"| {r['vae_error']['pretrained']:.4f} | {r['vae_error']['random']:.4f} |",
        "| inpainting a centred 24 px box, empty prompt: distance of its mean RGB (0-255) to the 6 px ring around it "
        f"| {r['inpainting_error']['pretrained']:.1f} | {r['inpainting_error']['random']:.1f} |",
        "",
        *prompt_following_rows(r),
        "After `python train_defectfill.py --config configs/tiny.yaml` (40 steps, metal_nut / color), held-out masks,",
        f"prompt \"A metal nut with sks\", {STEPS} PNDM steps, guidance 7.5:",
        "",
        "| measure | base model | base + DefectFill LoRA |",
        "|---|---|---|",
        f"| distance of the mean colour inside the mask to the stain's RGB {tuple(int(v) for v in STAIN_RGB)} "
        f"| {r['stain_distance']['base']:.1f} | {r['stain_distance']['trained']:.1f} |",
        f"| share of the [V*] decoder attention inside the mask (mask covers {100 * r['mask_share']:.1f} % of the image) "
        f"| {r['vstar_overlap']['base']:.3f} | {r['vstar_overlap']['trained']:.3f} |",
    ])


def update_readme(model_dir: Path, markdown: str) -> None:
    from .pretrain import MEASURED_BLOCK, update_readme_section

    update_readme_section(model_dir, MEASURED_BLOCK, f"`python scripts/measure_tiny_model.py --update_readme`:\n\n{markdown}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_MODEL), help="The pre-trained tiny model folder.")
    parser.add_argument("--update_readme", action="store_true", help="Write the table into the model folder's README.md.")
    parser.add_argument("--prompt_following", action="store_true",
                        help="Also measure whether colour and texture words change what the base model paints (a minute more).")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = measure(args.model, with_prompt_following=args.prompt_following)
    markdown = as_markdown(results)
    print(json.dumps(results, indent=2))
    print(markdown)
    if args.update_readme:
        update_readme(Path(args.model), markdown)
    return results


if __name__ == "__main__":
    main()
