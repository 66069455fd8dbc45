"""build_dataset_defectfill: a whole class at once (one LoRA per defect type as named adapters), augmented
and user masks, several defects per image with exact labels, weak results redrawn with the next seeds,
resume after a kill, 2 processes against 1, the MVTec export, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import build_dataset_defectfill as build
import dataset_mvtec as dm
from defectfill.build.augment import (
    EMPTY_AT_LATENT_SIZE,
    OFF_OBJECT,
    TOUCHES_BORDER,
    dilate,
    estimate_foreground,
    on_object_fraction,
    touches_border,
)
from defectfill.build.defect_masks import visible_at_latent_size
from defectfill.build.export import default_export_dir
from defectfill.build.plan import defect_index_table, discover_runs, make_items, parse_defects_per_image
from defectfill.build.settings import BuildMaskSettings, BuildSettings
from defectfill.build.summary import preview_rows
from defectfill.cli import settings_from_args
from defectfill.errors import BuildError, DownstreamError, RunFileError, SynthesisError
from defectfill.masks import MaskSource
from defectfill.painting import SynthesisSettings, candidate_generators, prepare_job, synthesize
from defectfill.pipelines import load_named_adapters, load_pipeline, use_adapter
from defectfill.runs.files import (
    FINGERPRINT_FILENAME,
    LORA_FILENAME,
    METADATA_FILENAME,
    PREVIEW_FILENAME,
    SUMMARY_FILENAME,
    SYNTHESIS_FILENAME,
)
from defectfill.runs.folder import FINGERPRINT_VERSION, SynthesisFolder, item_of_file
from defectfill.runs.records import RunRecord
from tests.conftest import REPO_ROOT, SYNTHETIC_DATA, TINY_MODEL

FAST = ["--num_inference_steps", "2", "--num_images", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def class_runs(tmp_path_factory) -> Path:
    """train_defectfill.py --defect_type all on the tiny model: metal_nut/color and metal_nut/scratch."""
    import train_defectfill as train

    output_dir = tmp_path_factory.mktemp("class_runs") / "metal_nut"
    train.main(train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--defect_type", "all", "--output_dir", str(output_dir),
        "--max_train_steps", "2", "--train_batch_size", "1", "--validation_steps", "0", "--checkpointing_steps", "1000",
        "--report_to", "none",
    ]))
    return output_dir


class ScriptedScorer:
    """Scores a test can predict: the first call (item 0's first draw) scores every candidate below
    --min_lpips, later calls 0.5, 0.9, ... (the argmax is the last candidate)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, clean, candidates, mask):
        self.calls += 1
        low = self.calls == 1
        return [0.01 * (c + 1) if low else 0.5 + 0.4 * c for c in range(len(candidates))]


def run_build(class_runs, output_dir, *extra, scorer=None):
    args = build.parse_args(["--lora", str(class_runs), "--output_dir", str(output_dir), *FAST, *extra])
    return build.main(args, scorer=scorer)


def rows_of(folder, timing=True):
    rows = [json.loads(line) for line in (Path(folder) / METADATA_FILENAME).read_text().splitlines()]
    return rows if timing else [{k: v for k, v in row.items() if k not in ("seconds", "process")} for row in rows]


def as_array(path, mode=None):
    with Image.open(path) as image:
        return np.asarray(image.convert(mode) if mode else image)


# ---------------------------------------------------------------------------------- pure pieces


def test_defects_per_image_parses_counts_and_distributions():
    assert parse_defects_per_image("2") == {2: 1.0}
    assert parse_defects_per_image("1:3,2:1") == {1: 0.75, 2: 0.25}
    for bad in ("0", "1:x", "9", "1:-1"):
        with pytest.raises(BuildError, match="--defects_per_image"):
            parse_defects_per_image(bad)


def test_items_are_seeded_per_index_and_cover_every_type():
    goods = [Path(f"g{i}.png") for i in range(3)]
    items = make_items(["color", "scratch"], goods, 4, {1: 0.5, 2: 0.5}, seed=0)
    assert [i.index for i in items] == list(range(8))
    assert [i.defect_types[0] for i in items] == ["color"] * 4 + ["scratch"] * 4
    assert [i.image_path.name for i in items] == ["g0.png", "g1.png", "g2.png", "g0.png", "g1.png", "g2.png", "g0.png", "g1.png"]
    assert all(i.defect_types[1:] in ((), ("scratch",) if i.defect_types[0] == "color" else ("color",)) for i in items)
    assert items == make_items(["color", "scratch"], goods, 4, {1: 0.5, 2: 0.5}, seed=0)
    assert {len(i.defect_types) for i in items} == {1, 2}
    assert make_items(["color"], goods, 2, {2: 1.0}, seed=0)[0].defect_types == ("color", "color")


def test_item_numbers_of_output_files():
    assert item_of_file("images/00012.png") == 12
    assert item_of_file(".00003_0_color_mask.png.tmp") == 3
    assert item_of_file("metadata.jsonl") is None


def test_preview_rows_spread_over_labels():
    rows = {f"images/{i:05d}.png": {"defect_type": t} for i, t in enumerate(["a", "a", "a", "b", "b", "combined"])}
    assert list(preview_rows(rows, 4)) == ["images/00000.png", "images/00003.png", "images/00005.png", "images/00001.png"]


# ---------------------------------------------------------------------------------- bad input


def fake_run(folder: Path, defect_type: str, base_model: str, object_class: str = "metal_nut") -> Path:
    folder.mkdir(parents=True)
    (folder / LORA_FILENAME).write_bytes(b"")
    RunRecord(base_model=base_model, token="sks", object_class=object_class, defect_type=defect_type, defect_prompt="A photo of sks",
                 object_prompt="A metal nut with sks", resolution=64, split={"defect_types": {}}).write(folder)
    return folder


def test_a_lora_folder_without_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match=r"--lora .*empty holds no training run"):
        discover_runs([str(tmp_path / "empty")])


def test_runs_of_two_base_models_are_an_error(tmp_path):
    fake_run(tmp_path / "all" / "color", "color", "models/a")
    fake_run(tmp_path / "all" / "scratch", "scratch", "models/b")
    with pytest.raises(BuildError, match="mix base_models"):
        discover_runs([str(tmp_path / "all")])
    fake_run(tmp_path / "other" / "color", "color", "models/a")
    with pytest.raises(BuildError, match="two runs for defect type 'color'"):
        discover_runs([str(tmp_path / "all" / "color"), str(tmp_path / "other" / "color")])
    runs = discover_runs([str(tmp_path / "all" / "color")])
    assert [r.defect_type for r in runs] == ["color"] and defect_index_table(runs) == {"color": 1}


def test_an_empty_user_mask_is_an_error_before_anything_is_written(class_runs, tmp_path):
    masks = tmp_path / "drawn"
    masks.mkdir()
    Image.new("L", (128, 128), 0).save(masks / "blank.png")
    with pytest.raises(BuildError, match=r"mask .*blank\.png is empty"):
        run_build(class_runs, tmp_path / "out", "--mask_dir", str(masks), "--num_candidates", "1")
    assert not (tmp_path / "out").exists()


def test_the_mask_flags_name_one_origin(tmp_path):
    """--mask_from names a part of the runs' split (default train), --mask_dir a user's folder (recorded as dir);
    both at once name two origins."""
    base = ["--lora", "runs/x"]
    assert build.parse_args(base).mask_from is MaskSource.TRAIN
    assert build.parse_args([*base, "--mask_from", "heldout"]).mask_from is MaskSource.HELDOUT
    args = build.parse_args([*base, "--mask_dir", str(tmp_path)])
    assert args.mask_from is MaskSource.DIR and args.mask_augment
    for bad in (["--mask_dir", str(tmp_path), "--mask_from", "train"], ["--mask_from", "dir"]):
        with pytest.raises(SystemExit):
            build.parse_args([*base, *bad])
    with pytest.raises(BuildError, match="--mask_dir"):
        BuildMaskSettings(mask_from=MaskSource.DIR)


def test_the_demo_build_config_parses_to_its_settings():
    settings = settings_from_args(BuildSettings, build.parse_args(["--config", str(REPO_ROOT / "configs" / "tiny_build.yaml")]))
    assert settings.lora == ("outputs/tiny-metal_nut",) and settings.num_images == 6
    assert (settings.masks.mask_from, settings.masks.mask_dir, settings.masks.mask_augment) == (MaskSource.TRAIN, None, True)
    assert settings.masks.defects_per_image == "1:0.7,2:0.3" and settings.output.export == "mvtec"
    assert (settings.generation.scheduler, settings.generation.num_inference_steps) == ("DPMSolverMultistepScheduler", 10)


def test_a_folder_holding_another_build_is_refused(class_runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / FINGERPRINT_FILENAME).write_text(json.dumps({"format_version": FINGERPRINT_VERSION, "fingerprint": {"seed_of_another": 1}}))
    with pytest.raises(SynthesisError, match=r"holds outputs made with other settings \(.*seed_of_another: 1 -> None"):
        run_build(class_runs, out, "--num_candidates", "1")
    infer_like = tmp_path / "infer"  # images made by another tool, with no record of how
    (infer_like / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(infer_like / "images" / "00000.png")
    with pytest.raises(SynthesisError, match=r"holds outputs made with other settings \(\(no record of what made its outputs\)\)"):
        run_build(class_runs, infer_like, "--num_candidates", "1")


def test_a_foreground_no_mask_fits_skips_and_counts(class_runs, tmp_path):
    """Object masks that are all background: every defect is skipped, counted with its reasons, no file written."""
    foreground = tmp_path / "fg"
    foreground.mkdir()
    for path in dm.list_good_images(SYNTHETIC_DATA, "metal_nut", ("train",)):
        Image.new("L", (128, 128), 0).save(foreground / path.name)
    out = run_build(class_runs, tmp_path / "out", "--num_candidates", "1", "--foreground_dir", str(foreground),
                    "--mask_attempts", "5", "--num_images", "1")
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["images"] == 0 and summary["items_skipped"] == {"no_mask_fits": 2}
    assert summary["masks_rejected"] == 10 and set(summary["masks_rejected_by_reason"]) <= {
        f"{d}/{r}" for d in ("color", "scratch") for r in (OFF_OBJECT, TOUCHES_BORDER, EMPTY_AT_LATENT_SIZE)}
    assert not (out / "images").exists() and not (out / METADATA_FILENAME).exists()


# ---------------------------------------------------------------------------------- a whole class


@pytest.fixture(scope="module")
def class_build(class_runs, tmp_path_factory):
    """Both defect types, augmented masks, two-defect images, 2 candidates, the first draw rejected as weak."""
    import diffusers

    out = tmp_path_factory.mktemp("build") / "metal_nut"
    loads, switches = [], []
    real_load, real_set = diffusers.StableDiffusionInpaintPipeline.load_lora_weights, diffusers.StableDiffusionInpaintPipeline.set_adapters
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers.StableDiffusionInpaintPipeline, "load_lora_weights",
                      lambda self, *a, **k: loads.append(k.get("adapter_name")) or real_load(self, *a, **k))
        patch.setattr(diffusers.StableDiffusionInpaintPipeline, "set_adapters",
                      lambda self, names, *a, **k: switches.append(tuple(names)) or real_set(self, names, *a, **k))
        run_build(class_runs, out, "--defects_per_image", "1:0.5,2:0.5", "--num_candidates", "2", "--min_lpips", "0.1",
                  "--batch_size", "4", "--export", "mvtec", scorer=ScriptedScorer())
    return out, loads, switches


def test_each_run_is_loaded_once_as_a_named_adapter(class_build):
    _, loads, switches = class_build
    assert loads == ["color", "scratch"]
    assert set(switches) == {("color",), ("scratch",)}


def test_whole_class_labels_are_exact(class_build):
    out, _, _ = class_build
    rows = rows_of(out)
    record = json.loads((out / SYNTHESIS_FILENAME).read_text())
    index = record["defect_type_index"]
    assert index == {"good": 0, "color": 1, "scratch": 2}
    assert len(rows) == 4 and {r["defect_types"][0] for r in rows} == {"color", "scratch"}
    assert any(r["num_defects"] == 2 and r["defect_type"] == "combined" for r in rows)
    for row in rows:
        clean = as_array(row["source_image"], "RGB")
        generated = as_array(out / row["file_name"], "RGB")
        union = as_array(out / row["mask_file_name"]) >= 128
        semantic = as_array(out / row["semantic_mask_file_name"])
        defect_masks = [as_array(out / name) >= 128 for name in row["defect_mask_file_names"]]
        assert np.array_equal(union, np.logical_or.reduce(defect_masks))  # the label is the masks used
        assert np.array_equal(generated[~union], clean[~union])  # exact background
        assert not np.array_equal(generated[union], clean[union])
        expected = np.zeros_like(semantic)
        for mask, defect_type in zip(defect_masks, row["defect_types"]):
            expected[mask] = index[defect_type]
        assert np.array_equal(semantic, expected)
        if len(defect_masks) == 2:
            assert not (dilate(defect_masks[0], 1) & defect_masks[1]).any()  # apart
        foreground = estimate_foreground(Image.open(row["source_image"]))
        for mask in defect_masks:
            assert not touches_border(mask) and on_object_fraction(mask, foreground) >= 0.9
            assert visible_at_latent_size(mask, SynthesisSettings("p", 64, crop_to_mask=True), 2)
        assert all(row["augmented"])


def test_a_build_records_where_its_masks_came_from_and_every_runs_split(class_build, class_runs):
    """Masks drawn from the runs' training masks (the default --mask_from train): synthesis.json says so and holds
    both runs' splits merged, every row names the real training masks its masks were augmented from, and the
    downstream check finds nothing of the test set in it."""
    from defectfill.downstream.sources import count_test_set_reuse, read_synthetic_sources

    out, _, _ = class_build
    record = json.loads((out / SYNTHESIS_FILENAME).read_text())
    split = dm.merge_splits([(str(p), dm.load_split(p)) for p in sorted(class_runs.glob("*/few_shot_split.json"))])
    assert record["mask_from"] == "train" and record["split"]["defect_types"] == split["defect_types"]
    training = {str(m) for d in split["defect_types"] for m in dm.list_split_masks(SYNTHETIC_DATA, split, d, "train")}
    for row in rows_of(out):
        assert row["mask_from"] == "train" and row["source_masks"] and set(row["source_masks"]) <= training
    [source] = read_synthetic_sources([str(out)])
    assert count_test_set_reuse(source, split, SYNTHETIC_DATA) == {"masks": 0, "images": 0, "rows": 4}


def test_a_build_from_heldout_masks_is_refused_downstream(class_runs, tmp_path):
    """--mask_from heldout paints in the test set's masks: the rows say so, and downstream_defectfill.py
    refuses the set unless --allow_test_leak."""
    import downstream_defectfill as downstream

    out = run_build(class_runs, tmp_path / "leaky", "--num_candidates", "1", "--num_images", "1", "--mask_from", "heldout",
                    "--defects_per_image", "1")
    rows = rows_of(out)
    heldout = {str(m) for d in ("color", "scratch") for m in dm.list_split_masks(
        SYNTHETIC_DATA, json.loads((out / SYNTHESIS_FILENAME).read_text())["split"], d, "heldout")}
    assert all(r["mask_from"] == "heldout" and set(r["source_masks"]) <= heldout for r in rows)
    with pytest.raises(DownstreamError, match=r"--synthetic leaky: 2 of 2 images have a defect painted in a held-out"):
        downstream.main(downstream.parse_args(["--synthetic", str(out), "--output_dir", str(tmp_path / "d")]))


def test_a_build_from_a_mask_folder_records_dir(class_runs, tmp_path):
    """--mask_dir: the user's masks (here copies of real ones, per defect type), augmented by default; rows and
    synthesis.json record mask_from dir and name the folder's files as the source masks."""
    drawn = tmp_path / "drawn"
    for defect_type, name in (("color", "003_mask.png"), ("scratch", "004_mask.png")):
        (drawn / defect_type).mkdir(parents=True)
        (drawn / defect_type / name).write_bytes((SYNTHETIC_DATA / "metal_nut" / "ground_truth" / defect_type / name).read_bytes())
    out = run_build(class_runs, tmp_path / "out", "--mask_dir", str(drawn), "--num_candidates", "1", "--num_images", "1")
    rows = rows_of(out)
    assert rows and json.loads((out / SYNTHESIS_FILENAME).read_text())["mask_from"] == "dir"
    for row in rows:
        assert row["mask_from"] == "dir" and all(row["augmented"])
        assert all(Path(m).parent == drawn / d for m, d in zip(row["source_masks"], row["defect_types"]))


def test_lpips_selection_loads_its_weights_from_the_cache_offline(class_runs, tmp_path, offline_lpips_weights):
    """With 2 candidates and no scorer given, the builder loads LPIPS itself (AlexNet from $TORCH_HOME's cache,
    offline) and records each kept defect's LPIPS inside its mask."""
    out = run_build(class_runs, tmp_path / "out", "--num_candidates", "2", "--num_images", "1", "--defects_per_image", "1")
    rows = rows_of(out)
    assert len(rows) == 2 and all(row["candidate"][0] in (0, 1) and row["lpips"][0] > 0 for row in rows)


def test_weak_results_are_redrawn_with_the_next_seeds(class_build):
    """Item 0's first draw scored below --min_lpips: its candidates 0-1 are recorded as rejected, 2-3 drawn
    with the next seeds, and the higher (3) kept; the summary counts the rejects."""
    out, _, _ = class_build
    rows = rows_of(out)
    redrawn = [r for r in rows if r["rejected_candidates"]]
    assert [r["file_name"] for r in redrawn] == ["images/00000.png"] and redrawn[0]["defect_types"][0] == "color"
    for row in redrawn:
        assert row["rejected_candidates"] == [{"slot": 0, "defect_type": "color", "first_candidate": 0, "num_candidates": 2,
                                               "lpips": pytest.approx(0.02)}]
        assert row["candidate"][0] == 3
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["candidates_rejected"] == 2 * len(redrawn)
    assert summary["images"] == 4 and summary["defects_per_type"]["color"] >= 2
    assert summary["masks_augmented"] == sum(r["num_defects"] for r in rows)


def test_redraw_seeds_extend_the_candidate_scheme(tiny_pipeline):
    settings = SynthesisSettings("A metal nut with sks", 64, 2, 2)
    first = candidate_generators(0, 5, 4, "cpu")
    later = candidate_generators(0, 5, 2, "cpu", first=2)
    assert [g.initial_seed() for g in first[2:]] == [g.initial_seed() for g in later]
    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "train" / "good" / "000.png")
    mask = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "color" / "003_mask.png")
    job = prepare_job(image, mask, 5, settings)
    [plain] = synthesize(tiny_pipeline, [job], settings)
    [same] = synthesize(tiny_pipeline, [job], settings, first_candidate=0)
    assert np.array_equal(np.asarray(plain.image), np.asarray(same.image))
    with pytest.raises(SynthesisError, match="next pair's seeds"):
        candidate_generators(0, 5, 2, "cpu", first=1008)


def test_the_export_is_read_by_dataset_mvtec_and_imagefolder(class_build):
    import datasets

    out, _, _ = class_build
    rows = rows_of(out)
    exported = default_export_dir(out)
    loaded = dm.load_mvtec_defects(exported, "metal_nut")
    labels = sorted(r["defect_type"] for r in rows)
    assert sorted(loaded["defect_type"]) == labels
    assert dm.list_defect_types(exported, "metal_nut") == sorted(set(labels))
    assert len(dm.list_good_images(exported, "metal_nut", ("train",))) == len(dm.list_good_images(SYNTHETIC_DATA, "metal_nut", ("train",)))
    mapping = json.loads((exported / "metal_nut" / "defectfill_export.json").read_text())["files"]
    for relative, file_name in mapping.items():
        assert (exported / "metal_nut" / relative).read_bytes() == (out / file_name).read_bytes()
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == len(rows) and list(ds.to_dict().keys())[:1] == ["image"]
    assert len(dm.load_synthetic(out, defect_types=["combined"])) == sum(r["defect_type"] == "combined" for r in rows)
    assert (out / PREVIEW_FILENAME).is_file()


def test_named_adapter_paints_as_its_own_pipeline(class_runs, tiny_pipeline):
    """With both runs loaded as named adapters, the active one gives the same image as a pipeline holding only it."""
    settings = SynthesisSettings("A metal nut with sks", 64, 1, 2)
    image = Image.open(SYNTHETIC_DATA / "metal_nut" / "train" / "good" / "001.png")
    mask = Image.open(SYNTHETIC_DATA / "metal_nut" / "ground_truth" / "scratch" / "004_mask.png")
    job = prepare_job(image, mask, 7, settings)
    both = load_pipeline(str(TINY_MODEL))
    load_named_adapters(both, {"color": str(class_runs / "color"), "scratch": str(class_runs / "scratch")})
    use_adapter(both, "scratch")
    [named] = synthesize(both, [job], settings)
    alone = load_pipeline(str(TINY_MODEL), lora=str(class_runs / "scratch"))
    [single] = synthesize(alone, [job], settings)
    assert np.abs(np.asarray(named.image).astype(int) - np.asarray(single.image).astype(int)).max() <= 1
    use_adapter(both, "color")
    [other] = synthesize(both, [job], settings)
    assert not np.array_equal(np.asarray(other.image), np.asarray(named.image))


# ---------------------------------------------------------------------------------- resume, processes


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a build but the ones that record time (the summary, the rows: compared without their
    timing) or locks."""
    skip = {SUMMARY_FILENAME, ".metadata.lock", METADATA_FILENAME}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def test_a_killed_build_resumes_without_duplicates_or_orphans(class_runs, tmp_path, monkeypatch):
    flags = ("--no-mask_augment", "--num_candidates", "1", "--batch_size", "1", "--num_images", "1")
    whole = run_build(class_runs, tmp_path / "whole", *flags)
    real, calls = SynthesisFolder.save_result, []

    def killed_on_second(*a, **k):  # the second item has written its defect and semantic masks, then dies (the kill)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(SynthesisFolder, "save_result", killed_on_second)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_build(class_runs, out, *flags)
    assert list((out / "defect_masks").glob("00001_*"))  # the orphans a kill leaves
    monkeypatch.setattr(SynthesisFolder, "save_result", real)
    run_build(class_runs, out, *flags)
    assert snapshot(out).keys() == snapshot(whole).keys()
    assert [k for k, content in snapshot(whole).items() if snapshot(out)[k] != content] == []
    assert rows_of(out, timing=False) == rows_of(whole, timing=False)
    # the training masks used as they are: the label is the real mask
    for row in rows_of(out):
        for name, source in zip(row["defect_mask_file_names"], row["source_masks"]):
            assert np.array_equal(as_array(out / name) >= 128, as_array(source, "L") >= 128)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_write_what_one_writes(class_runs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    flags = ["--lora", str(class_runs), *FAST, "--num_candidates", "1", "--defects_per_image", "1:0.5,2:0.5", "--batch_size", "1"]
    script = str(REPO_ROOT / "build_dataset_defectfill.py")
    two = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", script, *flags, "--output_dir", str(tmp_path / "two")]
    one = [sys.executable, script, *flags, "--output_dir", str(tmp_path / "one")]
    for command in (two, one):
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=500)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = snapshot(tmp_path / "two"), snapshot(tmp_path / "one")
    assert a.keys() == b.keys() and len([k for k in a if k.startswith("images/")]) == 4
    assert [k for k in a if a[k] != b[k]] == []
    assert rows_of(tmp_path / "two", timing=False) == rows_of(tmp_path / "one", timing=False)
    # the processes split the work: batches of one image dealt in turn
    assert [r["process"] for r in rows_of(tmp_path / "two")] == [0, 1, 0, 1]
    assert "4 images" in result.stdout
