"""run_files: the typed records round-trip with their format version, files of another format or broken ones are
named with what to do; metadata rows and checkpoint names."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from defectfill.errors import RunFileError, SynthesisError
from defectfill.runs.files import FINGERPRINT_FILENAME, METADATA_FILENAME, RUN_FILENAME, SYNTHESIS_FILENAME
from defectfill.runs.folder import FINGERPRINT_VERSION, SynthesisFolder, read_metadata
from defectfill.runs.records import RUN_RECORD_VERSION, SYNTHESIS_RECORD_VERSION, RunRecord, SynthesisRecord
from defectfill.training.checkpoints import checkpoint_name, checkpoint_step, list_checkpoints
from tests.helpers.folder_writer import fill


def run_record() -> RunRecord:
    return RunRecord(base_model="/models/sd2", token="sks", object_class="metal_nut", defect_type="color",
                     defect_prompt="A photo of sks", object_prompt="A metal nut with sks", resolution=512,
                     split={"defect_types": {"color": {"train": ["a.png"], "heldout": ["b.png"]}}},
                     training={"rank": 8, "lora_alpha": 16, "defect_crop_probability": 0.25, "defect_crop_context": 0.5,
                               "max_scale": 1.125})


def test_records_round_trip_with_their_format_version(tmp_path):
    record = run_record()
    record.write(tmp_path)
    assert json.loads((tmp_path / RUN_FILENAME).read_text())["format_version"] == RUN_RECORD_VERSION
    assert RunRecord.read(tmp_path) == record
    synthesis = SynthesisRecord("/models/sd2", "A metal nut with sks", 512, seed=3, crop_to_mask=True)
    synthesis.write(tmp_path)
    assert json.loads((tmp_path / SYNTHESIS_FILENAME).read_text())["format_version"] == SYNTHESIS_RECORD_VERSION
    assert SynthesisRecord.read(tmp_path) == synthesis
    assert SynthesisRecord.read(tmp_path / "elsewhere") is None  # a folder made by another tool


def test_the_record_reads_its_training_scale_from_the_training_settings():
    record = run_record()
    assert (record.rank, record.lora_alpha, record.max_scale) == (8, 16, 1.125)
    assert (record.defect_crop_probability, record.crop_context) == (0.25, 0.5)
    assert RunRecord(**{**vars(record), "training": {}}).defect_crop_probability is None  # not recorded


@pytest.mark.parametrize("version_fields, message", [
    ({}, r"is format 1, written by an older defectfill \(<= 0\.1\); this defectfill \(.*\) reads format 3: train the run "
         r"again with train_defectfill\.py, or read it with defectfill 0\.1"),
    ({"version": 2}, "is format 2, written by an older defectfill"),
    ({"format_version": 99}, "is format 99, written by a newer defectfill; .* reads format 3: update defectfill"),
    ({"format_version": "3"}, "format_version '3' is not a format number"),
])
def test_a_run_file_of_another_format_says_which_and_what_to_do(tmp_path, version_fields, message):
    payload = {k: v for k, v in run_record().to_dict().items() if k != "format_version"}
    (tmp_path / RUN_FILENAME).write_text(json.dumps({**payload, **version_fields}))
    with pytest.raises(RunFileError, match=message):
        RunRecord.read(tmp_path)


def test_a_synthesis_folder_of_an_earlier_format_says_what_to_do(tmp_path):
    payload = {k: v for k, v in SynthesisRecord("/models/sd2", "p", 512).to_dict().items() if k != "format_version"}
    (tmp_path / SYNTHESIS_FILENAME).write_text(json.dumps({**payload, "version": 2}))
    with pytest.raises(RunFileError, match="is format 2, written by an older defectfill .* paint it again with this defectfill, "
                                           "into a new --output_dir"):
        SynthesisRecord.read(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"split": None}, r"missing field\(s\) split"),
    ({"split": {"train": []}}, "is not a few-shot split"),
    ({"training": [1]}, "'training' is not an object of training settings"),
])
def test_bad_run_files_are_named(tmp_path, change, message):
    (tmp_path / RUN_FILENAME).write_text(json.dumps({**run_record().to_dict(), **change}))
    with pytest.raises(RunFileError, match=message):
        RunRecord.read(tmp_path)


def test_a_folder_claimed_by_another_fingerprint_format_is_refused_with_its_format(tmp_path):
    folder = SynthesisFolder(tmp_path)
    folder.claim({"seed": 1})
    assert folder.check({"seed": 1}) == []  # the same fingerprint resumes
    (tmp_path / FINGERPRINT_FILENAME).write_text(json.dumps({"version": 1, "fingerprint": {"seed": 1}}))
    with pytest.raises(SynthesisError, match=rf"its {FINGERPRINT_FILENAME} is format 1, from another defectfill; this one "
                                             rf"writes format {FINGERPRINT_VERSION}\).*use a new --output_dir"):
        folder.check({"seed": 1})
    assert folder.check({"seed": 1}, overwrite=True)  # --overwrite may empty it


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
