"""dataset_mvtec: layouts, columns, the few-shot split, the paired transform, and every bad input."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_mvtec as dm
from defectfill.runs.files import SPLIT_FILENAME
from scripts.tiny.synthetic_data import generate_dataset


def test_synthetic_generator_is_deterministic_and_matches_bundled_copy(tmp_path, synthetic_data_dir):
    generated = generate_dataset(tmp_path / "regen", seed=0)
    bundled = sorted(p.relative_to(synthetic_data_dir) for p in synthetic_data_dir.rglob("*.png"))
    regenerated = sorted(p.relative_to(generated) for p in generated.rglob("*.png"))
    assert bundled == regenerated
    for relative in bundled:
        assert np.array_equal(
            np.asarray(Image.open(synthetic_data_dir / relative)), np.asarray(Image.open(generated / relative))
        ), relative


def test_synthetic_defects_differ_clearly_from_the_object(synthetic_data_dir):
    for category in ("wood", "metal_nut"):
        for defect in ("scratch", "color"):
            image = np.asarray(Image.open(synthetic_data_dir / category / "test" / defect / "000.png"), dtype=float)
            mask = dm.binarize_mask(Image.open(synthetic_data_dir / category / "ground_truth" / defect / "000_mask.png"))
            inside, outside = image[mask].mean(0), image[~mask].mean(0)
            assert np.abs(inside - outside).max() > 40, (category, defect, inside, outside)


def test_official_layout_as_dataset(synthetic_data_dir):
    ds = dm.load_mvtec_defects(synthetic_data_dir, "metal_nut")
    assert ds.column_names == ["image", "mask", "object_class", "defect_type", "image_path", "mask_paths", "layout"]
    assert len(ds) == 12
    assert sorted(set(ds["defect_type"])) == ["color", "scratch"]
    assert set(ds["object_class"]) == {"metal_nut"}
    row = ds[0]
    assert row["image"].mode == "RGB" and row["mask"].mode == "L"
    assert row["image"].size == row["mask"].size == (128, 128)
    assert row["image_path"] == "metal_nut/test/color/000.png"
    assert row["mask_paths"] == ["metal_nut/ground_truth/color/000_mask.png"] and row["layout"] == "mvtec"
    assert set(np.unique(np.asarray(row["mask"]))) == {0, 255}
    assert dm.list_defect_types(synthetic_data_dir, "wood") == ["color", "scratch"]
    assert dm.list_categories(synthetic_data_dir) == ["metal_nut", "wood"]


def test_defectfill2_layout_is_detected(tmp_path, synthetic_data_dir):
    source = synthetic_data_dir / "wood"
    target = tmp_path / "seed_layout" / "wood"
    for index, name in enumerate(["000.png", "001.png", "002.png"]):
        image_dir, mask_dir = target / "train" / "defective" / "scratch", target / "train" / "defective_masks" / "scratch"
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "test" / "scratch" / name, image_dir / name)
        shutil.copy(source / "ground_truth" / "scratch" / f"{index:03d}_mask.png", mask_dir / f"{index:03d}_mask.png")
    shutil.copy(source / "train" / "good" / "000.png", target / "000.png")
    ds = dm.load_mvtec_defects(tmp_path / "seed_layout", "wood")
    assert len(ds) == 3 and set(ds["defect_type"]) == {"scratch"}
    assert ds[0]["image_path"] == "wood/train/defective/scratch/000.png"
    assert [p.name for p in dm.list_good_images(tmp_path / "seed_layout", "wood")] == ["000.png"]


def test_hub_style_dataset_through_load_dataset(tmp_path, synthetic_data_dir):
    """A dataset with image / mask / object_class / defect_type columns, read by `load_dataset`."""
    import datasets

    ds = dm.load_mvtec_defects(synthetic_data_dir, "wood")
    ds.remove_columns("image_path").to_parquet(str(tmp_path / "data.parquet"))
    loaded = dm.load_defect_dataset("wood", dataset_name="parquet", defect_types=["color"],
                                    data_files=str(tmp_path / "data.parquet"))
    assert isinstance(loaded, datasets.Dataset)
    assert len(loaded) == 6 and set(loaded["defect_type"]) == {"color"}
    assert loaded[0]["image"].mode == "RGB"
    with pytest.raises(dm.DatasetError, match="no object_class 'bottle'"):
        dm.load_defect_dataset("bottle", dataset_name="parquet", data_files=str(tmp_path / "data.parquet"))


def test_load_hub_defects_names_missing_columns(tmp_path, synthetic_data_dir):
    ds = dm.load_mvtec_defects(synthetic_data_dir, "wood").remove_columns(["mask", "image_path"])
    ds.to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(dm.DatasetError, match="missing column.*mask"):
        dm.load_defect_dataset("wood", dataset_name="parquet", data_files=str(tmp_path / "data.parquet"))


def test_exactly_one_source():
    with pytest.raises(dm.DatasetError, match="exactly one of --data_dir"):
        dm.load_defect_dataset("wood")


# ---------------------------------------------------------------------------------------------- split


def test_ordered_split_takes_first_third_by_file_name(synthetic_data_dir):
    ds = dm.load_mvtec_defects(synthetic_data_dir, "wood")
    split = dm.few_shot_split(ds)
    for defect in ("color", "scratch"):
        entry = split["defect_types"][defect]
        assert entry["train"] == [f"wood/test/{defect}/000.png", f"wood/test/{defect}/001.png"]
        assert entry["heldout"] == [f"wood/test/{defect}/{i:03d}.png" for i in range(2, 6)]


@pytest.mark.parametrize(
    "total,fraction,count,expected",
    [(20, 1 / 3, None, 7), (6, 1 / 3, None, 2), (3, 1 / 3, None, 1), (1, 1 / 3, None, 1), (5, 1.0, None, 4), (10, 0.5, 3, 3),
     (4, 1 / 3, 9, 3)],
)
def test_num_train_images(total, fraction, count, expected):
    assert dm.num_train_images(total, fraction, count) == expected


def test_random_split_is_seeded_and_saved_split_reproduces(tmp_path, synthetic_data_dir):
    ds = dm.load_mvtec_defects(synthetic_data_dir, "metal_nut")
    first = dm.few_shot_split(ds, strategy="random", count=3, seed=7)
    again = dm.few_shot_split(ds, strategy="random", count=3, seed=7)
    other = dm.few_shot_split(ds, strategy="random", count=3, seed=8)
    assert first == again and first != other
    for entry in first["defect_types"].values():
        assert len(entry["train"]) == 3 and len(entry["heldout"]) == 3
        assert not set(entry["train"]) & set(entry["heldout"])
    path = dm.save_split(first, tmp_path / "run" / SPLIT_FILENAME)
    assert dm.load_split(path) == json.loads(json.dumps(first))
    train = dm.select_split(ds, dm.load_split(path), "train")
    assert sorted(train["image_path"]) == sorted(p for e in first["defect_types"].values() for p in e["train"])


def test_split_rejects_bad_options(synthetic_data_dir):
    ds = dm.load_mvtec_defects(synthetic_data_dir, "wood")
    with pytest.raises(dm.DatasetError, match="--split_strategy"):
        dm.few_shot_split(ds, strategy="best")
    with pytest.raises(dm.DatasetError, match="--train_fraction"):
        dm.few_shot_split(ds, fraction=0)
    with pytest.raises(dm.DatasetError, match="--train_count"):
        dm.few_shot_split(ds, count=0)


def test_heldout_masks_listing(synthetic_data_dir):
    ds = dm.load_mvtec_defects(synthetic_data_dir, "wood", ["scratch"])
    split = dm.few_shot_split(ds)
    masks = dm.list_heldout_masks(synthetic_data_dir, split, "scratch")
    assert [m.name for m in masks] == [f"{i:03d}_mask.png" for i in range(2, 6)]
    with pytest.raises(dm.DatasetError, match="not in the split; found: scratch"):
        dm.list_heldout_masks(synthetic_data_dir, split, "color")


def test_good_images_listing(synthetic_data_dir):
    assert len(dm.list_good_images(synthetic_data_dir, "wood")) == 10
    assert len(dm.list_good_images(synthetic_data_dir, "wood", splits=("test",))) == 4


# ------------------------------------------------------------------------------------------ transform


def test_pair_transform_ranges_and_alignment():
    image = Image.new("RGB", (100, 100), (255, 0, 0))
    image.paste((0, 0, 255), (50, 0, 100, 100))
    mask = Image.new("L", (100, 100), 0)
    mask.paste(255, (50, 0, 100, 100))
    image_tensor, mask_tensor = dm.PairTransform(resolution=32)(image, mask)
    assert image_tensor.shape == (3, 32, 32) and mask_tensor.shape == (1, 32, 32)
    assert image_tensor.min() >= -1 and image_tensor.max() <= 1
    assert set(mask_tensor.unique().tolist()) == {0.0, 1.0}
    # The mask still marks the blue half: transform kept image and mask aligned.
    blue = image_tensor[2] > 0
    assert torch.equal(blue[:, 1:-1], mask_tensor[0].bool()[:, 1:-1])


def test_pair_transform_random_crop_and_flip_apply_to_both():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask_array = np.zeros((64, 64), dtype=np.uint8)
    mask_array[10:20, 5:12] = 255
    mask = Image.fromarray(mask_array)
    transform = dm.PairTransform(resolution=64, scale_range=(1.0, 1.125), hflip=True)
    shapes = set()
    for seed in range(8):
        image_tensor, mask_tensor = transform(image, mask, random.Random(seed))
        shapes.add(tuple(image_tensor.shape))
        assert mask_tensor.sum() > 0
        # The same seed gives the same pair: augmentation is reproducible.
        again = transform(image, mask, random.Random(seed))
        assert torch.equal(again[0], image_tensor) and torch.equal(again[1], mask_tensor)
    assert shapes == {(3, 64, 64)}


def test_greyscale_and_rgba_images_are_converted_to_rgb(copy_of_data):
    folder = copy_of_data / "wood" / "test" / "scratch"
    Image.open(folder / "000.png").convert("L").save(folder / "000.png")
    Image.open(folder / "001.png").convert("RGBA").save(folder / "001.png")
    ds = dm.load_mvtec_defects(copy_of_data, "wood", ["scratch"])
    assert ds[0]["image"].mode == "RGB" and ds[1]["image"].mode == "RGB"
    image_tensor, _ = dm.PairTransform(32)(ds[1]["image"], ds[1]["mask"])
    assert image_tensor.shape == (3, 32, 32)


def test_mask_binarisation_threshold():
    mask = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8))
    assert dm.binarize_mask(mask).tolist() == [[False, False, True, True]]


# ---------------------------------------------------------------------------------------- bad inputs


def test_missing_root_is_named(tmp_path):
    with pytest.raises(dm.DatasetError, match="does-not-exist does not exist"):
        dm.load_mvtec_defects(tmp_path / "does-not-exist", "wood")


def test_missing_category_lists_categories_found(synthetic_data_dir):
    with pytest.raises(dm.DatasetError, match="category 'bottle' not found.*categories found: metal_nut, wood"):
        dm.load_mvtec_defects(synthetic_data_dir, "bottle")


def test_image_without_mask_names_expected_mask(copy_of_data):
    missing = copy_of_data / "wood" / "ground_truth" / "scratch" / "003_mask.png"
    missing.unlink()
    with pytest.raises(dm.DatasetError, match=r"scratch/003\.png has no mask; expected .*scratch/003_mask\.png"):
        dm.load_mvtec_defects(copy_of_data, "wood")


def test_mask_of_other_size_is_rejected(copy_of_data):
    mask_path = copy_of_data / "wood" / "ground_truth" / "color" / "002_mask.png"
    Image.open(mask_path).resize((64, 64)).save(mask_path)
    with pytest.raises(dm.DatasetError, match=r"002_mask\.png is 64x64 but its image .*002\.png is 128x128"):
        dm.load_mvtec_defects(copy_of_data, "wood")


def test_empty_mask_is_rejected(copy_of_data):
    mask_path = copy_of_data / "metal_nut" / "ground_truth" / "scratch" / "001_mask.png"
    Image.new("L", (128, 128), 0).save(mask_path)
    with pytest.raises(dm.DatasetError, match=r"001_mask\.png is empty"):
        dm.load_mvtec_defects(copy_of_data, "metal_nut")


def test_unknown_defect_type_lists_known_ones(synthetic_data_dir):
    with pytest.raises(dm.DatasetError, match="'crack' not found .*defect types found: color, scratch"):
        dm.load_mvtec_defects(synthetic_data_dir, "wood", ["crack"])


def test_non_image_files_are_ignored(copy_of_data):
    (copy_of_data / "wood" / "test" / "scratch" / "notes.txt").write_text("not an image")
    (copy_of_data / "wood" / "test" / "scratch" / ".DS_Store").write_bytes(b"\0\1")
    (copy_of_data / "wood" / "ground_truth" / "scratch" / "README.md").write_text("# masks")
    (copy_of_data / "wood" / "train" / "good" / "Thumbs.db").write_bytes(b"\0")
    assert len(dm.load_mvtec_defects(copy_of_data, "wood", ["scratch"])) == 6
    assert len(dm.list_good_images(copy_of_data, "wood")) == 10


# ----------------------------------------------------------------------------------- defect crops


def test_mask_crop_box_contains_the_mask_with_context():
    mask = np.zeros((200, 300), dtype=bool)
    mask[50:70, 100:140] = True  # a 20 x 40 defect
    box = dm.mask_crop_box(mask, min_size=32, context=0.5)
    left, top, right, bottom = box
    assert right - left == bottom - top == 60  # 40 * 1.5
    assert left <= 100 and right >= 140 and top <= 50 and bottom >= 70
    assert dm.mask_crop_box(mask, min_size=128) == (56, 0, 184, 128)  # at least 128, moved inside the image


def test_mask_crop_box_falls_back_when_no_square_fits():
    mask = np.zeros((100, 300), dtype=bool)
    mask[10:20, 0:250] = True  # wider than the short side
    assert dm.mask_crop_box(mask, 64) is None
    assert dm.mask_crop_box(np.zeros((10, 10), dtype=bool), 4) is None


def test_pair_transform_defect_crop_keeps_the_defect_at_full_resolution():
    image = Image.new("RGB", (256, 256), (0, 0, 0))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (200, 200, 208, 208))  # an 8 px defect
    image.paste((255, 255, 255), (200, 200, 208, 208))
    cropped_image, cropped_mask = dm.PairTransform(64, defect_crop_probability=1.0)(image, mask, random.Random(0))
    whole_image, whole_mask = dm.PairTransform(64)(image, mask, random.Random(0))
    assert cropped_mask.sum() == 64  # 8 x 8 pixels kept at full resolution
    assert whole_mask.sum() == 4  # the whole-image resize shrinks it to 2 x 2
    assert torch.equal(cropped_image[0] > 0, cropped_mask[0].bool())
