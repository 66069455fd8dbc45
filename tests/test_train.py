"""train_defectfill: arguments and configs, one step's losses, the end-to-end run on the tiny model,
resume, non-finite skipping, optional extras, the Hub upload, and multi-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_defectfill as train
from defectfill.cli import settings_from_args
from defectfill.data.transform import PairTransform
from defectfill.errors import RunFileError, TrainingError
from defectfill.method import DEFAULT_TOKEN
from defectfill.models import add_lora_adapters, load_models
from defectfill.runs.files import LORA_FILENAME, RUN_FILENAME
from defectfill.runs.lora import ADAPTER_METADATA_FIELDS, load_lora_into, lora_layers
from defectfill.runs.records import RunRecord
from defectfill.step import DefectFillStep, StepConfig
from defectfill.training.checkpoints import resolve_resume_path
from defectfill.training.data import load_training_split
from defectfill.training.settings import (
    DEFAULTS,
    RECORDED_TRAINING_FIELDS,
    AugmentationSettings,
    TrainingSettings,
    recorded_training,
    tracker_config,
)
from defectfill.training.setup import prepare_models
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL


def tiny_args(output_dir: Path, *extra: str):
    """The tiny config, made short: 4 steps of batch 2, no validation, no tracker."""
    return train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
        "--pretrained_model_name_or_path", str(TINY_MODEL), "--data_dir", str(SYNTHETIC_DATA),
        "--output_dir", str(output_dir), "--max_train_steps", "4", "--train_batch_size", "2",
        "--validation_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none", "--logging_steps", "1",
        *extra,
    ])


def tiny_settings(output_dir: Path, *extra: str) -> TrainingSettings:
    return settings_from_args(TrainingSettings, tiny_args(output_dir, *extra))


def read_run(output_dir: Path) -> dict:
    return json.loads((output_dir / RUN_FILENAME).read_text())


# ---------------------------------------------------------------------------------------------- args


def test_config_values_and_cli_override(tmp_path):
    """The config's values arrive typed as the flags' (whatever the tuned values are); the command line beats the file."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    args = tiny_args(tmp_path, "--rank", str(config["rank"] + 1))
    assert (args.object_class, args.defect_type, args.resolution) == (config["object_class"], config["defect_type"], config["resolution"])
    assert args.rank == config["rank"] + 1
    assert args.learning_rate == pytest.approx(float(config["learning_rate"])) and isinstance(args.learning_rate, float)


def test_paper_defaults_without_config():
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--object_class", "bottle", "--data_dir", "d"])
    assert (args.lambda_defect, args.lambda_object, args.lambda_attention) == (0.5, 0.2, 0.05)
    assert (args.rank, args.lora_alpha, args.train_batch_size, args.max_train_steps) == (8, 16, 4, 2000)
    assert (args.learning_rate, args.text_encoder_lr, args.lr_warmup_steps) == (2e-4, 4e-5, 100)
    assert (args.num_boxes, args.box_min_fraction, args.box_max_fraction, args.object_alpha) == (30, 0.03, 0.25, 0.3)
    assert args.resolution == 512 and args.max_scale == 1.125 and not args.random_flip
    assert args.token == DEFAULT_TOKEN and args.train_text_encoder and args.lr_scheduler == "constant_with_warmup"


def test_sd2_config_matches_flag_defaults():
    """configs/sd2_inpainting.yaml restates the defaults: every value equals the flag's default."""
    parser = train.build_parser()
    from defectfill.cli import load_config

    values = load_config(REPO_ROOT / "configs" / "sd2_inpainting.yaml", parser)
    defaults = train.parse_args(["--pretrained_model_name_or_path", "x", "--object_class", "bottle", "--data_dir", "d"])
    for key, value in values.items():
        if key != "pretrained_model_name_or_path":
            assert getattr(defaults, key) == pytest.approx(value), key
    assert values["pretrained_model_name_or_path"] == "sd2-community/stable-diffusion-2-inpainting"


def test_seed_readme_aliases():
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--object_class", "bottle", "--data_dir", "d",
                             "--batch_size", "2", "--lora_rank", "16", "--save_steps", "50", "--resume_from", "latest"])
    assert (args.train_batch_size, args.rank, args.checkpointing_steps, args.resume_from_checkpoint) == (2, 16, 50, "latest")


def test_settings_hold_every_flag_with_the_flags_defaults():
    """main's settings: a field for every flag but the secret and --config, each the flag's dest, the defaults the flags'."""
    from defectfill.settings import BaseModelSettings, DataSourceSettings, flat_settings

    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--object_class", "bottle", "--data_dir", "d"])
    settings = settings_from_args(TrainingSettings, args)
    assert settings == TrainingSettings(model=BaseModelSettings(pretrained_model_name_or_path="x"),
                                        data=DataSourceSettings(data_dir="d", object_class="bottle"))
    flat = flat_settings(settings)
    assert set(vars(args)) - set(flat) == {"hub_token", "config"}
    assert set(flat) - set(vars(args)) == set()  # every setting is a flag (--layout too)
    assert all(flat[name] == value for name, value in vars(args).items() if name in flat)


def test_the_record_chooses_its_training_settings_by_name():
    """`training` holds exactly the allow-listed settings, and none is also a field of the record's own (each said once)."""
    from dataclasses import fields as dataclass_fields

    settings = DEFAULTS
    assert list(recorded_training(settings)) == list(RECORDED_TRAINING_FIELDS)
    record_fields = {f.name for f in dataclass_fields(RunRecord)}
    assert not set(RECORDED_TRAINING_FIELDS) & record_fields
    assert not {"output_dir", "data_dir", "split_file", "resume_from_checkpoint", "hub_model_id", "report_to",
                "logging_dir", "cache_dir"} & set(RECORDED_TRAINING_FIELDS)
    config = tracker_config(settings)
    assert config["rank"] == 8 and "hub_token" not in config and None not in config.values()


def test_every_flag_has_help():
    for action in train.build_parser()._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--object_class", "bottle", "--data_dir", "d"], "missing required option.*--pretrained_model_name_or_path"),
        (["--pretrained_model_name_or_path", "x", "--object_class", "bottle"], "exactly one of --data_dir or --dataset_name"),
        (["--pretrained_model_name_or_path", "x", "--object_class", "b", "--data_dir", "d", "--max_scale", "0.5"], "--max_scale"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert __import__("re").search(message, capsys.readouterr().err)


def test_bad_config_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config)])
    assert "bad.yaml: unknown option 'learning_rat'" in capsys.readouterr().err
    config.write_text("mixed_precision: fp8\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config)])
    assert "'mixed_precision' must be one of" in capsys.readouterr().err


def test_unknown_defect_type_and_ambiguous_class(tmp_path):
    with pytest.raises(Exception, match="'crack' not found.*color, scratch"):
        train.main(tiny_args(tmp_path, "--defect_type", "crack"))
    args = tiny_args(tmp_path)
    args.defect_type = None
    with pytest.raises(TrainingError, match="choose one with --defect_type"):
        train.main(args)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "metal_nut-color"
    args = tiny_args(output_dir, "--max_train_steps", "20", "--learning_rate", "5e-3", "--text_encoder_lr", "5e-3",
                     "--validation_steps", "10", "--num_validation_images", "1", "--num_inference_steps", "2",
                     "--checkpointing_steps", "10", "--checkpoints_total_limit", "1", "--report_to", "tensorboard")
    train.main(args)
    return output_dir


def test_run_writes_diffusers_lora_and_metadata(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {LORA_FILENAME, RUN_FILENAME, "few_shot_split.json", "README.md", "validation_0.png", "logs"} <= names
    assert sorted(p.name for p in trained_run.glob("checkpoint-*")) == ["checkpoint-20"]  # total limit 1
    state = load_file(trained_run / LORA_FILENAME)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in state)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    record = read_run(trained_run)
    assert record["object_prompt"] == "A metal nut with sks" and record["defect_type"] == "color"
    assert record["split"]["defect_types"]["color"]["train"] == ["metal_nut/test/color/000.png", "metal_nut/test/color/001.png"]
    assert record["training_summary"]["global_step"] == 20
    assert record["format_version"] == RunRecord.FORMAT_VERSION and set(record["training"]) == set(RECORDED_TRAINING_FIELDS)
    assert record["training"]["max_train_steps"] == 20 and record["training"]["learning_rate"] == 5e-3
    assert not set(record["training"]) & set(record)  # each setting said once
    card = (trained_run / "README.md").read_text()
    assert "base_model:" in card and "instance_prompt: A metal nut with sks" in card
    assert f"load_lora_weights({trained_run.name!r}, weight_name={LORA_FILENAME!r})" in card  # diffusers 0.35 offline needs it
    assert list((trained_run / "logs").rglob("events.out.tfevents.*"))


def test_lora_loads_in_diffusers_and_changes_the_output(trained_run, tiny_pipeline):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "good" / "000.png").resize((64, 64))
    mask = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "003_mask.png").resize((64, 64))

    def generate(pipe):
        return pipe("A metal nut with sks", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base = generate(tiny_pipeline)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(trained_run)
    saved = load_file(trained_run / LORA_FILENAME)
    loaded = lora_layers(pipe.unet, adapter_name=next(iter(pipe.unet.peft_config)))
    assert {f"unet.{k}" for k in loaded} == {k for k in saved if k.startswith("unet.")}  # nothing missing or unexpected
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[f"unet.{key}"])
    scaling = {v for m in pipe.unet.modules() if hasattr(m, "scaling") for v in m.scaling.values()}
    assert scaling == {1.0}  # alpha / rank is folded into the weights: every loader applies the same LoRA
    assert abs(generate(pipe) - base).max() > 1e-3


def test_lora_file_means_the_same_to_every_loader(trained_run, tmp_path):
    """The text-encoder keys keep CLIP's text_model level (older stacks drop keys without it) and the scale is
    in the weights: diffusers with the file's metadata, diffusers without it, and our own loader into
    adapters of the run's rank and alpha give the same text embeddings and UNet output, and the text encoder does change."""
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    saved = load_file(trained_run / LORA_FILENAME)
    text_keys = [k for k in saved if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    bare = tmp_path / "no_metadata"
    bare.mkdir()
    save_file(saved, bare / LORA_FILENAME)  # no adapter metadata: loaders take alpha = rank
    ids = torch.tensor([list(range(1, 9))])
    latents = torch.randn(1, 9, 32, 32, generator=torch.Generator().manual_seed(0))

    def outputs(text_encoder, unet):
        with torch.no_grad():
            embeds = text_encoder(ids)[0]
            return embeds, unet(latents, 10, embeds, return_dict=False)[0]

    results = {}
    for name, folder in (("metadata", trained_run), ("no_metadata", bare)):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(TINY_MODEL)
        pipe.load_lora_weights(folder)
        results[name] = outputs(pipe.text_encoder, pipe.unet)
    base = StableDiffusionInpaintPipeline.from_pretrained(TINY_MODEL)
    results["base"] = outputs(base.text_encoder, base.unet)
    record = RunRecord.read(trained_run)
    assert record.lora_alpha != record.rank  # so a scale left out of the weights would show
    models = load_models(str(TINY_MODEL))
    add_lora_adapters(models, record.rank, record.lora_alpha)
    load_lora_into(trained_run, models.unet, models.text_encoder)
    results["ours"] = outputs(models.text_encoder, models.unet)
    for name in ("no_metadata", "ours"):
        for a, b in zip(results[name], results["metadata"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (results["metadata"][0] - results["base"][0]).abs().max() > 1e-4  # the [V*] text LoRA is applied


def file_adapter_metadata(path: Path) -> dict[str, dict]:
    """{"unet": {field: value}, "text_encoder": ...} as a LoRA file's `lora_adapter_metadata` records them."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        flat = json.loads(handle.metadata()["lora_adapter_metadata"])
    components: dict[str, dict] = {}
    for key, value in flat.items():
        component, field = key.split(".", 1)
        components.setdefault(component, {})[field] = value
    return components


# LoraConfig fields a LoRA file may leave out whatever their value: they only act while training (dropout, how B
# and A start) or say where the adapter was made.
TRAINING_ONLY_FIELDS = {"init_lora_weights", "lora_dropout", "inference_mode", "base_model_name_or_path", "revision", "peft_version"}


def test_lora_metadata_holds_only_fields_every_peft_accepts(trained_run):
    """The final LoRA and a checkpoint record ADAPTER_METADATA_FIELDS only (peft 0.17 refuses peft 0.21's newer
    fields; tests/test_lora_compat.py loads the files there): the final file alpha = rank (the scale is in the
    weights), the checkpoint the run's own alpha (resuming reads it back). A LoraConfig of those fields alone
    means what the training adapters mean: every other field is at its default, or only acts while training."""
    from peft import LoraConfig

    record = RunRecord.read(trained_run)
    assert record.lora_alpha != record.rank
    for path, alpha in ((trained_run / LORA_FILENAME, record.rank), (trained_run / "checkpoint-20" / LORA_FILENAME, record.lora_alpha)):
        metadata = file_adapter_metadata(path)
        assert set(metadata) == {"unet", "text_encoder"}
        for fields in metadata.values():
            assert set(fields) == set(ADAPTER_METADATA_FIELDS), path
            assert fields["r"] == record.rank and fields["lora_alpha"] == alpha, path
            assert fields["target_modules"] == sorted(fields["target_modules"])  # the same run writes the same bytes

    def normalised(config: dict) -> dict:
        return {key: sorted(value) if isinstance(value, (set, list)) else value for key, value in config.items()}

    models = load_models(str(TINY_MODEL))
    add_lora_adapters(models, record.rank, record.lora_alpha)
    for model in (models.unet, models.text_encoder):
        full = normalised(model.peft_config["default"].to_dict())
        rebuilt = normalised(LoraConfig(**{name: full[name] for name in ADAPTER_METADATA_FIELDS}).to_dict())
        assert {key for key in full if full[key] != rebuilt.get(key)} <= TRAINING_ONLY_FIELDS


def test_our_loader_still_reads_files_with_the_whole_peft_config(trained_run, tmp_path):
    """A checkpoint as earlier versions wrote it (peft's whole LoraConfig as metadata, raw weights, the run's alpha)
    loads into the adapters as today's checkpoint does."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    record = RunRecord.read(trained_run)
    checkpoint = trained_run / "checkpoint-20"

    def loaded(folder: Path) -> dict:
        models = load_models(str(TINY_MODEL))
        add_lora_adapters(models, record.rank, record.lora_alpha)
        load_lora_into(folder, models.unet, models.text_encoder)
        return {f"{name}.{k}": v for name, model in (("unet", models.unet), ("text_encoder", models.text_encoder))
                for k, v in get_peft_model_state_dict(model).items()}

    models = load_models(str(TINY_MODEL))
    add_lora_adapters(models, record.rank, record.lora_alpha)
    whole = {f"{name}.{key}": sorted(value) if isinstance(value, set) else value
             for name, model in (("unet", models.unet), ("text_encoder", models.text_encoder))
             for key, value in model.peft_config["default"].to_dict().items()}
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(checkpoint / LORA_FILENAME), old / LORA_FILENAME,
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(whole)})
    today, before = loaded(checkpoint), loaded(old)
    assert today.keys() == before.keys() and all(torch.equal(today[k], before[k]) for k in today)
    assert any(v.abs().max() > 0 for k, v in today.items() if "lora_B" in k)  # trained weights, not fresh adapters


def test_lora_of_another_model_is_refused_on_resume_for_either_component(trained_run, tmp_path):
    for component in ("unet.", "text_encoder."):
        other = tmp_path / component.rstrip(".")
        other.mkdir()
        state = load_file(trained_run / LORA_FILENAME)
        key = next(k for k in state if k.startswith(component))
        state[key.replace("layers.0.", "layers.9.").replace("down_blocks.0.", "down_blocks.7.")] = state[key].clone()
        from safetensors.torch import save_file

        save_file(state, other / LORA_FILENAME)
        models = load_models(str(TINY_MODEL))
        record = RunRecord.read(trained_run)
        add_lora_adapters(models, record.rank, record.lora_alpha)
        with pytest.raises(RunFileError, match="keys the model does not have"):
            load_lora_into(other, models.unet, models.text_encoder)


def test_lora_files_are_readable_by_others(trained_run):
    assert (trained_run / LORA_FILENAME).stat().st_mode & 0o044 == 0o044


def fixed_seed_defect_loss(run_dir: Path | None, tmp_path: Path, rank: int | None = None) -> float:
    """The defect loss of the tiny config's training images at a fixed seed, with the run's LoRA loaded (or
    fresh adapters, whose zero-initialised B makes them the base model; rank: the config's unless given)."""
    settings = tiny_settings(tmp_path)
    rows, _ = load_training_split(settings, "color")
    transform = PairTransform(64)
    pairs = [transform(r["image"], r["mask"]) for r in rows]
    batch = {"pixel_values": torch.stack([p[0] for p in pairs] * 4), "masks": torch.stack([p[1] for p in pairs] * 4)}
    models = load_models(settings.model.pretrained_model_name_or_path)
    add_lora_adapters(models, rank or settings.optimization.rank, settings.optimization.lora_alpha)
    if run_dir is not None:
        load_lora_into(run_dir, models.unet, models.text_encoder)
    step = DefectFillStep.build(models, "metal_nut", "sks", StepConfig.from_settings(settings.method), capture=False)
    torch.manual_seed(1234)
    with torch.no_grad(), step(batch) as output:
        return output.losses["defect"].item()


def test_training_lowers_the_defect_loss(trained_run, tmp_path):
    before, after = fixed_seed_defect_loss(None, tmp_path), fixed_seed_defect_loss(trained_run, tmp_path)
    assert after < before, (before, after)


def test_8bit_adam_trains_with_8bit_state_and_resumes_exactly(tmp_path):
    """bitsandbytes' AdamW8bit (CPU tensors work): the loss goes down, optimizer states of 4096+ elements are
    uint8 (rank 64: the UNet's 64-wide layers give 64 x 64 LoRA matrices; smaller ones stay fp32, as
    bitsandbytes keeps tensors under 4096 elements in 32 bits), and a resumed run ends with the same LoRA."""
    common = ("--use_8bit_adam", "--rank", "64", "--lora_alpha", "64", "--train_batch_size", "1", "--max_train_steps", "8",
              "--checkpointing_steps", "4", "--learning_rate", "5e-3", "--text_encoder_lr", "5e-3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(straight, *common))
    train.main(tiny_args(resumed, *common, "--resume_from_checkpoint", str(straight / "checkpoint-4")))
    a, b = lora_state(straight), lora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    optimizer_state = torch.load(straight / "checkpoint-8" / "optimizer.bin", weights_only=False)["state"]
    # bitsandbytes nests its tensors under a key of its own in the saved state dict.
    states = [state.get("__bnb_optimizer_quant_state__", state) for state in optimizer_state.values()]
    sizes_and_types = [(state["state1"].numel(), state["state1"].dtype) for state in states]
    assert any(n >= 4096 for n, _ in sizes_and_types)
    assert all(dtype == torch.uint8 for n, dtype in sizes_and_types if n >= 4096)
    assert all(dtype == torch.float32 for n, dtype in sizes_and_types if n < 4096)
    assert fixed_seed_defect_loss(straight, tmp_path, rank=64) < fixed_seed_defect_loss(None, tmp_path, rank=64)


# ----------------------------------------------------------------------------------------- resume


def lora_state(output_dir: Path) -> dict:
    return load_file(output_dir / LORA_FILENAME)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # Batch 1 over 2 images: 2 batches an epoch, so resuming at step 1 also skips into an epoch.
    common = ("--train_batch_size", "1", "--max_train_steps", "3", "--checkpointing_steps", "1", "--random_flip")
    straight = tmp_path / "straight"
    train.main(tiny_args(straight, *common))
    resumed = tmp_path / "resumed"
    train.main(tiny_args(resumed, *common, "--resume_from_checkpoint", str(straight / "checkpoint-1")))
    a, b = lora_state(straight), lora_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit: data order, augmentation and RNG resume exactly
    assert read_run(resumed)["training_summary"]["global_step"] == 3


def test_resume_latest_picks_the_newest_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    train.main(tiny_args(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--train_batch_size", "1"))
    assert resolve_resume_path(tiny_settings(out, "--resume_from_checkpoint", "latest").monitoring.resume_from_checkpoint,
                               out).name == "checkpoint-2"
    with pytest.raises(TrainingError, match="is not a checkpoint folder"):
        train.main(tiny_args(out, "--resume_from_checkpoint", str(tmp_path / "nope")))


# ------------------------------------------------------------------------------------- robustness


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    real = DefectFillStep.losses
    calls = {"n": 0}

    def sometimes_nan(self, batch):
        calls["n"] += 1
        output = real(self, batch)
        if calls["n"] in (2, 3):
            output.losses["loss"] = output.losses["loss"] * float("nan")
        return output

    monkeypatch.setattr(DefectFillStep, "losses", sometimes_nan)
    out = tmp_path / "run"
    train.main(tiny_args(out))
    summary = read_run(out)["training_summary"]
    assert summary["global_step"] == 4 and summary["skipped_nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in lora_state(out).values())


def test_too_many_nonfinite_losses_stop_the_run(tmp_path, monkeypatch):
    real = DefectFillStep.losses

    def always_nan(self, batch):
        output = real(self, batch)
        output.losses["loss"] = output.losses["loss"] * float("inf")
        return output

    monkeypatch.setattr(DefectFillStep, "losses", always_nan)
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train.main(tiny_args(tmp_path / "run", "--max_nonfinite_steps", "3"))
    assert not (tmp_path / "run" / LORA_FILENAME).exists()


def test_missing_gpu_extras_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(TrainingError, match="--use_8bit_adam needs the bitsandbytes package: pip install -r requirements.txt"):
        train.main(tiny_args(tmp_path / "a", "--use_8bit_adam"))
    monkeypatch.setitem(sys.modules, "xformers", None)
    with pytest.raises(TrainingError, match="--enable_xformers_memory_efficient_attention needs the xformers package"):
        train.main(tiny_args(tmp_path / "b", "--enable_xformers_memory_efficient_attention"))


def test_gradient_checkpointing_run(tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(out, "--gradient_checkpointing", "--max_train_steps", "2"))
    assert read_run(out)["training_summary"]["global_step"] == 2


def test_push_to_hub_uploads_the_folder_without_checkpoints(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/defectfill-metal_nut-color"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **k: calls.setdefault("create", (repo_id, k)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.setdefault("upload", k))
    out = tmp_path / "defectfill-metal_nut-color"
    train.main(tiny_args(out, "--push_to_hub", "--hub_token", "hf_x", "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert calls["create"][0] == "defectfill-metal_nut-color" and calls["create"][1]["token"] == "hf_x"
    upload = calls["upload"]
    assert upload["repo_id"] == Repo.repo_id and upload["folder_path"] == str(out)
    assert "checkpoint-*" in upload["ignore_patterns"] and "checkpoint-*/**" in upload["ignore_patterns"]
    assert not [p for p in out.rglob("*") if p.is_file() and b"hf_x" in p.read_bytes()]  # the token is written nowhere


def test_push_to_hub_offline_fails_clearly_and_keeps_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="saved in .*run, but pushing it to the Hub failed"):
        train.main(tiny_args(out, "--push_to_hub", "--max_train_steps", "1"))
    assert (out / LORA_FILENAME).exists() and (out / "README.md").exists()


def test_all_defect_types_train_one_run_each(tmp_path):
    out = tmp_path / "runs"
    runs = train.main(tiny_args(out, "--defect_type", "all", "--max_train_steps", "1"))
    assert [p.name for p in runs] == ["color", "scratch"]
    assert read_run(out / "scratch")["defect_type"] == "scratch" and (out / "color" / LORA_FILENAME).exists()


# ------------------------------------------------------------------------------- accelerate launch


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_match_one_process(tmp_path):
    """The real launcher, 2 processes (gloo) of batch 1: trains, the main process alone writes the outputs,
    and the LoRA equals a 1-process run of batch 2 (per-sample seeds make a sample's randomness
    independent of the process it lands on; DDP averages the gradients of the two halves)."""
    out = tmp_path / "ddp"
    # accelerate's --cpu flag takes its single-process (or MPI) launcher; torchrun-style processes on
    # the CPU (gloo) are --multi_gpu with ACCELERATE_USE_CPU.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    flags = ["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--max_train_steps", "2", "--validation_steps", "0",
             "--checkpointing_steps", "2", "--report_to", "none", "--logging_steps", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_defectfill.py"),
               *flags, "--output_dir", str(out), "--train_batch_size", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / LORA_FILENAME).exists() and read_run(out)["training_summary"]["global_step"] == 2
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()  # both processes saved their RNG state

    single = tmp_path / "single"
    train.main(train.parse_args([*flags, "--output_dir", str(single), "--train_batch_size", "2"]))
    a, b = lora_state(out), lora_state(single)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_mixed_precision_keeps_trainable_lora_in_fp32(tmp_path):
    """Frozen weights in bf16, LoRA parameters in fp32 (no "Attempting to unscale FP16 gradients")."""
    from types import SimpleNamespace

    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")
    models = prepare_models(accelerator, tiny_settings(tmp_path, "--mixed_precision", "bf16"))
    for model in (models.unet, models.text_encoder):
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert models.vae.dtype == torch.bfloat16


def test_latent_cache_only_without_augmentation():
    assert not DEFAULTS.augmentation.is_static  # the paper's random resize changes pixels every epoch
    assert AugmentationSettings(max_scale=1.0).is_static
    assert not AugmentationSettings(max_scale=1.0, random_flip=True).is_static
    assert not AugmentationSettings(max_scale=1.0, defect_crop_probability=0.5).is_static


def test_resume_with_cached_latents_reproduces_the_uninterrupted_run(tmp_path):
    common = ("--train_batch_size", "1", "--max_train_steps", "3", "--checkpointing_steps", "1", "--max_scale", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(straight, *common))
    train.main(tiny_args(resumed, *common, "--resume_from_checkpoint", str(straight / "checkpoint-1")))
    a, b = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_logs_every_loss_term(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((trained_run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/defect", "loss/object", "loss/attention", "loss/loss", "lr/unet", "lr/text_encoder",
            "skipped_nonfinite_steps"} <= scalars
    assert len(events.Scalars("loss/loss")) == 20  # --logging_steps 1
    images = set(events.Tags()["images"])
    assert {"validation", "vstar_attention"} <= images


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(out, "--gradient_accumulation_steps", "2", "--train_batch_size", "1", "--max_train_steps", "2"))
    assert read_run(out)["training_summary"]["global_step"] == 2


def test_validation_does_not_change_the_training_randomness(tmp_path):
    """A run that validates every step ends with the same LoRA as one that never validates."""
    common = ("--max_train_steps", "2", "--train_batch_size", "1", "--num_validation_images", "1", "--num_inference_steps", "2")
    quiet, validating = tmp_path / "quiet", tmp_path / "validating"
    train.main(tiny_args(quiet, *common))
    train.main(tiny_args(validating, *common, "--validation_steps", "1", "--report_to", "tensorboard"))
    a, b = lora_state(quiet), lora_state(validating)
    assert all(torch.equal(a[k], b[k]) for k in a)
