#!/usr/bin/env python
"""DefectFill training: LoRA fine-tuning of a Stable Diffusion inpainting model on a few images of one
defect type, with the paper's defect loss, object loss and [V*] attention loss.

    accelerate launch train_defectfill.py --config configs/sd2_inpainting.yaml \
        --data_dir /data/mvtec_ad --object_class bottle --defect_type broken_large --output_dir runs/bottle-broken_large

The shape follows diffusers' `examples/dreambooth/train_dreambooth_lora.py`: `parse_args`, `main(args)`,
accelerate state hooks that store the LoRA in diffusers format, `log_validation`, `save_model_card`; the
pieces live in the `defectfill` package: the method (prompts, token, loss weights, losses) in
`defectfill.method`, one training step in `defectfill.step`, the [V*] attention capture in
`defectfill.attention` (`attention_processor.py`), the data in `defectfill.data` (`dataset_mvtec.py`), and
the loop, checkpoints, validation and outputs in `defectfill.training`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from defectfill.cli import (
    add_hub_arguments,
    add_layout_argument,
    add_model_arguments,
    check_minimums,
    parse_args_with_config,
    run_main,
    settings_from_args,
)
from defectfill.data.split import save_split
from defectfill.runs.files import SPLIT_FILENAME
from defectfill.step import DefectFillStep, LatentCache, StepConfig
from defectfill.training.checkpoints import resolve_resume_path
from defectfill.training.data import build_dataloader, defect_types_to_train, load_training_split
from defectfill.training.loop import TrainingLoop
from defectfill.training.outputs import push_to_hub, run_record, save_final_outputs, save_model_card
from defectfill.training.settings import DEFAULTS, TrainingSettings, tracker_config
from defectfill.training.setup import (
    build_optimizer,
    check_flags_before_loading,
    create_accelerator,
    prepare_for_training,
    prepare_models,
    register_state_hooks,
    with_resolved_base,
)
from defectfill.training.validation import final_validation, validation_setup

logger = logging.getLogger("defectfill")


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The flags; each one's dest is a field of `TrainingSettings`, and its default is that field's (`DEFAULTS`)."""
    base, src, few, aug, meth = DEFAULTS.model, DEFAULTS.data, DEFAULTS.few_shot, DEFAULTS.augmentation, DEFAULTS.method
    opt, run, mon = DEFAULTS.optimization, DEFAULTS.runtime, DEFAULTS.monitoring
    p = argparse.ArgumentParser(description="DefectFill LoRA training (CVPR 2025).")
    model = add_model_arguments(
        p, "Diffusers-format inpainting model, SD 1.x/2.x or SDXL (its family is read from its model_index.json): Hub id "
           "(sd2-community/stable-diffusion-2-inpainting, diffusers/stable-diffusion-xl-1.0-inpainting-0.1) or local folder. "
           "A withdrawn id (stabilityai/stable-diffusion-2-inpainting) loads its mirror. Required.")
    model.add_argument("--cache_dir", default=base.cache_dir, help="Where downloaded models and datasets are cached.")

    data = p.add_argument_group("data")
    data.add_argument("--data_dir", "--instance_data_dir", dest="data_dir", default=src.data_dir,
                      help="Dataset folder, in any layout of docs/data.md (MVTec AD, VisA, MVTec AD 2, your own folder or "
                           "CSV table, ...).")
    add_layout_argument(data)
    data.add_argument("--dataset_name", default=src.dataset_name,
                      help="A datasets repo (or local loadable dataset) with image/mask/object_class/defect_type columns, "
                           "instead of --data_dir.")
    data.add_argument("--dataset_config_name", default=src.dataset_config_name, help="Config name of --dataset_name.")
    data.add_argument("--object_class", default=src.object_class,
                      help="Product to train on: its folder name (e.g. bottle or metal_nut), the table <data_dir>/<name>.csv, "
                           "or a name for a folder without class folders (KolektorSDD2). Required.")
    data.add_argument("--defect_type", default=few.defect_type,
                      help="Defect type to learn; 'all' trains one [V*] run per defect type (in <output_dir>/<defect_type>). "
                           "May be omitted when the class has a single defect type.")
    data.add_argument("--split_strategy", default=few.split_strategy, choices=("ordered", "random"),
                      help="Few-shot split: first images by file name (paper protocol) or a seeded random choice.")
    data.add_argument("--train_fraction", type=float, default=few.train_fraction,
                      help="Fraction of each defect type's images used for training.")
    data.add_argument("--train_count", type=int, default=few.train_count,
                      help="Exact number of training images per defect type (overrides --train_fraction).")
    data.add_argument("--split_file", default=few.split_file, help="A saved few_shot_split.json to reuse instead of computing the split.")
    data.add_argument("--resolution", type=int, default=aug.resolution, help="Training resolution (square).")
    data.add_argument("--max_scale", type=float, default=aug.max_scale,
                      help="Augmentation: random resize by a factor in [1, max_scale], then random crop back to --resolution.")
    data.add_argument("--defect_crop_probability", type=float, default=aug.defect_crop_probability,
                      help="Augmentation: with this probability, first crop a square around the defect at full resolution "
                           "(the scale infer_defectfill.py --crop_to_mask generates at). 0 = the paper's whole-image resize. "
                           "Recorded in defectfill_run.json: synthesis crops around its masks when this is > 0.")
    data.add_argument("--defect_crop_context", type=float, default=aug.defect_crop_context,
                      help="Context around the defect's box in those crops, as a fraction of its side (the same rule as "
                           "infer_defectfill.py --crop_context, which defaults to this run's value).")
    data.add_argument("--random_flip", action="store_true",
                      help="Augmentation: random horizontal flip (off: some defects are orientation-specific).")
    data.add_argument("--dataloader_num_workers", type=int, default=run.dataloader_num_workers, help="DataLoader worker processes.")

    m = p.add_argument_group("method")
    m.add_argument("--token", "--instance_token", dest="token", default=meth.token,
                   help="The [V*] token string; a rare existing token. One split into several pieces is averaged over its pieces.")
    m.add_argument("--lambda_defect", type=float, default=meth.lambda_defect, help="Weight of the defect loss.")
    m.add_argument("--lambda_object", type=float, default=meth.lambda_object, help="Weight of the object loss.")
    m.add_argument("--lambda_attention", type=float, default=meth.lambda_attention,
                   help="Weight of the [V*] attention loss; 0 turns the attention capture off.")
    m.add_argument("--object_alpha", type=float, default=meth.object_alpha, help="alpha in M' = M + alpha(1 - M).")
    m.add_argument("--num_boxes", type=int, default=meth.num_boxes, help="Boxes in the object branch's random mask.")
    m.add_argument("--box_min_fraction", type=float, default=meth.box_min_fraction,
                   help="Smallest box side, fraction of the image side.")
    m.add_argument("--box_max_fraction", type=float, default=meth.box_max_fraction,
                   help="Largest box side, fraction of the image side.")

    t = p.add_argument_group("training")
    t.add_argument("--output_dir", default=DEFAULTS.output_dir, help="Where the LoRA, run JSON, split, checkpoints and logs go.")
    t.add_argument("--seed", type=int, default=DEFAULTS.seed, help="Seed for noise, timesteps, masks, augmentation and the random split.")
    t.add_argument("--train_batch_size", "--batch_size", dest="train_batch_size", type=int, default=opt.train_batch_size,
                   help="Batch size per device.")
    t.add_argument("--max_train_steps", type=int, default=opt.max_train_steps, help="Optimizer steps.")
    t.add_argument("--gradient_accumulation_steps", type=int, default=opt.gradient_accumulation_steps,
                   help="Micro-batches per optimizer step.")
    t.add_argument("--gradient_checkpointing", action="store_true", help="Recompute UNet activations in backward to save memory.")
    t.add_argument("--learning_rate", type=float, default=opt.learning_rate, help="Learning rate of the UNet LoRA.")
    t.add_argument("--text_encoder_lr", type=float, default=opt.text_encoder_lr, help="Learning rate of the text-encoder LoRA.")
    t.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=opt.train_text_encoder,
                   help="Train a LoRA on the text encoder too (how [V*] learns its meaning).")
    t.add_argument("--rank", "--lora_rank", dest="rank", type=int, default=opt.rank, help="LoRA rank.")
    t.add_argument("--lora_alpha", type=int, default=opt.lora_alpha, help="LoRA alpha (scale = alpha / rank).")
    t.add_argument("--lr_scheduler", default=opt.lr_scheduler,
                   choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
                   help="Learning-rate schedule (paper: linear warmup, then constant).")
    t.add_argument("--lr_warmup_steps", type=int, default=opt.lr_warmup_steps, help="Warmup steps of the LR schedule.")
    t.add_argument("--adam_beta1", type=float, default=opt.adam_beta1, help="Adam beta1.")
    t.add_argument("--adam_beta2", type=float, default=opt.adam_beta2, help="Adam beta2.")
    # Optimizer details the paper leaves out: diffusers' LoRA-example defaults.
    t.add_argument("--adam_weight_decay", type=float, default=opt.adam_weight_decay, help="AdamW weight decay.")
    t.add_argument("--adam_epsilon", type=float, default=opt.adam_epsilon, help="Adam epsilon.")
    t.add_argument("--max_grad_norm", type=float, default=opt.max_grad_norm, help="Gradient clipping norm.")
    t.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes AdamW8bit: 8-bit optimizer state for tensors of 4096+ elements "
                        "(bench/optimizer_state.py measures the saving).")
    t.add_argument("--mixed_precision", default=run.mixed_precision, choices=("no", "fp16", "bf16"),
                   help="Mixed precision; default: accelerate config. Trainable LoRA weights stay fp32.")
    t.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    t.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the UNet and the VAE encoder in place (inductor): the first steps compile (minutes on a "
                        "2-core CPU with a cold cache; a CPU needs a C++ compiler), the later ones run faster.")
    t.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=run.channels_last,
                   help="Keep the UNet and VAE convolution weights channels-last (NHWC), which oneDNN and cuDNN "
                        "convolve faster; the same model, the same results up to float rounding.")
    t.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention on every non-recording layer (CUDA only; pip install -r requirements-gpu.txt).")
    t.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=run.cache_latents,
                   help="Reuse the VAE posteriors of each image and its defect background across epochs when augmentation "
                        "cannot change them (--max_scale 1, no flip, no defect crop): 1 VAE encode a step instead of 3.")
    t.add_argument("--max_nonfinite_steps", type=int, default=opt.max_nonfinite_steps,
                   help="Stop with an error after this many non-finite losses in a row (each is skipped and counted).")

    s = p.add_argument_group("state and logging")
    s.add_argument("--checkpointing_steps", "--save_steps", dest="checkpointing_steps", type=int, default=mon.checkpointing_steps,
                   help="Save a resumable accelerate checkpoint every N steps.")
    s.add_argument("--checkpoints_total_limit", type=int, default=mon.checkpoints_total_limit, help="Keep at most this many checkpoints.")
    s.add_argument("--resume_from_checkpoint", "--resume_from", dest="resume_from_checkpoint", default=mon.resume_from_checkpoint,
                   help="A checkpoint folder, or 'latest' in --output_dir.")
    s.add_argument("--report_to", default=mon.report_to, help="accelerate tracker: tensorboard, wandb, all or none.")
    s.add_argument("--logging_dir", default=mon.logging_dir, help="TensorBoard log folder, under --output_dir.")
    s.add_argument("--logging_steps", type=int, default=mon.logging_steps, help="Log the losses every N steps (each log syncs the device).")
    s.add_argument("--validation_steps", type=int, default=mon.validation_steps,
                   help="Inpaint held-out validation pairs every N steps; 0 turns it off.")
    s.add_argument("--num_validation_images", type=int, default=mon.num_validation_images,
                   help="Validation (good image, held-out mask) pairs.")
    s.add_argument("--num_inference_steps", type=int, default=mon.num_inference_steps, help="Denoising steps at validation.")
    s.add_argument("--guidance_scale", type=float, default=mon.guidance_scale, help="Classifier-free guidance scale at validation.")
    add_hub_arguments(p, "--hub_model_id", "the run folder (LoRA, run file, model card, logs; checkpoints excluded)")
    return p


# The smallest value of each count flag (a usage error below it, before anything is written): 1 where 0 would mean
# nothing (no step, no image), 0 where 0 is a choice (--validation_steps 0: no validation; no warmup; no workers).
COUNT_MINIMUMS = {
    "train_batch_size": 1, "max_train_steps": 1, "gradient_accumulation_steps": 1, "rank": 1, "lora_alpha": 1,
    "lr_warmup_steps": 0, "max_nonfinite_steps": 1, "num_boxes": 1, "train_count": 1, "resolution": 1,
    "dataloader_num_workers": 0, "checkpointing_steps": 1, "checkpoints_total_limit": 1, "logging_steps": 1,
    "validation_steps": 0, "num_validation_images": 1, "num_inference_steps": 1,
}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("pretrained_model_name_or_path", "object_class"))
    if (args.data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --data_dir or --dataset_name")
    check_minimums(parser, args, COUNT_MINIMUMS)
    if args.max_scale < 1.0:
        parser.error(f"--max_scale must be >= 1, got {args.max_scale}")
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--report_to=wandb with --hub_token risks exposing the token; use `huggingface-cli login` instead")
    return args


def train_one_defect(settings: TrainingSettings, defect_type: str, output_dir: Path, hub_token: str | None = None) -> Path:
    """Train one [V*] LoRA for one defect type into `output_dir`; returns the folder. `hub_token` is used for the
    upload alone (it is no setting: never logged or recorded)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    optimization = settings.optimization
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = create_accelerator(settings, output_dir)
    set_seed(settings.seed)
    train_rows, split = load_training_split(settings, defect_type)
    models = prepare_models(accelerator, settings)
    latent_cache = LatentCache() if settings.runtime.cache_latents and settings.augmentation.is_static else None
    defectfill_step = DefectFillStep.build(models, settings.data.object_class, settings.method.token,
                                           StepConfig.from_settings(settings.method), latent_cache)
    register_state_hooks(accelerator, models)
    optimizer = build_optimizer(models, optimization)
    dataloader = build_dataloader(train_rows, settings, accelerator.num_processes)
    lr_scheduler = get_scheduler(optimization.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=optimization.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=optimization.max_train_steps * accelerator.num_processes)
    optimizer, dataloader, lr_scheduler = prepare_for_training(accelerator, models, defectfill_step, optimization.train_text_encoder,
                                                               optimizer, dataloader, lr_scheduler)

    record = run_record(settings, defect_type, split, models.base)
    if accelerator.is_main_process:
        save_split(split, output_dir / SPLIT_FILENAME)
        accelerator.init_trackers("defectfill", config=tracker_config(settings))
    logger.info("training %s/%s on %d images for %d steps", settings.data.object_class, defect_type, len(train_rows),
                optimization.max_train_steps)

    loop = TrainingLoop(accelerator, models, settings, defectfill_step, optimizer, dataloader, lr_scheduler, output_dir)
    try:  # trackers are closed (logs flushed) whether the run ends well or not
        loop.resume(resolve_resume_path(settings.monitoring.resume_from_checkpoint, output_dir))
        validation = validation_setup(settings, record, output_dir)
        with tqdm(total=optimization.max_train_steps, initial=loop.global_step, disable=not accelerator.is_local_main_process,
                  desc="steps") as bar:
            loop.run(bar, validation)

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record.training_summary = loop.summary()
            hub_model_id = settings.hub.hub_model_id
            save_final_outputs(accelerator, models, output_dir, record, hub_model_id)  # first: nothing after it can lose the run
            images = final_validation(accelerator, models, settings, validation, loop.global_step, defectfill_step)
            if images:
                save_model_card(output_dir, record, hub_model_id, images)
            if settings.hub.push_to_hub:
                logger.info("pushed to https://huggingface.co/%s", push_to_hub(output_dir, hub_model_id, hub_token))
    finally:
        accelerator.end_training()
    return output_dir


def main(args: argparse.Namespace) -> list[Path]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    settings = with_resolved_base(settings_from_args(TrainingSettings, args))
    requested = settings.few_shot.defect_type
    defect_types = defect_types_to_train(settings.data, requested)
    output_root = Path(settings.output_dir)
    # One [V*] run per defect type: with 'all', each gets its own folder (and its own Hub repo).
    several = len(defect_types) > 1 or requested == "all"
    output_dirs = [output_root / d if several else output_root for d in defect_types]
    check_flags_before_loading(settings, output_dirs)
    runs = []
    for defect_type, output_dir in zip(defect_types, output_dirs):
        run_settings = settings
        if len(defect_types) > 1 and settings.hub.hub_model_id:
            run_settings = replace(settings, hub=replace(settings.hub, hub_model_id=f"{settings.hub.hub_model_id}-{defect_type}"))
        runs.append(train_one_defect(run_settings, defect_type, output_dir, args.hub_token))
    return runs


if __name__ == "__main__":
    run_main(main, parse_args)
