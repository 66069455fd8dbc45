"""infer_defectfill: single and batch synthesis, Low-Fidelity Selection, exact background, the
imagefolder output, reproducibility, resuming, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import infer_defectfill as infer
from defectfill import painting
from defectfill.errors import DatasetError, RunFileError, SynthesisError
from defectfill.painting import select_candidate
from defectfill.runs.files import LORA_FILENAME, METADATA_FILENAME, PREVIEW_FILENAME, RUN_FILENAME, SYNTHESIS_FILENAME
from defectfill.runs.folder import read_metadata
from defectfill.runs.records import RunRecord, SynthesisRecord
from defectfill.scoring import LpipsModel
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL

FAST = ("--num_inference_steps", "2", "--num_candidates", "3")


class FixedScorer:
    """Known scores per candidate: the selection must take the argmax."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), 0

    def __call__(self, clean, candidates, mask):
        self.calls += 1
        assert len(candidates) == len(self.scores)
        return list(self.scores)


def run(tiny_run, output_dir, *extra, scorer=None):
    args = infer.parse_args(["--lora", str(tiny_run), "--output_dir", str(output_dir), *FAST, *extra])
    return infer.main(args, scorer=scorer or FixedScorer([0.1, 0.9, 0.3]))


def small_pair(tmp_path, size=64):
    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "good" / "001.png").resize((size, size), Image.BICUBIC)
    mask = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "004_mask.png").resize((size, size), Image.NEAREST)
    image.save(tmp_path / "good.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path / "good.png", tmp_path / "mask.png"


def test_single_mode_selects_argmax_and_keeps_background(tiny_run, tmp_path):
    image_path, mask_path = small_pair(tmp_path)
    out = run(tiny_run, tmp_path / "out", "--image_path", str(image_path), "--mask_path", str(mask_path), "--save_candidates")
    row = json.loads((out / METADATA_FILENAME).read_text().splitlines()[0])
    assert row["candidate"] == 1 and row["lpips"] == pytest.approx(0.9) and row["prompt"] == "A metal nut with sks"
    generated = np.asarray(Image.open(out / row["file_name"]))
    clean = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path)) > 127
    assert np.array_equal(generated[~mask], clean[~mask])  # pixel for pixel outside the mask
    assert not np.array_equal(generated[mask], clean[mask])
    # At model resolution (no crop), the kept image is candidate 1 itself.
    assert np.array_equal(generated, np.asarray(Image.open(out / "candidates" / "00000_1.png")))
    assert len(list((out / "candidates").iterdir())) == 3


def test_batch_mode_from_the_run_split_full_resolution(tiny_run, tmp_path):
    out = run(tiny_run, tmp_path / "out", "--num_images", "5", "--batch_size", "2")
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 5
    assert {"image", "mask", "source_image", "source_mask", "seed", "lpips", "prompt"} <= set(ds.column_names)
    heldout_masks = {f"{i:03d}_mask.png" for i in range(2, 6)}  # the run's split holds out 002-005
    assert {Path(p).name for p in ds["source_mask"]} <= heldout_masks
    for row in ds:
        generated = np.asarray(row["image"].convert("RGB"))
        clean = np.asarray(Image.open(row["source_image"]).convert("RGB"))
        mask = np.asarray(row["mask"]) > 127
        assert generated.shape == clean.shape == (128, 128, 3)  # full resolution, not the model's 64
        assert np.array_equal(generated[~mask], clean[~mask])
    assert (out / PREVIEW_FILENAME).is_file() and (out / SYNTHESIS_FILENAME).is_file()
    assert SynthesisRecord.read(out).mask_from == "heldout" and set(ds["mask_from"]) == {"heldout"}


def test_mask_from_train_paints_in_the_training_masks_only(tiny_run, tmp_path):
    """--mask_from train: the run's training masks (000, 001), recorded in synthesis.json and every row, and the
    downstream check finds nothing of the test set in the folder."""
    from defectfill.downstream.sources import count_test_set_reuse, read_synthetic_sources

    out = run(tiny_run, tmp_path / "out", "--num_images", "3", "--mask_from", "train", "--num_candidates", "1")
    rows = read_metadata(out).values()
    assert [Path(r["source_mask"]).name for r in rows] == ["000_mask.png", "001_mask.png", "000_mask.png"]
    record = SynthesisRecord.read(out)
    assert record.mask_from == "train" and {r["mask_from"] for r in rows} == {"train"}
    assert count_test_set_reuse(read_synthetic_sources([str(out)])[0], record.split, SYNTHETIC_DATA)["masks"] == 0


def test_same_seed_same_images_whatever_the_batch_size(tiny_run, tmp_path):
    first = run(tiny_run, tmp_path / "a", "--num_images", "3", "--batch_size", "1")
    again = run(tiny_run, tmp_path / "b", "--num_images", "3", "--batch_size", "1")
    batched = run(tiny_run, tmp_path / "c", "--num_images", "3", "--batch_size", "3")
    other = run(tiny_run, tmp_path / "d", "--num_images", "3", "--seed", "5")
    for name in ("00000.png", "00001.png", "00002.png"):
        a = np.asarray(Image.open(first / "images" / name)).astype(int)
        assert np.array_equal(a, np.asarray(Image.open(again / "images" / name)))
        # Per-candidate generators make batching irrelevant up to float rounding of batched kernels.
        assert np.abs(a - np.asarray(Image.open(batched / "images" / name)).astype(int)).max() <= 2
        assert np.abs(a - np.asarray(Image.open(other / "images" / name)).astype(int)).max() > 10


def test_random_pairing_is_seeded():
    goods, masks = [Path(f"g{i}") for i in range(5)], [Path(f"m{i}") for i in range(3)]
    assert infer.make_pairs(goods, masks, 4, "random", 1) == infer.make_pairs(goods, masks, 4, "random", 1)
    robin = infer.make_pairs(goods, masks, 4, "round_robin", 0)
    assert [(p.image_path.name, p.mask_path.name) for p in robin] == [("g0", "m0"), ("g1", "m1"), ("g2", "m2"), ("g3", "m0")]


def test_rerun_skips_existing_outputs(tiny_run, tmp_path, monkeypatch):
    out = run(tiny_run, tmp_path / "out", "--num_images", "3")
    before = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    calls = []
    real = painting.generate_candidates
    monkeypatch.setattr(painting, "generate_candidates",
                        lambda pipe, jobs, s, *rest: calls.append(len(jobs)) or real(pipe, jobs, s, *rest))
    run(tiny_run, out, "--num_images", "3")
    assert calls == [] and {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    (out / "images" / "00001.png").unlink()
    run(tiny_run, out, "--num_images", "3")
    assert calls == [1] and len(read_metadata(out)) == 3


def test_interrupted_run_leaves_no_partial_files(tiny_run, tmp_path, monkeypatch):
    real, calls = painting.generate_candidates, []

    def fail_on_second(pipe, jobs, settings, *rest):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pipe, jobs, settings, *rest)

    monkeypatch.setattr(painting, "generate_candidates", fail_on_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run, out, "--num_images", "3")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["00000_mask.png"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert list(read_metadata(out)) == ["images/00000.png"]


def test_lpips_scorer_sees_only_the_mask(offline_lpips_weights):
    scorer = LpipsModel("alex").masked_scores  # real lpips code; the backbone's weights are the fixture's (offline)
    rng = np.random.default_rng(0)
    clean = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    changed_inside = np.asarray(clean).copy()
    changed_inside[16:48, 16:48] = 255 - changed_inside[16:48, 16:48]
    changed_outside = np.asarray(clean).copy()
    changed_outside[:8] = 0
    scores = scorer(clean, [clean, Image.fromarray(changed_inside), Image.fromarray(changed_outside)], Image.fromarray(mask))
    assert scores[0] == pytest.approx(0, abs=1e-6)
    # Deep LPIPS features see a little past the mask's edge; with --composite (the default) candidates
    # equal the clean image outside the mask anyway.
    assert scores[1] > 5 * max(scores[2], 1e-6)
    assert select_candidate(scores) == 1


def test_the_lpips_selection_runs_offline_and_keeps_the_highest_score(tiny_run, tmp_path, offline_lpips_weights):
    """No scorer given: infer loads LPIPS (its AlexNet from the fixture's TORCH_HOME) and keeps the candidate whose
    LPIPS inside the mask is highest, as the row records it."""
    image_path, mask_path = small_pair(tmp_path)
    args = infer.parse_args(["--lora", str(tiny_run), "--output_dir", str(tmp_path / "o"), *FAST,
                             "--image_path", str(image_path), "--mask_path", str(mask_path)])
    out = infer.main(args)
    row = json.loads((out / METADATA_FILENAME).read_text())
    scores = row["candidate_scores"]
    assert len(scores) == 3 and len(set(scores)) == 3 and min(scores) > 0
    assert row["candidate"] == select_candidate(scores) and row["lpips"] == max(scores)
    assert row["unet_passes"] == SynthesisRecord.read(out).unet_passes_per_image == 3 * 3  # PNDM: 2 steps, 3 UNet calls


def test_without_crop_the_whole_image_is_resized(tiny_run, tmp_path):
    out = run(tiny_run, tmp_path / "out", "--num_images", "1", "--no-crop_to_mask")
    row = json.loads((out / METADATA_FILENAME).read_text())
    assert row["crop_box"] == [0, 0, 128, 128]
    assert Image.open(out / row["file_name"]).size == (128, 128)


def test_single_candidate_needs_no_scorer(tiny_run, tmp_path):
    image_path, mask_path = small_pair(tmp_path)
    args = infer.parse_args(["--lora", str(tiny_run), "--output_dir", str(tmp_path / "o"), "--num_inference_steps", "2",
                             "--num_candidates", "1", "--image_path", str(image_path), "--mask_path", str(mask_path)])
    out = infer.main(args)  # no LPIPS model is built
    assert json.loads((out / METADATA_FILENAME).read_text())["candidate"] == 0


def test_push_to_hub_uploads_a_dataset_repo(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/synthetic"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **k: calls.setdefault("create", (repo_id, k)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.setdefault("upload", k))
    out = run(tiny_run, tmp_path / "synthetic", "--num_images", "1", "--push_to_hub")
    assert calls["create"][1]["repo_type"] == "dataset" and calls["upload"]["repo_type"] == "dataset"
    assert calls["upload"]["folder_path"] == str(out)


# ---------------------------------------------------------------------------------------- bad input


def test_single_mode_needs_both_paths(capsys):
    with pytest.raises(SystemExit):
        infer.parse_args(["--lora", "x", "--image_path", "a.png"])
    assert "needs both --image_path and --mask_path" in capsys.readouterr().err


def test_empty_mask_is_rejected(tiny_run, tmp_path):
    image_path, mask_path = small_pair(tmp_path)
    Image.new("L", (64, 64), 0).save(mask_path)
    with pytest.raises(SynthesisError, match=r"mask .*mask\.png is empty"):
        run(tiny_run, tmp_path / "out", "--image_path", str(image_path), "--mask_path", str(mask_path))
    assert not (tmp_path / "out" / "images").exists()


def test_folders_without_images_cannot_be_paired(tiny_run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthesisError, match="--mask_dir .*empty holds no image files"):
        run(tiny_run, tmp_path / "out", "--image_dir", str(SYNTHETIC_DATA / "metal_nut" / "train" / "good"),
            "--mask_dir", str(tmp_path / "empty"))


def test_run_folder_without_lora_weights(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunFileError, match="has no pytorch_lora_weights.safetensors"):
        infer.main(infer.parse_args(["--lora", str(tmp_path / "run")]))


def test_lora_of_another_architecture_names_the_mismatch(tiny_run, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("checkpoint-*"))
    state = load_file(other / "pytorch_lora_weights.safetensors")
    key = next(k for k in state if k.startswith("unet.") and ("lora.down" in k or "lora_A" in k))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2)
    save_file(state, other / "pytorch_lora_weights.safetensors")
    image_path, mask_path = small_pair(tmp_path)
    with pytest.raises(SynthesisError, match=r"trained on .*tiny-sd2-inpainting.*expects input size \d+, the base model has in_features"):
        run(other, tmp_path / "out", "--image_path", str(image_path), "--mask_path", str(mask_path))


def test_base_that_is_not_inpainting_is_rejected(tiny_run, tmp_path, tiny_model_path):
    base = tmp_path / "not_inpainting"
    shutil.copytree(tiny_model_path, base)
    config = json.loads((base / "unet" / "config.json").read_text())
    config["in_channels"] = 4
    (base / "unet" / "config.json").write_text(json.dumps(config))
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_config(config).save_pretrained(base / "unet")
    image_path, mask_path = small_pair(tmp_path)
    with pytest.raises(SynthesisError, match="4 input channels; DefectFill needs an inpainting model"):
        run(tiny_run, tmp_path / "out", "--pretrained_model_name_or_path", str(base), "--image_path", str(image_path),
            "--mask_path", str(mask_path))


def test_lora_that_is_neither_folder_nor_reachable_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunFileError, match="--lora someone/missing-run is not a local folder"):
        infer.main(infer.parse_args(["--lora", "someone/missing-run", "--output_dir", str(tmp_path / "o")]))


def test_lpips_without_backbone_weights_says_how_to_provide_them(monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models, "alexnet", offline)
    with pytest.raises(SynthesisError, match=r"backbone weights.*\$TORCH_HOME/hub/checkpoints.*--num_candidates 1"):
        LpipsModel("alex")


# ------------------------------------------------------------------------------------ training scale


def test_synthesis_follows_the_scale_the_run_trained_at(tiny_run, tmp_path):
    """A run that trained some samples on defect crops is applied to crops around the mask. The run records the
    config's scale (whatever the config chooses); synthesis runs on a copy of it marked as trained with crops."""
    record = RunRecord.read(tiny_run)
    config = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    assert record.defect_crop_probability == config["defect_crop_probability"] and record.max_scale == config["max_scale"]
    cropped = tmp_path / "cropped"
    shutil.copytree(tiny_run, cropped, ignore=shutil.ignore_patterns("checkpoint-*"))
    payload = json.loads((cropped / RUN_FILENAME).read_text())
    payload.update(defect_crop_probability=0.75, crop_context=payload.get("crop_context") or 0.5)
    (cropped / RUN_FILENAME).write_text(json.dumps(payload))
    record = RunRecord.read(cropped)
    out = run(cropped, tmp_path / "out", "--num_images", "1")
    synthesis_record = SynthesisRecord.read(out)
    assert synthesis_record.crop_to_mask and synthesis_record.crop_context == record.crop_context
    assert synthesis_record.scale_source == "the run's training scale"
    row = json.loads((out / METADATA_FILENAME).read_text())
    assert row["crop_box"] != [0, 0, 128, 128]  # a crop around the mask, as the run trained some of its samples

    flagged = run(cropped, tmp_path / "flags", "--num_images", "1", "--no-crop_to_mask")
    assert SynthesisRecord.read(flagged).scale_source == "flags"
    assert not SynthesisRecord.read(flagged).crop_to_mask


def test_a_run_trained_on_whole_images_is_applied_to_whole_images(tiny_run, tmp_path):
    """The paper's setting (no defect crops) and a record that says nothing of the scale both give whole-image
    synthesis."""
    for name, change in (("paper", {"defect_crop_probability": 0.0}), ("unrecorded", {"defect_crop_probability": None})):
        other = tmp_path / name
        shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("checkpoint-*"))
        payload = json.loads((other / RUN_FILENAME).read_text())
        payload["training"].update(change)
        payload["training"] = {k: v for k, v in payload["training"].items() if v is not None}
        (other / RUN_FILENAME).write_text(json.dumps(payload))
        out = run(other, tmp_path / f"out-{name}", "--num_images", "1")
        assert not SynthesisRecord.read(out).crop_to_mask, name
        assert json.loads((out / METADATA_FILENAME).read_text())["crop_box"] == [0, 0, 128, 128], name


def test_prompt_without_a_run_file_names_the_missing_flag(tiny_run, tmp_path):
    """A LoRA trained elsewhere (no defectfill_run.json): --prompt alone cannot find the good images."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / LORA_FILENAME, bare / LORA_FILENAME)
    args = infer.parse_args(["--lora", str(bare), "--pretrained_model_name_or_path", str(TINY_MODEL), "--prompt", "A metal nut with sks",
                             "--data_dir", str(SYNTHETIC_DATA), "--output_dir", str(tmp_path / "o"), *FAST])
    with pytest.raises(DatasetError, match="--object_class is needed"):
        infer.main(args, scorer=FixedScorer([0.1, 0.9, 0.3]))
