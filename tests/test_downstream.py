"""downstream_defectfill.py: metrics against hand-computed cases, the copy-paste baseline,
and end-to-end runs on the bundled data with a synthetic set built by hand (no diffusion model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dataset_mvtec as dm
from defectfill.cli import settings_from_args
from defectfill.data.split import merge_splits
from defectfill.downstream import data as copy_paste_module
from defectfill.downstream.data import augment_batch, copy_paste_set, mask_center, real_defects, train_good_set
from defectfill.downstream.metrics import au_pro, auroc, average_precision, f1_max, image_scores_from_maps, localization_metrics, pro_curve
from defectfill.downstream.models import split_validation, train_localizer
from defectfill.downstream.report import CURVES_FILENAME, MAPS_FILENAME, RESULTS_FILENAME, format_cell, summarize, thin_curve
from defectfill.downstream.settings import DetectorModelSettings, DownstreamSettings
from defectfill.downstream.sources import SyntheticSource, count_test_set_reuse, leak_error, parse_synthetic_entry
from defectfill.errors import DownstreamError
from defectfill.runs.files import METADATA_FILENAME
from defectfill.runs.folder import SynthesisFolder, output_names
from defectfill.runs.records import SynthesisRecord
from tests.conftest import REPO_ROOT

# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def two_image_masks() -> np.ndarray:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:4] = True
    masks[0, 6:8, 6:8] = True
    return masks  # image 1 is defect-free


def test_a_perfect_map_scores_one_everywhere():
    masks = two_image_masks()
    figures = localization_metrics(torch.tensor(masks, dtype=torch.float32), torch.tensor(masks))
    assert figures == pytest.approx({k: 1.0 for k in figures})


def test_a_constant_map_scores_chance():
    masks = two_image_masks()
    constant = np.full(masks.shape, 0.3)
    prevalence = masks.mean()  # 8 / 128
    assert auroc(constant, masks) == pytest.approx(0.5)
    assert average_precision(constant, masks) == pytest.approx(prevalence)
    assert f1_max(constant, masks) == pytest.approx(2 * prevalence / (1 + prevalence), rel=1e-6)
    # PRO curve (0, 0) -> (1, 1): area up to 0.3 is 0.3^2 / 2, divided by 0.3.
    assert au_pro(constant, masks) == pytest.approx(0.15)


def test_au_pro_of_a_hand_computed_map():
    # One row: defect, defect, good, good. Scores 0.9, 0.2, 0.5, 0.1. Thresholds, highest first:
    # 0.9 -> FPR 0, PRO 1/2; 0.5 -> FPR 1/2, PRO 1/2; 0.2 -> FPR 1/2, PRO 1; 0.1 -> FPR 1, PRO 1.
    masks = np.array([[[True, True, False, False]]])
    scores = np.array([[[0.9, 0.2, 0.5, 0.1]]])
    fpr, pro = pro_curve(scores, masks)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and pro.tolist() == [0, 0.5, 0.5, 1, 1]
    assert au_pro(scores, masks, fpr_limit=0.3) == pytest.approx(0.5)  # 0.3 * 0.5 / 0.3
    assert au_pro(scores, masks, fpr_limit=0.6) == pytest.approx((0.5 * 0.5 + 0.1 * 1) / 0.6)


def test_au_pro_averages_regions_not_pixels():
    # Regions {0} (1 px) and {2, 3, 4} (3 px); good pixels 1 and 5. At threshold 0.8 the small region is
    # found and a third of the large one: PRO (1 + 1/3) / 2 = 2/3 with no false positive; a per-pixel
    # overlap would say 2/4.
    masks = np.array([[[True, False, True, True, True, False]]])
    scores = np.array([[[0.9, 0.3, 0.8, 0.1, 0.1, 0.2]]])
    assert au_pro(scores, masks) == pytest.approx(2 / 3)


def brute_force_au_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """AU-PRO the slow way: every distinct score as a threshold, regions labelled image by image."""
    from scipy import ndimage

    regions = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    region_masks = [labels == k for labels in regions for k in range(1, labels.max() + 1)]
    region_maps = [maps[i] for i, labels in enumerate(regions) for _ in range(labels.max())]
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel()), reverse=True):
        flagged = maps >= threshold
        fpr = (flagged & ~masks).sum() / (~masks).sum()
        pro = np.mean([(m[r] >= threshold).mean() for m, r in zip(region_maps, region_masks)])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    grid = np.linspace(0, fpr_limit, 30001)
    # the curve is a polyline through the points in threshold order (vertical steps where FPR repeats)
    return float(np.trapezoid(np.interp(grid, fpr, pro, right=pro[-1]), grid) / fpr_limit)


def test_au_pro_matches_a_brute_force_count_on_random_maps():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 1:4, 1:4] = masks[0, 8:11, 6:9] = True  # two regions in one image
    masks[1, 5:7, :] = True
    maps = rng.random(masks.shape).round(2) + masks * 0.3  # ties, and defects score higher on average
    for limit in (0.3, 1.0):
        assert au_pro(maps, masks, limit) == pytest.approx(brute_force_au_pro(maps, masks, limit), abs=2e-3)


def test_image_score_is_the_max_of_the_pooled_map():
    maps = torch.zeros(2, 5, 5)
    maps[0, 2, 2] = 1.0
    maps[1] = 0.5
    # 3x3 mean around the single hot pixel: 1/9; a constant map stays constant (away from the zero padding).
    assert image_scores_from_maps(maps, pool_size=3).tolist() == pytest.approx([1 / 9, 0.5])


def test_metrics_refuse_a_single_class():
    with pytest.raises(ValueError, match="one class"):
        auroc([0.1, 0.2], [1, 1])


# ----------------------------------------------------------------------------------------------------
# Copy-paste baseline
# ----------------------------------------------------------------------------------------------------


def test_copy_paste_keeps_the_background_exact_and_moves_the_defect():
    rng = np.random.default_rng(0)
    good, defect = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:5, 3:6] = True  # centre (3, 4)
    image, moved = copy_paste_module.copy_paste(good, defect, mask, target_center=(10, 8))
    assert moved.sum() == mask.sum() and mask_center(moved) == (10, 8)
    assert np.array_equal(image[~moved], good[~moved])
    assert np.array_equal(image[moved], defect[mask])
    # A target near the border: the shift is clipped so the whole defect stays in the image.
    _, clipped = copy_paste_module.copy_paste(good, defect, mask, target_center=(15, 15))
    assert clipped.sum() == mask.sum() and clipped[13:16, 13:16].all()


def test_copy_paste_set_follows_the_targets_types_and_positions(synthetic_data_dir):
    split = dm.few_shot_split(dm.load_mvtec_defects(synthetic_data_dir, "metal_nut"))
    real = real_defects(synthetic_data_dir, "metal_nut", split, "train", 64)
    goods = train_good_set(synthetic_data_dir, "metal_nut", 64)
    targets = real_defects(synthetic_data_dir, "metal_nut", split, "heldout", 64)
    pasted = copy_paste_set(real, goods, targets, count=len(targets), seed=0)
    assert pasted.defect_types == targets.defect_types
    for index in range(len(pasted)):
        assert pasted.masks[index].any()
        row, col = mask_center(pasted.masks[index].numpy())
        target_row, target_col = mask_center(targets.masks[index].numpy())
        # at the target's centre unless clipping at the border moved it
        assert (row, col) == (target_row, target_col) or not pasted.masks[index][1:-1, 1:-1].all()
    assert copy_paste_set(real, goods, targets, len(targets), seed=0).images.equal(pasted.images)


def test_merge_splits_refuses_two_different_splits_of_one_defect_type():
    a = {"defect_types": {"color": {"train": ["x/1.png"], "heldout": ["x/2.png"]}}}
    b = {"defect_types": {"color": {"train": ["x/2.png"], "heldout": ["x/1.png"]}}}
    scratch = {"defect_types": {"scratch": {"train": ["y/1.png"], "heldout": ["y/2.png"]}}}
    assert sorted(merge_splits([("a", a), ("s", scratch)])["defect_types"]) == ["color", "scratch"]
    with pytest.raises(dm.DatasetError, match="differ for defect type 'color'"):
        merge_splits([("a", a), ("b", b)])


# ----------------------------------------------------------------------------------------------------
# End to end, on the bundled data with a hand-made synthetic set
# ----------------------------------------------------------------------------------------------------


def write_builder_folder(folder: Path, data_dir: Path, split: dict, leak: bool = False) -> Path:
    """A folder in the builder's layout, made without the diffusion model: 9 images of metal_nut, each the
    real training defects cut out and pasted onto a train/good image where they were (every third image holds
    both types: `combined`, a union mask, one mask per defect); rows record the training masks as their
    sources (`mask_from: train`). synthesis.json holds the first type's split as the record's and both under
    "runs", as builds before the merged split did. `leak`: the first row's defect in a held-out test mask."""
    real = real_defects(data_dir, "metal_nut", split, "train", 128)
    goods = train_good_set(data_dir, "metal_nut", 128)
    by_type = {t: [i for i, d in enumerate(real.defect_types) if d == t] for t in ("color", "scratch")}
    train_masks = {t: [str(m) for m in dm.list_split_masks(data_dir, split, t, "train")] for t in by_type}
    rows = []
    for index in range(9):
        types = ["color", "scratch"] if index % 3 == 2 else [("color", "scratch")[index % 2]]
        image, union = goods.images[index % len(goods)].permute(1, 2, 0).numpy(), np.zeros((128, 128), dtype=bool)
        image_name, mask_name = output_names(index)
        part_names, sources = [], []
        for slot, defect_type in enumerate(types):
            source = by_type[defect_type][index % len(by_type[defect_type])]
            image, part = copy_paste_module.copy_paste(image, real.images[source].permute(1, 2, 0).numpy(),
                                                       real.masks[source].numpy())
            union |= part
            part_names.append(f"defect_masks/{index:05d}_{slot}_{defect_type}_mask.png")
            sources.append(train_masks[defect_type][index % len(train_masks[defect_type])])
            save(folder / part_names[-1], part.astype(np.uint8) * 255)
        save(folder / image_name, image)
        save(folder / mask_name, union.astype(np.uint8) * 255)
        rows.append({"file_name": image_name, "mask_file_name": mask_name, "object_class": "metal_nut",
                     "defect_type": types[0] if len(types) == 1 else "combined", "defect_types": types,
                     "defect_mask_file_names": part_names, "source_masks": sources, "augmented": [True] * len(types),
                     "source_image": str(data_dir / "metal_nut" / "train" / "good" / f"{index % len(goods):03d}.png"),
                     "mask_from": "train"})
    if leak:
        rows[0]["source_masks"] = [str(dm.list_split_masks(data_dir, split, rows[0]["defect_types"][0], "heldout")[0])]
    (folder / METADATA_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = split["defect_types"]
    record = SynthesisRecord(pretrained_model_name_or_path="none (hand-made)", prompt="", resolution=128, object_class="metal_nut",
                             data_dir=str(data_dir), split={"defect_types": {"color": entries["color"]}}, mask_from="train")
    runs = {t: {"lora": f"runs/{t}", "split": {"defect_types": {t: entries[t]}}} for t in entries}
    SynthesisFolder(folder).write_record(record, {"runs": runs})
    return folder


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def metal_nut_split(synthetic_data_dir):
    return dm.few_shot_split(dm.load_mvtec_defects(synthetic_data_dir, "metal_nut"))


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory, synthetic_data_dir, metal_nut_split):
    return write_builder_folder(tmp_path_factory.mktemp("synthetic") / "handmade-metal_nut", synthetic_data_dir, metal_nut_split)


def tiny_flags(synthetic_folder, output_dir, *extra: str) -> list[str]:
    return [*extra, "--synthetic", f"handmade={synthetic_folder}", "--output_dir", str(output_dir), "--resolution", "64",
            "--encoder", "resnet18", "--encoder_depth", "3", "--decoder_channels", "64", "32", "16",
            "--classifier", "resnet18", "--epochs", "4", "--samples_per_epoch", "24", "--batch_size", "8",
            "--learning_rate", "1e-3", "--classifier_epochs", "1", "--classifier_repeats", "1", "--seeds", "0",
            "--no-progress"]


@pytest.mark.slow
def test_end_to_end_on_a_builder_folder(tmp_path, synthetic_folder, capsys):
    """main() as the CLI calls it, on a builder-layout folder with two defect types and combined images: the
    test set holds both types (every run's split merged), the table has the real+ sets and the size sweep,
    the classifier leaves the combined images out, no leak note; JSON and figures written; a localizer trained
    on copy-paste defects beats the untrained one on pixel AUROC; the same seed again gives the same figures.
    (In-process: a subprocess would pay torch's and the libraries' imports again.)"""
    import downstream_defectfill as downstream

    results = downstream.main(downstream.parse_args(tiny_flags(synthetic_folder, tmp_path / "run", "--synthetic_shares", "1")))
    printed = capsys.readouterr().out
    for row in ("| untrained |", "| real_only |", "| copy_paste |", "| handmade |", "| real+copy_paste |",
                "| real+handmade |", "| SeaS (reported) |", "| real_only | 0 |", "| real+handmade (1x) | 4 (1x) |"):
        assert row in printed
    assert "random init" in printed and "LEAK" not in printed
    assert "handmade: 9 images, masks from train (none is a held-out test mask" in printed
    assert "classifier: the images with several defect types (combined: 3 of copy_paste, 3 of handmade" in printed
    assert json.loads((tmp_path / "run" / RESULTS_FILENAME).read_text()) == json.loads(json.dumps(results))
    assert (tmp_path / "run" / CURVES_FILENAME).is_file() and (tmp_path / "run" / MAPS_FILENAME).is_file()
    assert results["test_set"] == {"color": 4, "good": 4, "scratch": 4} and results["classes"] == ["color", "scratch"]
    assert not results["leaky"] and results["test_set_reuse"]["handmade"] == {"masks": 0, "images": 0, "rows": 9}
    sets = results["training_sets"]
    assert sets["real+handmade"] == {"images": 13, "augmented": 4, "defect_types": ["color", "combined", "scratch"]}
    assert sets["copy_paste"]["images"] == 9 and sets["copy_paste"]["defect_types"] == ["color", "combined", "scratch"]
    assert sets["real+handmade (1x)"]["images"] == 8 and sets["real+handmade (1x)"]["augmented"] == 4
    assert results["sweep"] == {"handmade": {"1": "real+handmade (1x)"}} and "real+copy_paste (1x)" not in sets
    summary = results["summary"]
    # A few dozen samples learn little when no defect sits where the test's do, but more than nothing.
    assert summary["copy_paste"]["pixel_auroc"]["mean"] > summary["untrained"]["pixel_auroc"]["mean"] + 0.05
    assert summary["untrained"]["classification_accuracy"]["mean"] is None
    assert 0 <= summary["real+handmade"]["classification_accuracy"]["mean"] <= 1

    # The same seed again, the synthetic set alone: the same figures.
    again = downstream.main(downstream.parse_args(tiny_flags(synthetic_folder, tmp_path / "again", "--baselines", "--no-with_real")))
    assert list(again["per_seed"]) == ["handmade"] and again["per_seed"]["handmade"] == results["per_seed"]["handmade"]


def test_a_set_made_from_the_test_set_is_refused_unless_allowed(tmp_path, synthetic_data_dir, metal_nut_split, capsys):
    import downstream_defectfill as downstream

    leaky = write_builder_folder(tmp_path / "leaky", synthetic_data_dir, metal_nut_split, leak=True)
    flags = tiny_flags(leaky, tmp_path / "out", "--baselines", "--no-with_real", "--epochs", "1", "--samples_per_epoch", "8")
    with pytest.raises(DownstreamError, match=r"--synthetic handmade: 1 of 9 images have a defect painted in a held-out"):
        downstream.main(downstream.parse_args(flags))
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written
    results = downstream.main(downstream.parse_args([*flags, "--allow_test_leak"]))
    table = (tmp_path / "out" / "downstream_table.md").read_text()
    assert table.startswith("LEAKY") and "LEAK handmade: 1 of 9 images" in table and results["leaky"]


def test_copy_paste_copies_every_defect_of_a_combined_target(synthetic_data_dir, synthetic_folder, metal_nut_split):
    from defectfill.downstream.sources import load_synthetic_set, read_synthetic_sources

    targets = load_synthetic_set(read_synthetic_sources([str(synthetic_folder)])[0], "metal_nut", 64)
    assert targets.defect_types[2] == "combined" and [t for t, _ in targets.parts[2]] == ["color", "scratch"]
    real = real_defects(synthetic_data_dir, "metal_nut", metal_nut_split, "train", 64)
    goods = train_good_set(synthetic_data_dir, "metal_nut", 64)
    pasted = copy_paste_set(real, goods, targets, count=len(targets), seed=0)
    assert pasted.defect_types == targets.defect_types
    assert [t for t, _ in pasted.parts[2]] == ["color", "scratch"] and " + " in pasted.names[2]
    assert pasted.masks[2].sum() > max(pasted.masks[0].sum(), pasted.masks[1].sum()) * 0.9  # the union of two defects


def test_every_runs_split_is_merged_for_the_test_set(synthetic_folder):
    from defectfill.downstream.sources import collect_split, read_synthetic_sources

    split = collect_split(None, read_synthetic_sources([str(synthetic_folder)]))
    assert sorted(split["defect_types"]) == ["color", "scratch"]


def test_bad_inputs_name_the_flag(tmp_path, synthetic_data_dir):
    import downstream_defectfill as downstream

    (tmp_path / "empty").mkdir()
    with pytest.raises(DownstreamError, match="no metadata.jsonl"):
        downstream.main(downstream.parse_args(["--synthetic", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")]))
    with pytest.raises(DownstreamError, match="--split_file"):
        downstream.main(downstream.parse_args(["--data_dir", str(synthetic_data_dir), "--object_class", "metal_nut",
                                               "--output_dir", str(tmp_path / "o")]))


def write_rows(folder: Path, rows: list[dict]) -> SyntheticSource:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_FILENAME).write_text("".join(
        json.dumps({"file_name": f"images/{i}.png", "mask_file_name": f"masks/{i}.png", **row}) + "\n" for i, row in enumerate(rows)))
    return SyntheticSource(folder.name, [folder], [None])


def test_synthetic_rows_made_from_the_test_set_are_counted(tmp_path, synthetic_data_dir):
    """infer_defectfill.py's `source_mask`, the builder's `source_masks` (an augmented mask counts by the real
    mask it came from) and a recorded `mask_from: heldout` all count; the training masks and a user's do not."""
    split = dm.few_shot_split(dm.load_mvtec_defects(synthetic_data_dir, "metal_nut"))
    heldout = [str(p) for p in dm.list_split_masks(synthetic_data_dir, split, "color", "heldout")]
    train = [str(p) for p in dm.list_split_masks(synthetic_data_dir, split, "scratch", "train")]
    moved = "/elsewhere/" + "/".join(Path(heldout[1]).parts[-4:])  # the data folder moved since: the same mask
    rows = [
        {"source_mask": heldout[0], "source_image": "data/metal_nut/train/good/001.png"},
        {"source_mask": train[0], "source_image": "data/metal_nut/test/good/002.png"},
        {"source_mask": "masks/own.png", "source_image": "data/metal_nut/train/good/004.png"},
        {"source_masks": [train[0], moved], "augmented": [True, True], "source_image": "data/metal_nut/train/good/003.png"},
        {"source_masks": [train[1]], "augmented": [True], "mask_from": "train", "source_image": "x/train/good/000.png"},
        {"source_mask": "masks/copied.png", "mask_from": "heldout", "source_image": "x/train/good/000.png"},
    ]
    source = write_rows(tmp_path / "s", rows)
    assert count_test_set_reuse(source, split, synthetic_data_dir) == {"masks": 3, "images": 1, "rows": 6}
    message = leak_error("s", {"masks": 3, "images": 1, "rows": 6})
    assert "3 of 6 images" in message and "1 of 6 images were painted on test/good" in message
    assert "--mask_from train" in message and "--allow_test_leak" in message
    clean = write_rows(tmp_path / "clean", rows[4:5])
    assert count_test_set_reuse(clean, split, synthetic_data_dir) == {"masks": 0, "images": 0, "rows": 1}
    assert leak_error("clean", {"masks": 0, "images": 0, "rows": 1}) is None


def test_augmentation_moves_image_and_mask_together():
    masks = torch.zeros(6, 8, 8)
    masks[:, 1:3, 2:7] = 1  # not symmetric under flips or turns
    images = masks[:, None].repeat(1, 3, 1, 1) * 0.8 + 0.1
    out_images, out_masks = augment_batch(images, masks, torch.Generator().manual_seed(0))
    assert not torch.equal(out_masks, masks)  # six draws: some flip or turn happened
    for image, mask in zip(out_images, out_masks):
        assert torch.equal(image[0] > image[0].mean(), mask.bool())


def test_small_helpers_of_the_report():
    assert parse_synthetic_entry("ours=a/x,a/y") == ("ours", [Path("a/x"), Path("a/y")])
    assert parse_synthetic_entry("a/x") == ("x", [Path("a/x")])
    assert summarize([0.5, 0.7, None]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414213), "n": 2}
    assert format_cell(summarize([0.5, 0.7])) == "60.0 ± 14.1"
    x = np.linspace(0, 1, 10001)
    thin_x, thin_y = thin_curve(x, x ** 2, points=101)
    assert len(thin_x) == 101 and thin_x[0] == 0 and thin_x[-1] == 1 and np.allclose(thin_y, thin_x ** 2)


def test_early_stopping_chooses_on_a_validation_set_carved_from_training(synthetic_data_dir):
    import downstream_defectfill as downstream

    split = dm.few_shot_split(dm.load_mvtec_defects(synthetic_data_dir, "metal_nut"))
    goods = train_good_set(synthetic_data_dir, "metal_nut", 32)
    real = real_defects(synthetic_data_dir, "metal_nut", split, "train", 32)
    defects = copy_paste_set(real, goods, None, count=8, seed=0)
    settings = settings_from_args(DownstreamSettings, downstream.parse_args([
        "--resolution", "32", "--encoder", "resnet18", "--encoder_depth", "3", "--decoder_channels", "16", "16", "16",
        "--epochs", "3", "--samples_per_epoch", "8", "--validation_fraction", "0.25", "--patience", "1", "--no-progress"]))
    assert settings.model == DetectorModelSettings(32, "resnet18", 3, (16, 16, 16))
    _, history = train_localizer(settings.model, settings.training, defects, goods, seed=0, device="cpu", label="test")
    assert 1 <= len(history["validation_pixel_ap"]) <= 3 and len(history["loss"]) == len(history["validation_pixel_ap"])
    best = int(np.argmax(history["validation_pixel_ap"])) + 1
    assert history["epoch_kept"] == best
    train_part, validation_part = split_validation(defects, 0.25, seed=0)
    assert len(validation_part) == 2 and not set(train_part.names) & set(validation_part.names)


def test_the_readme_demo_config_parses_to_the_documented_settings():
    import downstream_defectfill as downstream

    args = downstream.parse_args(["--config", str(REPO_ROOT / "configs" / "tiny_downstream.yaml")])
    assert args.synthetic == ["defectfill=outputs/tiny-dataset-metal_nut"] and args.seeds == [0, 1, 2]
    assert (args.resolution, args.encoder, args.encoder_depth, args.decoder_channels) == (64, "resnet18", 3, [64, 32, 16])
    assert (args.epochs, args.samples_per_epoch, args.encoder_weights, args.validation_fraction) == (8, 48, "none", 0.0)
    assert args.synthetic_shares == [1, 2] and args.with_real and not args.allow_test_leak
    build = yaml.safe_load((REPO_ROOT / "configs" / "tiny_build.yaml").read_text())
    assert (build["output_dir"], build["mask_augment"], build["mask_from"]) == ("outputs/tiny-dataset-metal_nut", True, "train")
    readme = (REPO_ROOT / "README.md").read_text()
    block = ("python train_defectfill.py --config configs/tiny.yaml --defect_type all --output_dir outputs/tiny-metal_nut\n"
             "python build_dataset_defectfill.py --config configs/tiny_build.yaml\n"
             "python downstream_defectfill.py --config configs/tiny_downstream.yaml\n")
    assert block in readme and block in (REPO_ROOT / "docs" / "downstream.md").read_text()


def test_only_the_images_marked_to_be_are_augmented(synthetic_data_dir, metal_nut_split):
    """In real+NAME the real defects are augmented and the generated images are used as they are."""
    from defectfill.downstream.data import concat_sets
    from defectfill.downstream.models import localizer_batch

    real = real_defects(synthetic_data_dir, "metal_nut", metal_nut_split, "train", 32)
    goods = train_good_set(synthetic_data_dir, "metal_nut", 32)
    generated = copy_paste_set(real, goods, None, count=4, seed=0)
    mixed = concat_sets([real.augmented(), generated])
    assert mixed.augment.tolist() == [True] * len(real) + [False] * 4
    as_is = concat_sets([real, generated])
    images, masks = localizer_batch(as_is, goods, 64, torch.Generator().manual_seed(0))
    pool = torch.cat([as_is.images, goods.images]).float() / 255
    assert all(any(torch.equal(image, p) for p in pool) for image in images)  # nothing was flipped or jittered
    images, _ = localizer_batch(mixed, goods, 64, torch.Generator().manual_seed(0))
    changed = [not any(torch.equal(image, p) for p in pool) for image in images]
    assert any(changed) and not all(changed)
