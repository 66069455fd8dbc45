"""Careless input on every command line, as a user meets it: a count of 0 or -1, a resolution the model cannot
divide, a broken image among the good ones, an output folder that cannot be written, a flag the config also sets,
a resumed build's record, two runs on one folder. Each is refused before anything is written, with one message that
names the flag or file, and leaves no folder behind.

Two kinds of refusal, each always the same: a flag value that is wrong by itself (a count below its minimum) is a
usage error, exit code 2, ``<prog>: error: --flag must be >= N, got V`` (argparse's `parser.error`); a value wrong
only against files or models (the resolution and the base model's VAE, a folder, an image, a busy folder) is a
`DefectFillError`, exit code 1, ``error: <message>`` (`cli.run_main`)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import build_dataset_defectfill as build
import dataset_mvtec
import downstream_defectfill as downstream
import eval_defectfill as evaluate
import infer_defectfill as infer
import train_defectfill as train
from defectfill.errors import DatasetError, EvaluationError, OutputFolderError
from defectfill.runs.files import FINGERPRINT_FILENAME, LOCK_FILENAME, SYNTHESIS_FILENAME
from defectfill.runs.folder import SynthesisFolder, read_metadata
from defectfill.runs.records import SynthesisRecord
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL

TRAIN_BASE = ["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(TINY_MODEL),
              "--data_dir", str(SYNTHETIC_DATA), "--report_to", "none"]
GOOD_IMAGES = SYNTHETIC_DATA / "metal_nut" / "train" / "good"


def run_cli(script: str, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The entry script as a user runs it, from the repository root (which puts this checkout's package first)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, flags)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def assert_refused(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def usage_error(parse_args, flags: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def goods_with_a_truncated_image(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for path in sorted(GOOD_IMAGES.glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    broken = sorted(folder.glob("*.png"))[1]
    broken.write_bytes(broken.read_bytes()[:300])
    return broken


# ----------------------------------------------------------------------------------------------- counts


def test_zero_or_negative_training_steps_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    for value in ("0", "-1"):
        result = run_cli("train_defectfill.py", *TRAIN_BASE, "--output_dir", out, "--max_train_steps", value)
        assert_refused(result, 2, f"error: --max_train_steps must be >= 1, got {value}")
    assert not out.exists()


REQUIRED = {
    train.parse_args: ["--pretrained_model_name_or_path", "m", "--object_class", "c", "--data_dir", "d"],
    infer.parse_args: ["--lora", "r"],
    build.parse_args: ["--lora", "r"],
    evaluate.parse_args: ["--generated", "g"],
    downstream.parse_args: [],
    dataset_mvtec.parse_args: ["--data_dir", "d", "--object_class", "c"],
}
COUNTS = [
    (train.parse_args, flag, value, minimum)
    for flag, value, minimum in [
        ("--train_batch_size", 0, 1), ("--gradient_accumulation_steps", 0, 1), ("--rank", 0, 1), ("--lora_alpha", 0, 1),
        ("--lr_warmup_steps", -1, 0), ("--max_nonfinite_steps", 0, 1), ("--num_boxes", 0, 1), ("--train_count", 0, 1),
        ("--resolution", 0, 1), ("--dataloader_num_workers", -1, 0), ("--checkpointing_steps", 0, 1),
        ("--checkpoints_total_limit", 0, 1), ("--logging_steps", 0, 1), ("--validation_steps", -1, 0),
        ("--num_validation_images", 0, 1), ("--num_inference_steps", 0, 1),
    ]
] + [
    (infer.parse_args, flag, value, 1)
    for flag, value in [("--num_images", 0), ("--num_candidates", 0), ("--batch_size", 0), ("--num_inference_steps", 0),
                        ("--resolution", -8)]
] + [
    (build.parse_args, flag, value, minimum)
    for flag, value, minimum in [("--num_images", 0, 1), ("--num_candidates", 0, 1), ("--batch_size", 0, 1),
                                 ("--num_inference_steps", 0, 1), ("--max_redraws", -1, 0), ("--mask_attempts", 0, 1),
                                 ("--resolution", 0, 1)]
] + [
    (evaluate.parse_args, flag, value, minimum)
    for flag, value, minimum in [("--image_size", 0, 1), ("--kid_subsets", 0, 1), ("--kid_max_subset_size", 1, 2)]
] + [
    (downstream.parse_args, flag, 0, 1)
    for flag in ("--epochs", "--samples_per_epoch", "--batch_size", "--classifier_epochs", "--classifier_repeats",
                 "--patience", "--copy_paste_count", "--resolution", "--encoder_depth")
] + [(dataset_mvtec.parse_args, "--train_count", 0, 1)]


@pytest.mark.parametrize("parse_args, flag, value, minimum", COUNTS,
                         ids=[f"{p.__module__}{f}={v}" for p, f, v, _ in COUNTS])
def test_every_count_flag_of_every_cli_is_checked(parse_args, flag, value, minimum, capsys):
    err = usage_error(parse_args, [*REQUIRED[parse_args], flag, str(value)], capsys)
    assert f"error: {flag} must be >= {minimum}, got {value}" in err


def test_a_count_from_a_config_is_checked_as_the_flag_is_and_zero_means_off_where_it_is_documented(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_train_steps: 0\n")
    err = usage_error(train.parse_args, [*REQUIRED[train.parse_args], "--config", str(config)], capsys)
    assert "error: --max_train_steps must be >= 1, got 0" in err
    args = train.parse_args([*REQUIRED[train.parse_args], "--validation_steps", "0", "--lr_warmup_steps", "0"])
    assert (args.validation_steps, args.lr_warmup_steps) == (0, 0)  # 0 = no validation, no warmup
    err = usage_error(downstream.parse_args, ["--decoder_channels", "16", "0", "8", "4", "2"], capsys)
    assert "error: --decoder_channels must be >= 1, got 0" in err  # each value of a list flag


def test_infer_num_images_below_one_is_refused_and_unset_means_every_mask(tiny_run, tmp_path):
    out = tmp_path / "out"
    result = run_cli("infer_defectfill.py", "--lora", tiny_run, "--output_dir", out, "--num_images", "-1")
    assert_refused(result, 2, "error: --num_images must be >= 1, got -1")
    assert not out.exists()
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted((SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color").glob("*.png"))[:3]:
        shutil.copy(path, masks / path.name)
    infer.main(infer.parse_args(["--lora", str(tiny_run), "--output_dir", str(out), "--mask_dir", str(masks),
                                 "--num_candidates", "1", "--num_inference_steps", "2"]))
    assert len(read_metadata(out)) == 3  # all pairs: one output per mask


# ------------------------------------------------------------------------------------------- resolution


def test_a_resolution_the_vae_cannot_divide_is_refused_by_infer_and_the_builder(tiny_run, tmp_path):
    out = tmp_path / "out"
    result = run_cli("infer_defectfill.py", "--lora", tiny_run, "--output_dir", out, "--resolution", "63",
                     "--num_candidates", "1")
    assert_refused(result, 1, "error: --resolution 63 is not a multiple of 2, the VAE's scale factor: try 64")
    result = run_cli("build_dataset_defectfill.py", "--lora", tiny_run, "--output_dir", out, "--resolution", "63",
                     "--num_candidates", "1")
    assert_refused(result, 1, "error: --resolution 63 is not a multiple of 2, the VAE's scale factor: try 64")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- images


def test_a_truncated_good_image_is_named_by_the_builder_which_writes_nothing(tiny_run, tmp_path):
    broken = goods_with_a_truncated_image(tmp_path / "goods")
    out = tmp_path / "out"
    result = run_cli("build_dataset_defectfill.py", "--lora", tiny_run, "--image_dir", broken.parent, "--output_dir", out,
                     "--num_candidates", "1", "--num_images", "3", "--num_inference_steps", "2")
    assert_refused(result, 1, f"error: good image {broken} cannot be read as an image")
    assert not out.exists()


def test_a_build_that_fails_after_its_claim_leaves_no_file_a_rerun_would_trip_on(tiny_run, tmp_path, monkeypatch):
    from defectfill.build import builder

    def broken_batch(*args, **kwargs):
        raise DatasetError("image x.png cannot be read as an image")

    flags = ["--lora", str(tiny_run), "--num_candidates", "1", "--num_images", "1", "--num_inference_steps", "2"]
    out = tmp_path / "out"
    monkeypatch.setattr(builder, "build_batch", broken_batch)
    with pytest.raises(DatasetError):
        build.main(build.parse_args([*flags, "--output_dir", str(out)]))
    assert not out.exists()  # no build.json, no .metadata.lock, no empty folder
    kept = tmp_path / "kept"  # a folder the user made: it stays, with nothing of the failed run in it
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError):
        build.main(build.parse_args([*flags, "--output_dir", str(kept)]))
    assert not (kept / FINGERPRINT_FILENAME).exists() and not (kept / SYNTHESIS_FILENAME).exists()
    monkeypatch.undo()
    build.main(build.parse_args([*flags, "--output_dir", str(out), "--seed", "4"]))  # a re-run with other settings
    assert len(read_metadata(out)) == 1


def test_a_truncated_good_image_is_named_by_the_downstream_evaluation(copy_of_data, tmp_path):
    import dataset_mvtec as dm
    from tests.test_downstream import tiny_flags, write_builder_folder

    split = dm.few_shot_split(dm.load_mvtec_defects(SYNTHETIC_DATA, "metal_nut"))
    synthetic = write_builder_folder(tmp_path / "handmade", SYNTHETIC_DATA, split)
    broken = copy_of_data / "metal_nut" / "test" / "good" / "000.png"
    broken.write_bytes(broken.read_bytes()[:300])
    out = tmp_path / "out"
    result = run_cli("downstream_defectfill.py", *tiny_flags(synthetic, out, "--data_dir", copy_of_data, "--baselines",
                                                             "--no-with_real", "--epochs", "1"))
    assert_refused(result, 1, f"error: good image {broken} cannot be read as an image")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ output folders


def test_an_output_folder_under_a_file_is_refused_by_train_infer_and_the_builder(tiny_run, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    out = a_file / "sub"
    message = f"error: --output_dir {out} lies under {a_file}, which is a file, not a folder"
    assert_refused(run_cli("train_defectfill.py", *TRAIN_BASE, "--output_dir", out), 1, message)
    assert_refused(run_cli("infer_defectfill.py", "--lora", tiny_run, "--output_dir", out), 1, message)
    assert_refused(run_cli("build_dataset_defectfill.py", "--lora", tiny_run, "--output_dir", out), 1, message)
    assert a_file.read_text() == ""


@pytest.fixture
def immutable_folder(tmp_path):
    """A folder nobody may write to, root included (`chattr +i`); None where chattr is not available."""
    folder = tmp_path / "locked"
    folder.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_runs(immutable_folder, tmp_path, monkeypatch):
    """With `chattr +i` (a read-only folder stays writable for root): the CLI as a subprocess. Without it: the
    permission check itself (`os.access`) says no, in-process."""
    if immutable_folder is not None:
        out = immutable_folder / "run"
        result = run_cli("train_defectfill.py", *TRAIN_BASE, "--output_dir", out)
        assert_refused(result, 1, f"error: --output_dir {out} cannot be made: {immutable_folder} is not writable")
        assert list(immutable_folder.iterdir()) == []
        return
    locked = tmp_path / "locked"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: Path(path) != locked and real_access(path, mode, **k))
    with pytest.raises(OutputFolderError, match=f"--output_dir {locked}/run cannot be made: {locked} is not writable"):
        train.main(train.parse_args([*TRAIN_BASE, "--output_dir", str(locked / "run")]))
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------------ eval and downstream


def test_eval_without_lpips_weights_says_how_to_get_them(tmp_path, monkeypatch):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("cannot download alexnet-owt-7be5be79.pth")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(EvaluationError) as error:
        evaluate.main(evaluate.parse_args(["--generated", str(tmp_path / "g"), "--device", "cpu"]))
    message = str(error.value)
    assert "IC-LPIPS needs the torchvision 'alex' backbone weights" in message and "alexnet-owt-7be5be79.pth" in message
    assert "$TORCH_HOME/hub/checkpoints" in message and "network access" in message
    assert "--num_candidates" not in message  # a flag of synthesis, not of eval


def test_an_append_flag_given_on_the_command_line_replaces_its_config_value_and_its_default(tmp_path):
    import argparse

    from defectfill.cli import parse_args_with_config

    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--tag", action="append", default=["default"], help="A repeatable flag.")
        p.add_argument("--count", type=int, action="append", default=None, help="A repeatable integer.")
        return p

    config = tmp_path / "c.yaml"
    config.write_text("tag: [x, y]\ncount: 3\n")
    assert vars(parse_args_with_config(parser(), [])) == {"tag": ["default"], "count": None, "config": None}
    assert parse_args_with_config(parser(), ["--tag", "z"]).tag == ["z"]  # not ["default", "z"]
    from_file = parse_args_with_config(parser(), ["--config", str(config)])
    assert (from_file.tag, from_file.count) == (["x", "y"], [3])  # a scalar in the file is a one-value list
    assert parse_args_with_config(parser(), ["--config", str(config), "--tag", "z", "--count", "4"]).tag == ["z"]


def test_synthetic_on_the_command_line_replaces_the_configs_list(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"synthetic": ["a=dir_a", "b=dir_b"], "split_file": "run/few_shot_split.json"}))
    from_file = downstream.parse_args(["--config", str(config)])
    assert from_file.synthetic == ["a=dir_a", "b=dir_b"] and from_file.split_file == ["run/few_shot_split.json"]
    replaced = downstream.parse_args(["--config", str(config), "--synthetic", "c=dir_c", "--synthetic", "d=dir_d"])
    assert replaced.synthetic == ["c=dir_c", "d=dir_d"] and replaced.split_file == ["run/few_shot_split.json"]
    assert downstream.parse_args([]).synthetic is None


# ------------------------------------------------------------------------------------- resumes, busy folders


class FirstDrawWeak:
    """LPIPS scores a test can predict: the first call of this scorer is below --min_lpips (a redraw), later ones
    above. One instance across a killed build and its resume gives the same draws as one uninterrupted build."""

    def __init__(self):
        self.calls = 0

    def __call__(self, clean, candidates, mask):
        self.calls += 1
        return [0.01 * (c + 1) if self.calls == 1 else 0.5 + 0.1 * c for c in range(len(candidates))]


def test_a_resumed_build_records_the_unet_passes_of_the_whole_dataset(tiny_run, tmp_path, monkeypatch):
    """Item 0 is redrawn (it costs twice item 1's passes) and made before the kill; the resume makes item 1 alone."""
    flags = ["--lora", str(tiny_run), "--num_images", "2", "--num_candidates", "2", "--min_lpips", "0.1",
             "--max_redraws", "1", "--batch_size", "1", "--no-mask_augment", "--num_inference_steps", "2"]
    real, calls = SynthesisFolder.save_result, []

    def killed_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    scorer, out = FirstDrawWeak(), tmp_path / "resumed"
    monkeypatch.setattr(SynthesisFolder, "save_result", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        build.main(build.parse_args([*flags, "--output_dir", str(out)]), scorer=scorer)
    monkeypatch.setattr(SynthesisFolder, "save_result", real)
    build.main(build.parse_args([*flags, "--output_dir", str(out)]), scorer=scorer)
    passes = {row["file_name"]: row["unet_passes"] for row in read_metadata(out).values()}
    assert passes["images/00000.png"] == 2 * passes["images/00001.png"]  # the redraw: this run's part alone is not the mean
    expected = (passes["images/00000.png"] + passes["images/00001.png"]) / 2
    assert SynthesisRecord.read(out).unet_passes_per_image == pytest.approx(expected)
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["unet_passes_per_kept_image"] == pytest.approx(expected) and summary["images_made_this_run"] == 1


def _hold_folder(path: str, held, release) -> None:
    with SynthesisFolder(path).writing():
        held.set()
        release.wait(300)


def test_a_second_build_on_a_busy_folder_is_told_so_and_writes_nothing(tiny_run, tmp_path):
    """Two processes: one holds the folder as a running build does; the builder started on it meanwhile stops."""
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_folder, args=(str(out), held, release))
    holder.start()
    try:
        assert held.wait(60)
        result = run_cli("build_dataset_defectfill.py", "--lora", tiny_run, "--output_dir", out, "--num_candidates", "1",
                         "--num_images", "1", "--num_inference_steps", "2")
        assert_refused(result, 1, f"error: --output_dir {out} is busy: another run is writing to it now")
        assert not (out / FINGERPRINT_FILENAME).exists() and not (out / LOCK_FILENAME).exists()
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0
    with SynthesisFolder(out).writing():  # free again once the first run ends
        pass
