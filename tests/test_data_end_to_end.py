"""Every tool on datasets in the layouts inspection teams have (tests/helpers/layouts.py): train -> infer and
train -> build -> downstream on a VisA folder (0/1/2 masks, its CSV split) and an MVTec AD 2 folder (no defect
names, good images in three folders); the build pushed to the Hub as a dataset, offline; bad input ends each
command with ``error: ...``, never a traceback. On the tiny model at 64 px, a few steps each."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import build_dataset_defectfill as build
import dataset_mvtec as dm
import downstream_defectfill as downstream
import infer_defectfill as infer
import train_defectfill as train
from defectfill.cli import run_main
from defectfill.data.mask_files import read_mask
from defectfill.runs.files import METADATA_FILENAME
from tests.conftest import REPO_ROOT, TINY_MODEL
from tests.helpers.layouts import write_layout

FAKE_TOKEN = "hf_layoutsFAKEtoken0123456789"
TRAIN_FAST = ["--max_train_steps", "2", "--train_batch_size", "1", "--validation_steps", "0", "--checkpointing_steps", "1000",
              "--report_to", "none"]
SYNTH_FAST = ["--num_inference_steps", "1", "--num_candidates", "1"]
DOWNSTREAM_FAST = ["--resolution", "64", "--encoder", "resnet18", "--encoder_depth", "3", "--decoder_channels", "64", "32", "16",
                   "--classifier", "resnet18", "--epochs", "1", "--samples_per_epoch", "8", "--batch_size", "4",
                   "--classifier_epochs", "1", "--classifier_repeats", "1", "--seeds", "0", "--no-progress"]
# (layout, the defect type trained: VisA names its defects, MVTec AD 2 does not)
CASES = {"visa": "different_colour_spot", "mvtec_ad2": "defect"}


def train_run(written, defect_type, output_dir):
    return train.main(train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(TINY_MODEL),
        "--data_dir", str(written.root), "--object_class", written.object_class, "--defect_type", defect_type,
        "--output_dir", str(output_dir), *TRAIN_FAST,
    ]))


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    """A dataset written in the layout and a two-step run on one of its defect types."""
    root = tmp_path_factory.mktemp(request.param)
    written = write_layout(request.param, root / "data")
    run = root / "run"
    train_run(written, CASES[request.param], run)
    return written, run


def test_train_records_the_layout_and_infer_paints_in_its_heldout_masks(trained, tmp_path):
    written, run = trained
    split = json.loads((run / "few_shot_split.json").read_text())
    assert split["layout"] == written.layout and split["object_class"] == written.object_class
    heldout = split["defect_types"][CASES[written.layout]]["heldout"]
    assert heldout and all(name in written.defects for name in heldout)

    out = infer.main(infer.parse_args(["--lora", str(run), "--output_dir", str(tmp_path / "synthetic"), "--num_images", "2",
                                       *SYNTH_FAST]))
    rows = [json.loads(line) for line in (out / METADATA_FILENAME).read_text().splitlines()]
    assert len(rows) == 2 and {r["mask_from"] for r in rows} == {"heldout"}
    goods = {(written.root / p).resolve() for p in written.goods["train"]}
    for row in rows:
        assert (written.root / row["source_image"]).resolve() in goods
        source = read_mask(row["source_mask"])  # VisA's 0/1/2 mask: read whole, not as empty
        painted = np.asarray(Image.open(out / row["mask_file_name"])) > 0
        assert source.any() and painted.any()
        assert np.array_equal(painted, np.asarray(Image.fromarray(source).resize(painted.shape[::-1], Image.NEAREST)))


def test_train_build_downstream_and_export(trained, tmp_path):
    written, run = trained
    output = tmp_path / "dataset"
    build.main(build.parse_args(["--lora", str(run), "--output_dir", str(output), "--num_images", "2", "--no-mask_augment",
                                 "--export", "mvtec", *SYNTH_FAST]))
    rows = [json.loads(line) for line in (output / METADATA_FILENAME).read_text().splitlines()]
    split = json.loads((run / "few_shot_split.json").read_text())
    defect_type = CASES[written.layout]
    assert len(rows) == 2 and {r["defect_type"] for r in rows} == {defect_type}
    train_masks = {str(p) for p in dm.list_split_masks(written.root, split, defect_type, "train")}
    assert {m for r in rows for m in r["source_masks"]} <= train_masks

    # The MVTec AD export of a set read from another layout: every good image of each split, none overwritten.
    exported = output.with_name(f"{output.name}-mvtec")
    assert dm.detect_layout(exported, written.object_class) == "mvtec"
    for part in ("train", "test"):
        assert len(dm.list_good_images(exported, written.object_class, (part,))) == len(written.goods[part])
    assert len(dm.load_mvtec_defects(exported, written.object_class)) == 2

    results = downstream.main(downstream.parse_args(["--synthetic", f"ours={output}", "--output_dir", str(tmp_path / "down"),
                                                     "--baselines", "untrained", "--no-with_real", *DOWNSTREAM_FAST]))
    heldout = len(split["defect_types"][defect_type]["heldout"])
    assert results["test_set"] == {defect_type: heldout, "good": len(written.goods["test"])}
    assert not results["leaky"] and results["test_set_reuse"]["ours"] == {"masks": 0, "images": 0, "rows": 2}
    assert results["summary"]["ours"]["pixel_auroc"]["mean"] is not None


def test_a_set_painted_on_the_layouts_test_good_images_is_counted(trained, tmp_path):
    """The downstream check knows a VisA / MVTec AD 2 test good image (not only MVTec's test/good)."""
    from defectfill.downstream.sources import count_test_set_reuse, read_synthetic_sources

    written, run = trained
    out = infer.main(infer.parse_args(["--lora", str(run), "--output_dir", str(tmp_path / "leaky"), "--num_images", "1",
                                       "--good_split", "test", "--mask_from", "train", *SYNTH_FAST]))
    split = json.loads((run / "few_shot_split.json").read_text())
    counts = count_test_set_reuse(read_synthetic_sources([str(out)])[0], split, written.root)
    assert counts == {"masks": 0, "images": 1, "rows": 1}


# ----------------------------------------------------------------------------------------------------
# Sharing a build
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/widgets"

    def upload_folder(**kwargs):
        calls["upload"] = kwargs
        calls["files"] = {p.relative_to(kwargs["folder_path"]).as_posix(): p.read_bytes()
                          for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file()}

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **k: calls.setdefault("create", (repo_id, k)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_build_as_a_dataset_with_its_card(trained, tmp_path, fake_hub, caplog):
    written, run = trained
    output = tmp_path / "widgets"
    with caplog.at_level(logging.DEBUG):
        build.main(build.parse_args(["--lora", str(run), "--output_dir", str(output), "--num_images", "2", "--seed", "7",
                                     "--push_to_hub", "--hub_dataset_id", "someone/widgets", "--hub_token", FAKE_TOKEN,
                                     *SYNTH_FAST]))
    assert fake_hub["create"][0] == "someone/widgets" and fake_hub["create"][1]["repo_type"] == "dataset"
    upload = fake_hub["upload"]
    assert upload["repo_type"] == "dataset" and upload["folder_path"] == str(output) and upload["token"] == FAKE_TOKEN
    uploaded = fake_hub["files"]
    assert {"README.md", METADATA_FILENAME, "synthesis.json", "build_summary.json"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    defect_type = CASES[written.layout]
    for told in (f"| {defect_type} | 2 |", "mask_from: train", "Seed 7", str(TINY_MODEL), f"| {defect_type} | `{run}` | 0 | ",
                 f"{written.layout} layout", "load_dataset('someone/widgets'"):
        assert told in card, told
    # The token reaches the upload alone: no file of the folder, nothing uploaded, no log line.
    assert not any(FAKE_TOKEN.encode() in p.read_bytes() for p in output.rglob("*") if p.is_file())
    assert not any(FAKE_TOKEN.encode() in content for content in uploaded.values())
    assert FAKE_TOKEN not in caplog.text
    # What went up loads as a datasets dataset: image and mask as images, the metadata as columns.
    ds = datasets.load_dataset(str(output), split="train", cache_dir=str(tmp_path / "datasets_cache"))
    assert len(ds) == 2 and isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["mask"], datasets.Image)
    assert set(ds["defect_type"]) == {defect_type} and ds[0]["mask"].size == ds[0]["image"].size


def test_a_failed_push_keeps_the_dataset_and_says_so(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    written, run = trained

    def offline(*args, **kwargs):
        raise ConnectionError(f"cannot reach the Hub with token {kwargs['token']}")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    output = tmp_path / "kept"
    argv = ["--lora", str(run), "--output_dir", str(output), "--num_images", "1", "--push_to_hub", "--hub_token", FAKE_TOKEN,
            *SYNTH_FAST]
    with pytest.raises(SystemExit) as exit_:
        run_main(build.main, lambda: build.parse_args(argv))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and f"the dataset is saved in {output}" in message and "pushing it to the Hub failed" in message
    assert FAKE_TOKEN not in message and "***" in message
    assert len((output / METADATA_FILENAME).read_text().splitlines()) == 1 and (output / "README.md").is_file()


# ----------------------------------------------------------------------------------------------------
# Bad input reaches the user as one line
# ----------------------------------------------------------------------------------------------------


def error_of(main, parse_args, argv) -> str:
    """What the command prints and exits with: `run_main` turns a bad input into ``error: ...`` (exit status 1)."""
    with pytest.raises(SystemExit) as exit_:
        run_main(main, lambda: parse_args(argv))
    assert isinstance(exit_.value.code, str), exit_.value.code  # a message, which Python exits 1 with
    return exit_.value.code


def test_train_names_every_layout_tried_when_none_matches(tmp_path):
    (tmp_path / "widget" / "pictures").mkdir(parents=True)
    message = error_of(train.main, train.parse_args, [
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(TINY_MODEL),
        "--data_dir", str(tmp_path), "--object_class", "widget", "--output_dir", str(tmp_path / "run"), *TRAIN_FAST])
    assert message.startswith("error: category 'widget' not found") and "layouts tried" in message
    for expected in ("visa: widget/Data/Images", "mvtec_ad2: widget/test_public/bad", "csv: <data_dir>/widget.csv",
                     "folder: widget/good"):
        assert expected in message, expected


def test_infer_names_an_image_without_a_mask(trained, tmp_path):
    written, run = trained
    data = tmp_path / "data"
    shutil.copytree(written.root, data)
    if written.layout == "visa":
        (data / "candle" / "image_anno.csv").unlink()  # the mask is then found by the image's name
        victim = next((data / "candle" / "Data" / "Masks" / "Anomaly").glob("*.png"))
    else:
        victim = next((data / "sheet_metal" / "test_public" / "ground_truth" / "bad").glob("*.png"))
    victim.unlink()
    message = error_of(infer.main, infer.parse_args, ["--lora", str(run), "--data_dir", str(data), "--output_dir",
                                                      str(tmp_path / "out"), *SYNTH_FAST])
    assert message.startswith("error: image ") and "has no mask; expected" in message and victim.stem in message
    assert not (tmp_path / "out").exists()


def test_build_names_an_unreadable_mask(trained, tmp_path):
    written, run = trained
    data = tmp_path / "data"
    shutil.copytree(written.root, data)
    split = json.loads((run / "few_shot_split.json").read_text())
    broken = dm.list_split_masks(data, split, CASES[written.layout], "train")[0]
    broken.write_bytes(b"not a png")
    message = error_of(build.main, build.parse_args, ["--lora", str(run), "--data_dir", str(data), "--output_dir",
                                                      str(tmp_path / "out"), "--num_images", "1", *SYNTH_FAST])
    assert message.startswith("error: ") and str(broken) in message
    assert not (tmp_path / "out").exists()


def test_downstream_names_a_forced_layout_the_folder_is_not_in(trained, tmp_path):
    written, run = trained
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    (synthetic / METADATA_FILENAME).write_text(json.dumps({"file_name": "images/00000.png", "mask_file_name": "masks/00000.png"}))
    message = error_of(downstream.main, downstream.parse_args, [
        "--synthetic", f"x={synthetic}", "--data_dir", str(written.root), "--object_class", written.object_class,
        "--split_file", str(run), "--layout", "btad", "--output_dir", str(tmp_path / "out"), *DOWNSTREAM_FAST])
    assert message.startswith(f"error: --layout btad: {written.root} does not hold {written.object_class!r} in that layout")
    assert "expected btad: " in message and not (tmp_path / "out").exists()


def test_the_dataset_command_exits_1_with_one_line(tmp_path):
    (tmp_path / "widget").mkdir()
    result = subprocess.run([sys.executable, "dataset_mvtec.py", "--data_dir", str(tmp_path), "--object_class", "widget"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: category 'widget' not found") and "layouts tried" in result.stderr


# ----------------------------------------------------------------------------------------------------
# docs/data.md's own-data examples, as written
# ----------------------------------------------------------------------------------------------------

DOC = REPO_ROOT / "docs" / "data.md"
SCRIPTS = {"dataset_mvtec.py": dm, "train_defectfill.py": train, "build_dataset_defectfill.py": build}
# Test knobs added after the documented flags (the last value of a flag wins): the tiny model, a few steps.
KNOBS = {"train_defectfill.py": ["--pretrained_model_name_or_path", str(TINY_MODEL), "--resolution", "64", *TRAIN_FAST],
         "build_dataset_defectfill.py": ["--num_images", "1", "--no-mask_augment", *SYNTH_FAST], "dataset_mvtec.py": []}


def doc_commands(heading: str) -> list[str]:
    """The command lines of the first ```bash block under `heading` in docs/data.md."""
    section = DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def run_doc_command(line: str, paths: dict[str, Path]) -> object:
    """One documented command in-process: its script's `main(parse_args(...))`, folders of the example mapped
    under `paths` (the data folder to a fixture, runs/ and synthetic/ to a temporary folder)."""
    python, script, *argv = shlex.split(line)
    assert python == "python" and script in SCRIPTS, line
    mapped = []
    for arg in argv:
        top = arg.split("/", 1)[0]
        mapped.append(str(paths[top] / arg.split("/", 1)[1]) if top in paths and "/" in arg
                      else str(paths[arg]) if arg in paths else str(REPO_ROOT / arg) if top == "configs" else arg)
    module = SCRIPTS[script]
    return module.main(module.parse_args(mapped + KNOBS[script]))


@pytest.mark.slow
@pytest.mark.parametrize(("heading", "layout", "folder"), [("Your own folder", "folder", "my_parts"),
                                                           ("A CSV table", "csv", "my_photos")])
def test_the_own_data_examples_run_as_written(heading, layout, folder, tmp_path, capsys):
    written = write_layout(layout, tmp_path / folder)
    commands = doc_commands(heading)
    assert len(commands) == 3 and all(f"--data_dir {folder} --object_class widget" in c for c in commands[:2])
    paths = {folder: written.root, "runs": tmp_path / "runs", "synthetic": tmp_path / "synthetic"}
    split = run_doc_command(commands[0], paths)
    assert split["layout"] == layout and sorted(split["defect_types"]) == sorted({t for t, _ in written.defects.values()})
    runs = run_doc_command(commands[1], paths)
    assert sorted(p.name for p in runs) == sorted(split["defect_types"])
    output = run_doc_command(commands[2], paths)
    rows = (output / METADATA_FILENAME).read_text().splitlines()
    assert len(rows) == len(split["defect_types"])
    assert dm.detect_layout(output.with_name(f"{output.name}-mvtec"), "widget") == "mvtec"


def test_the_docs_table_names_every_layout():
    from defectfill.data.layouts import LAYOUT_NAMES

    table = {line.split("|")[1].strip(" `") for line in DOC.read_text().splitlines() if line.startswith("| `")} - {"--layout"}
    assert table == set(LAYOUT_NAMES)


# ----------------------------------------------------------------------------------------------------
# The downstream check and the export in other layouts (no model)
# ----------------------------------------------------------------------------------------------------


def test_a_set_painted_in_heldout_loco_mask_folders_is_counted(tmp_path):
    """A LOCO mask is a folder of files: a synthetic row recording it as its source counts as test-set reuse."""
    from defectfill.downstream.sources import SyntheticSource, count_test_set_reuse

    written = write_layout("mvtec_loco", tmp_path / "data")
    split = dm.few_shot_split(dm.load_mvtec_defects(written.root, written.object_class))
    heldout = dm.list_split_masks(written.root, split, "logical_anomalies", "heldout")
    train_masks = dm.list_split_masks(written.root, split, "logical_anomalies", "train")
    assert heldout[0].is_dir() and train_masks[0].is_dir()
    folder = tmp_path / "synthetic"
    folder.mkdir()
    rows = [{"file_name": f"images/{i:05d}.png", "mask_file_name": f"masks/{i:05d}.png", "source_masks": [str(mask)],
             "source_image": str(image)}
            for i, (mask, image) in enumerate([(heldout[0], written.root / written.goods["train"][0]),
                                                (train_masks[0], written.root / written.goods["test"][0]),
                                                (train_masks[0], written.root / written.goods["train"][1])])]
    (folder / METADATA_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = SyntheticSource("loco", [folder], [None])
    assert count_test_set_reuse(source, split, written.root) == {"masks": 1, "images": 1, "rows": 3}


def test_real_sets_name_images_outside_the_data_folder_by_their_path(tmp_path):
    """A CSV table may list images anywhere: the downstream sets name them without failing."""
    from defectfill.downstream.data import good_set, image_name

    written = write_layout("csv", tmp_path / "table")
    outside = tmp_path / "elsewhere" / "ok.png"
    outside.parent.mkdir()
    shutil.copyfile(written.root / written.goods["train"][0], outside)
    assert image_name(written.root / "photos" / "ok_0.png", written.root) == "photos/ok_0.png"
    assert image_name(outside, written.root) == outside.as_posix()
    assert good_set([outside, written.root / "photos" / "ok_0.png"], 32, written.root).names == [outside.as_posix(), "photos/ok_0.png"]


def test_the_export_keeps_good_images_of_the_same_name_apart():
    from defectfill.build.export import good_name

    taken: set[str] = set()
    names = [good_name(Path(p), taken) for p in ("a/train/good/000.png", "a/validation/good/000.png", "b/validation/000.png")]
    assert names == ["000.png", "validation_good_000.png", "b_validation_000.png"]
