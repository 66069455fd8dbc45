"""The dataset reader in every layout: a tiny set written as each dataset ships it (tests/helpers/layouts.py) loads
every defect with its whole mask and its type, finds the good images of each split, records the layout in the
few-shot split; detection, forcing, and every bad input named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dataset_mvtec as dm
from defectfill.data.layouts import LAYOUT_NAMES, read_table
from defectfill.data.layouts.base import type_name
from defectfill.data.mask_files import defect_pixels, open_mask, read_mask
from tests.helpers.layouts import WRITERS, write_layout

LAYOUTS = sorted(WRITERS)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every layout written once (tests that break a set copy it)."""
    root = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(name, root / name) for name in LAYOUTS}


def test_every_layout_has_a_fixture():
    assert set(LAYOUTS) == set(LAYOUT_NAMES)


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_is_detected_and_loads_every_defect_with_its_whole_mask(written, name):
    fixture = written[name]
    assert dm.detect_layout(fixture.root, fixture.object_class) == name
    ds = dm.load_mvtec_defects(fixture.root, fixture.object_class)
    assert sorted(ds["image_path"]) == sorted(fixture.defects)
    assert set(ds["layout"]) == {name} and set(ds["object_class"]) == {fixture.object_class}
    for row in ds:
        defect_type, mask = fixture.defects[row["image_path"]]
        assert row["defect_type"] == defect_type, row["image_path"]
        assert row["image"].mode == "RGB" and row["mask"].mode == "L" and row["image"].size == row["mask"].size
        assert np.array_equal(np.asarray(row["mask"]), mask.astype(np.uint8) * 255), row["image_path"]
        assert row["mask_paths"] and all((fixture.root / p).is_file() for p in row["mask_paths"])
    assert dm.list_defect_types(fixture.root, fixture.object_class) == sorted({t for t, _ in fixture.defects.values()})


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_finds_its_good_images_per_split(written, name):
    fixture = written[name]
    for split in ("train", "test"):
        found = dm.list_good_images(fixture.root, fixture.object_class, (split,))
        assert sorted(p.relative_to(fixture.root).as_posix() for p in found) == sorted(fixture.goods[split]), split
    assert len(dm.good_images(fixture.root, fixture.object_class, "all")) == sum(map(len, fixture.goods.values()))


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_split_records_the_layout_and_its_masks_read_back_whole(written, name):
    fixture = written[name]
    split = dm.few_shot_split(dm.load_mvtec_defects(fixture.root, fixture.object_class))
    assert split["layout"] == name and split["object_class"] == fixture.object_class
    for defect_type, entry in split["defect_types"].items():
        for part in ("train", "heldout"):
            masks = dm.list_split_masks(fixture.root, split, defect_type, part)
            assert len(masks) == len(entry[part])
            for image_path, source in zip(entry[part], masks):
                assert np.array_equal(read_mask(source), fixture.defects[image_path][1]), (image_path, source)


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_forced_layout_reads_the_same_and_a_wrong_one_says_what_it_expected(written, name):
    fixture = written[name]
    forced = dm.load_mvtec_defects(fixture.root, fixture.object_class, layout=name)
    assert sorted(forced["image_path"]) == sorted(fixture.defects)
    other = "btad" if name != "btad" else "visa"
    with pytest.raises(dm.DatasetError, match=f"--layout {other}: .* does not hold {fixture.object_class!r} in that layout"):
        dm.load_mvtec_defects(fixture.root, fixture.object_class, layout=other)


def test_forcing_picks_a_layout_detection_would_not(tmp_path):
    """A folder in two layouts at once: detection takes the first in order, --layout the other."""
    fixture = write_layout("mvtec", tmp_path)
    write_layout("csv", tmp_path)  # metal_nut.csv is not there: a table of another product
    (tmp_path / "widget.csv").rename(tmp_path / "metal_nut.csv")
    assert dm.detect_layout(tmp_path, "metal_nut") == "mvtec"
    table = read_table(tmp_path, "metal_nut", "csv")
    assert table.layout == "csv" and len(table.defects()) == 4
    assert len(read_table(tmp_path, "metal_nut").defects()) == len(fixture.defects)


def test_unknown_layout_name_lists_the_layouts(written):
    with pytest.raises(dm.DatasetError, match="--layout 'mvtec_ad3' is not a dataset layout; layouts: .*kolektorsdd2"):
        dm.load_defect_dataset("metal_nut", data_dir=str(written["mvtec"].root), layout="mvtec_ad3")
    with pytest.raises(dm.DatasetError, match="--layout mvtec reads a local folder"):
        dm.load_defect_dataset("metal_nut", dataset_name="parquet", layout="mvtec")


def test_kolektorsdd2_needs_no_class_folder_and_the_product_is_a_name(written):
    fixture = written["kolektorsdd2"]
    assert not (fixture.root / fixture.object_class).exists()
    assert dm.category_dir(fixture.root, "any_product") == fixture.root
    ds = dm.load_mvtec_defects(fixture.root, "any_product")
    assert set(ds["object_class"]) == {"any_product"} and ds[0]["image_path"].split("/")[0] in ("train", "test")


def test_realiad_without_its_split_file_reads_the_folders(tmp_path):
    fixture = write_layout("realiad", tmp_path)
    (tmp_path / "realiad_jsons" / "realiad_jsons" / "audiojack.json").unlink()
    table = read_table(fixture.root, "audiojack")
    assert sorted(table.name(s.image) for s in table.defects()) == sorted(fixture.defects)  # the views without a mask: not read
    assert sorted(table.name(s.image) for s in table.goods(("train",))) == sorted(fixture.goods["train"] + fixture.goods["test"][:2])
    assert table.goods(("test",)) == []


def test_visa_without_its_tables_has_one_type_and_splits_by_label(tmp_path):
    fixture = write_layout("visa", tmp_path)
    (tmp_path / "candle" / "image_anno.csv").unlink()
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    table = read_table(tmp_path, "candle")
    assert table.defect_types() == ["defect"] and {s.split for s in table.defects()} == {"test"}
    assert len(table.goods(("train",))) == sum(map(len, fixture.goods.values())) and table.goods(("test",)) == []


def test_categories_are_listed_across_layouts(written):
    assert dm.list_categories(written["visa"].root) == ["candle"]
    assert dm.list_categories(written["csv"].root) == ["widget"]
    assert dm.list_categories(written["mvtec_loco"].root) == ["pushpins"]
    assert dm.list_categories(written["kolektorsdd2"].root) == []


# ------------------------------------------------------------------------------------------------ masks as users have them


@pytest.mark.parametrize("values,mode", [((0, 1), "L"), ((0, 255), "L"), ((0, 37), "L"), ((0, 2), "P"), ((0, 9), "I;16")])
def test_any_non_zero_mask_pixel_is_a_defect(values, mode):
    array = np.array([[values[0], values[1]], [values[1], values[0]]], dtype=np.uint8)
    image = Image.fromarray(array).convert(mode) if mode != "I;16" else Image.fromarray(array.astype(np.uint16) * 1000)
    assert defect_pixels(image).tolist() == [[False, True], [True, False]]


def test_rgb_and_alpha_masks():
    rgb = np.zeros((1, 3, 3), dtype=np.uint8)
    rgb[0, 1] = (0, 0, 40)
    assert defect_pixels(Image.fromarray(rgb)).tolist() == [[False, True, False]]
    rgba = np.full((1, 2, 4), 255, dtype=np.uint8)
    rgba[0, 0, 3] = 0  # transparent white: not a defect
    assert defect_pixels(Image.fromarray(rgba)).tolist() == [[False, True]]


def test_jpeg_masks_are_read_at_half_range(tmp_path):
    rows, cols = np.mgrid[:32, :32]
    mask = ((rows - 15.5) ** 2 + (cols - 13) ** 2 < 81).astype(np.uint8) * 255  # a disc: JPEG rings around it
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=50)
    assert np.asarray(Image.open(tmp_path / "m.jpg")).astype(bool).sum() > (mask > 0).sum() + 20  # compression noise
    assert np.abs(read_mask(tmp_path / "m.jpg").astype(int) - (mask > 0)).sum() <= 8


def test_several_masks_of_one_image_are_unioned(tmp_path):
    for index, rows in enumerate((slice(0, 2), slice(3, 4))):
        part = np.zeros((4, 4), dtype=np.uint8)
        part[rows] = 100 + index
        Image.fromarray(part).save(tmp_path / f"{index:03d}.png")
    assert read_mask(tmp_path).sum(axis=1).tolist() == [4, 4, 0, 4]
    opened = open_mask(tmp_path)
    assert opened.mode == "L" and np.asarray(opened)[:, 0].tolist() == [255, 255, 0, 255]


def test_defect_labels_as_types():
    assert type_name("Chunk of wax missing") == "chunk_of_wax_missing"
    assert type_name("weird candle wick, chunk of wax missing") == "chunk_of_wax_missing+weird_candle_wick"


# ------------------------------------------------------------------------------------------------------ bad input


def test_a_folder_in_no_layout_names_every_layout_tried_and_what_it_expected(tmp_path):
    (tmp_path / "gizmo" / "pictures").mkdir(parents=True)
    with pytest.raises(dm.DatasetError) as error:
        dm.load_mvtec_defects(tmp_path, "gizmo")
    message = str(error.value)
    assert message.startswith(f"category 'gizmo' not found under {tmp_path}: no dataset layout matches")
    for name in LAYOUT_NAMES:
        assert f"{name}: " in message, name
    assert "gizmo/Data/Images/{Normal,Anomaly}" in message and "gizmo/test_public/bad" in message


@pytest.fixture
def broken(written, tmp_path):
    """A writable copy of one layout's set and the first defect of its table."""
    import shutil

    def copy(name):
        fixture = written[name]
        shutil.copytree(fixture.written_folder, tmp_path / name)
        root = tmp_path / name / fixture.root.relative_to(fixture.written_folder)
        return root, fixture.object_class, read_table(root, fixture.object_class).defects()[0]
    return copy


@pytest.mark.parametrize("name", LAYOUTS)
def test_an_image_without_its_mask_is_named(broken, name):
    import shutil

    root, object_class, sample = broken(name)
    shutil.rmtree(sample.mask) if sample.mask.is_dir() else sample.mask.unlink()
    with pytest.raises(dm.DatasetError, match=rf"image .*{sample.image.name} has no mask"):
        dm.load_mvtec_defects(root, object_class)


@pytest.mark.parametrize("name,what", [("visa", "image"), ("btad", "image"), ("mvtec_loco", "mask"), ("csv", "mask")])
def test_an_unreadable_file_is_named(broken, name, what):
    from defectfill.data.mask_files import mask_files

    root, object_class, sample = broken(name)
    path = sample.image if what == "image" else mask_files(sample.mask)[0]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(dm.DatasetError, match=rf"{what} .*{path.name} cannot be read as an image"):
        dm.load_mvtec_defects(root, object_class)


@pytest.mark.parametrize("name", ["visa", "mvtec_loco", "kolektorsdd2"])
def test_a_mask_of_another_size_names_both_files(broken, name):
    from defectfill.data.mask_files import mask_files

    root, object_class, sample = broken(name)
    path = mask_files(sample.mask)[-1]
    Image.open(path).resize((64, 64)).save(path)
    with pytest.raises(dm.DatasetError, match=rf"mask .*{path.name} is 64x64 but its image .*{sample.image.name} is 128x128"):
        dm.load_mvtec_defects(root, object_class)


def test_an_all_zero_mask_of_a_defect_is_named(broken):
    root, object_class, sample = broken("visa")
    Image.new("L", (128, 128), 0).save(sample.mask)
    with pytest.raises(dm.DatasetError, match=rf"mask .*{sample.mask.name} is empty \(no non-zero pixel\)"):
        dm.load_mvtec_defects(root, object_class)


def test_table_errors_name_the_file_and_line(tmp_path):
    fixture = write_layout("csv", tmp_path)
    table = tmp_path / "widget.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(dm.DatasetError, match=rf"widget.csv line {len(lines) + 1}: image .* is listed again \(first on line 2\)"):
        dm.list_good_images(tmp_path, fixture.object_class)
    table.write_text("\n".join(lines + ["photos/nok_0.png,,scratch,"]) + "\n")
    with pytest.raises(dm.DatasetError, match=rf"line {len(lines) + 1}: image .*nok_0.png of defect type 'scratch' has no mask"):
        dm.load_mvtec_defects(tmp_path, fixture.object_class)
    table.write_text("\n".join(lines + ["photos/ok_0.png,,good,later"]) + "\n")
    with pytest.raises(dm.DatasetError, match="split 'later' is not train, validation or test"):
        dm.load_mvtec_defects(tmp_path, fixture.object_class)
    table.write_text("picture,label\nphotos/ok_0.png,good\n")
    with pytest.raises(dm.DatasetError, match="widget.csv: missing column.*image, mask, defect_type"):
        dm.load_mvtec_defects(tmp_path, fixture.object_class)
