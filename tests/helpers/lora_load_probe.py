"""Load runs' LoRA files the way a user does, with whatever diffusers / transformers / peft are importable, and
record what comes out: the library versions, the text embedding of the run's prompt (SDXL: of both text encoders)
and one painted image (64 px, 10 steps, a fixed generator), without and with the LoRA, and how many layers it
adapted in each model. The pipeline class is the base's own (`_class_name` of its model_index.json: SD or SDXL
inpainting).

Imports nothing of defectfill, so that it runs unchanged under an older stack put first on PYTHONPATH
(tests/test_lora_compat.py runs it so, and calls `probe` in the suite's own stack):

    python tests/helpers/lora_load_probe.py --base models/tiny-sd2-inpainting --image good.png --mask mask.png \\
        --lora demo=models/demo-lora-metal_nut-color --output probe.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SIZE, STEPS, SEED = 64, 10, 0
PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")  # the base's _class_name: SD, SDXL
# The text encoders a pipeline may have, each with the array name of its embedding (SD: the first only).
TEXT_ENCODERS = {"text_encoder": "embedding", "text_encoder_2": "embedding_2"}


def _pipeline(base: str):
    import diffusers

    class_name = json.loads((Path(base) / "model_index.json").read_text())["_class_name"]
    if class_name not in PIPELINES:
        raise ValueError(f"{base}: a {class_name}, not one of {PIPELINES}")
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if class_name == PIPELINES[0] else {}
    pipe = getattr(diffusers, class_name).from_pretrained(base, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_encoders(pipe) -> dict[str, tuple]:
    """{model name: (tokenizer, text encoder)} of the pipeline: one for SD, two for SDXL."""
    tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": getattr(pipe, "tokenizer_2", None)}
    return {name: (tokenizers[name], getattr(pipe, name)) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None}


def _embeddings(pipe, prompt: str) -> dict[str, np.ndarray]:
    """{array name: last hidden state of the prompt} for each text encoder."""
    embeddings = {}
    for name, (tokenizer, encoder) in _text_encoders(pipe).items():
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            embeddings[TEXT_ENCODERS[name]] = encoder(ids).last_hidden_state[0].numpy()
    return embeddings


def _paint(pipe, prompt: str, image, mask) -> np.ndarray:
    return pipe(prompt, image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]


def _adapted_layers(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def probe(base: str, image_path: str, mask_path: str, loras: dict[str, str], snippet: str | None = None) -> tuple[dict, dict]:
    """({name/what: array}, {versions, layers per run}) for each run folder in `loras` ({name: folder}); with
    `snippet`, a model card's Python code is run too (cwd: where its relative paths point), given
    `clean_image` and `defect_mask`, and the size of its `image` recorded. On one thread: the tiny model's
    operations are too small to gain from more, and on a shared, busy machine several threads make a
    10-step call many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe(base, image_path, mask_path, loras, snippet)
    finally:
        torch.set_num_threads(threads)


def _probe(base: str, image_path: str, mask_path: str, loras: dict[str, str], snippet: str | None) -> tuple[dict, dict]:
    import diffusers
    import peft
    import transformers
    from PIL import Image

    image = Image.open(image_path).convert("RGB").resize((SIZE, SIZE))
    mask = Image.open(mask_path).convert("L").resize((SIZE, SIZE))
    arrays = {}
    info = {"versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
            "layers": {}}
    for name, folder in loras.items():
        prompt = json.loads((Path(folder) / "defectfill_run.json").read_text())["object_prompt"]
        pipe = _pipeline(base)
        arrays.update({f"{name}/base_{what}": array for what, array in _embeddings(pipe, prompt).items()})
        arrays[f"{name}/base_image"] = _paint(pipe, prompt, image, mask)
        pipe.load_lora_weights(folder, weight_name=WEIGHT_NAME)
        arrays.update({f"{name}/{what}": array for what, array in _embeddings(pipe, prompt).items()})
        arrays[f"{name}/image"] = _paint(pipe, prompt, image, mask)
        models = {model: encoder for model, (_, encoder) in _text_encoders(pipe).items()} | {"unet": pipe.unet}
        info["layers"][name] = {model: _adapted_layers(module) for model, module in models.items()}
    if snippet:
        scope = {"clean_image": image, "defect_mask": mask}
        exec(Path(snippet).read_text(), scope)  # the model card's own code, written by the suite
        info["snippet_image_size"] = list(scope["image"].size)
    return arrays, info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="The base pipeline's folder.")
    parser.add_argument("--image", required=True, help="A clean image to paint into.")
    parser.add_argument("--mask", required=True, help="Its mask (white: paint).")
    parser.add_argument("--lora", action="append", default=[], help="NAME=FOLDER of a run (repeatable).")
    parser.add_argument("--snippet", default=None, help="A Python file (a model card's snippet) to run in the current folder.")
    parser.add_argument("--output", required=True, help="Where to write the arrays (.npz); the rest goes to the same name .json.")
    args = parser.parse_args(argv)
    loras = dict(item.split("=", 1) for item in args.lora)
    arrays, info = probe(args.base, args.image, args.mask, loras, args.snippet)
    output = Path(args.output)
    np.savez(output, **arrays)
    output.with_suffix(".json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
