"""run_files: the typed records round-trip, old files still load, newer or broken ones are named; metadata
rows and checkpoint names."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from defectfill.errors import RunFileError
from defectfill.runs.files import METADATA_FILENAME, RUN_FILENAME
from defectfill.runs.folder import SynthesisFolder, read_metadata
from defectfill.runs.records import RUN_RECORD_VERSION, RunRecord, SynthesisRecord
from defectfill.training.checkpoints import checkpoint_name, checkpoint_step, list_checkpoints
from tests.helpers.folder_writer import fill


def run_record() -> RunRecord:
    return RunRecord(base_model="/models/sd2", token="sks", object_class="metal_nut", defect_type="color",
                        defect_prompt="A photo of sks", object_prompt="A metal nut with sks", resolution=512,
                        split={"defect_types": {"color": {"train": ["a.png"], "heldout": ["b.png"]}}},
                        defect_crop_probability=0.0, crop_context=0.5)


def test_records_round_trip_with_their_version(tmp_path):
    record = run_record()
    record.write(tmp_path)
    assert json.loads((tmp_path / RUN_FILENAME).read_text())["version"] == RUN_RECORD_VERSION
    assert RunRecord.read(tmp_path) == record
    synthesis = SynthesisRecord("/models/sd2", "A metal nut with sks", 512, seed=3, crop_to_mask=True)
    synthesis.write(tmp_path)
    assert SynthesisRecord.read(tmp_path) == synthesis
    assert SynthesisRecord.read(tmp_path / "elsewhere") is None  # a folder made by another tool


def test_a_version_1_run_file_still_loads(tmp_path):
    """Written before the version field and the training scale existed."""
    payload = {k: v for k, v in run_record().to_dict().items()
               if k not in ("version", "defect_crop_probability", "crop_context", "max_scale")}
    (tmp_path / RUN_FILENAME).write_text(json.dumps({**payload, "an_old_field": 1}))
    record = RunRecord.read(tmp_path)
    assert record.object_prompt == "A metal nut with sks" and record.defect_crop_probability is None


@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "version 99 is newer than this code reads"),
    ({"split": None}, r"missing field\(s\) split"),
    ({"split": {"train": []}}, "is not a few-shot split"),
])
def test_bad_run_files_are_named(tmp_path, change, message):
    (tmp_path / RUN_FILENAME).write_text(json.dumps({**run_record().to_dict(), **change}))
    with pytest.raises(RunFileError, match=message):
        RunRecord.read(tmp_path)


def test_metadata_rows_and_a_broken_line(tmp_path):
    rows = {"images/00000.png": {"file_name": "images/00000.png", "mask_file_name": "masks/00000_mask.png", "seed": 0}}
    SynthesisFolder(tmp_path).write_rows(rows)
    assert read_metadata(tmp_path) == {}  # the files do not exist: not counted as done
    assert read_metadata(tmp_path, require_files=False) == rows
    (tmp_path / METADATA_FILENAME).write_text('{"file_name": "x"}\nnot json\n')
    with pytest.raises(RunFileError, match="line 1: a row needs 'file_name' and 'mask_file_name'"):
        read_metadata(tmp_path)


def test_checkpoint_names(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-x", ".checkpoint-3.partial"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert checkpoint_step(tmp_path / checkpoint_name(7)) == 7 and checkpoint_step("checkpoint-x") is None


def test_two_processes_fill_one_folder_through_its_lock(tmp_path):
    """Two writer processes at once, into one folder at numbers each of its own, merging their rows (`add_rows`),
    and into another at the next free number (`append`): every output once, the appended ones numbered 0.. without
    a gap or a number taken twice, no row lost or duplicated in either metadata.jsonl."""
    count = 12
    numbered, appended = tmp_path / "numbered", tmp_path / "appended"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [context.Process(target=fill, args=(str(numbered), str(appended), writer, count, start)) for writer in (0, 1)]
    for process in writers:
        process.start()
    start.set()
    for process in writers:
        process.join(timeout=120)
    assert [process.exitcode for process in writers] == [0, 0]

    expected = {(writer, item) for writer in (0, 1) for item in range(count)}
    for folder in (numbered, appended):
        lines = [json.loads(line) for line in (folder / METADATA_FILENAME).read_text().splitlines()]
        assert sorted(row["file_name"] for row in lines) == [f"images/{index:05d}.png" for index in range(2 * count)], folder.name
        assert {(row["writer"], row["item"]) for row in lines} == expected, folder.name
        assert read_metadata(folder) == {row["file_name"]: row for row in lines}  # every row's files exist
    rows = read_metadata(numbered)
    assert all(rows[f"images/{2 * item + writer:05d}.png"]["writer"] == writer for writer, item in expected)
