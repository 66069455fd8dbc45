"""Runs as the app uses them: where a run's relative paths point (the bundled runs record `models/...` and
`data/...`, relative to the repository), the runs a location holds, labelled, and a run resolved for
synthesis (`defectfill.runs.settings.plan_run`) with its good images and held-out masks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from defectfill import method
from defectfill.data.mvtec import list_good_images, list_heldout_masks, split_layout
from defectfill.errors import RunFileError
from defectfill.runs.discovery import find_runs
from defectfill.runs.files import RUN_FILENAME
from defectfill.runs.records import RunRecord, read_run
from defectfill.runs.settings import RunOverrides, RunPlan, plan_run


@dataclass(frozen=True)
class AppPaths:
    """The repository the app runs from: relative paths in bundled runs resolve against `root`, the page shows
    paths under it relative to it, and runs on `tiny_model` are labelled as the toy they are."""

    root: Path
    demo_run: Path
    tiny_model: Path

    @classmethod
    def of_repository(cls, root: str | os.PathLike) -> "AppPaths":
        root = Path(root).resolve()
        return cls(root, root / "models" / "demo-lora-metal_nut-color", root / "models" / "tiny-sd2-inpainting")

    def local(self, path: str | os.PathLike | None) -> str | None:
        """An existing path, absolute; else the path relative to the repository; else as given (a Hub id)."""
        if path is None:
            return None
        if Path(path).exists():
            return str(Path(path).resolve())
        if not Path(path).is_absolute() and (self.root / path).exists():
            return str((self.root / path).resolve())
        return str(path)

    def shown(self, path: str | os.PathLike) -> str:
        """A path for the page: relative to the repository when inside it (the bundled runs), else as is."""
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except (ValueError, OSError):
            return str(path)


def run_label(folder: Path) -> str:
    """"<class> / <defect type> (<folder>)" for a run with a readable record, else the folder's name."""
    try:
        run = RunRecord.read(folder) if (folder / RUN_FILENAME).is_file() else None
    except RunFileError:
        run = None
    return f"{run.object_class} / {run.defect_type} ({folder.name})" if run else folder.name


def list_runs(location: str, paths: AppPaths) -> dict[str, str]:
    """{label: lora} of a run location (`find_runs`): one entry for a run folder or a Hub repo id, one per
    sub-folder of a folder of runs (`--defect_type all`), labelled by class and defect type."""
    location = (location or "").strip()
    runs = {}
    for run in find_runs(paths.local(location) if location else location):
        if Path(run).exists():
            runs[run_label(Path(run))] = str(Path(run).resolve())
        else:  # a Hub repo id: read_run fetches its run file
            runs[run] = run
    return runs


@dataclass
class RunInfo:
    """A run as the app uses it: the run resolved for synthesis (`plan`) and the files of its data."""

    plan: RunPlan
    good_images: list[Path] = field(default_factory=list)
    heldout_masks: list[Path] = field(default_factory=list)
    is_tiny_demo: bool = False

    lora = property(lambda self: self.plan.lora)
    record = property(lambda self: self.plan.record)
    base_model = property(lambda self: self.plan.base_model)
    token = property(lambda self: self.plan.token)
    object_class = property(lambda self: self.plan.object_class)
    defect_type = property(lambda self: self.plan.defect_type)
    data_dir = property(lambda self: self.plan.data_dir)
    prompt = property(lambda self: self.plan.settings.prompt)
    resolution = property(lambda self: self.plan.settings.resolution)
    crop_to_mask = property(lambda self: self.plan.settings.crop_to_mask)
    crop_context = property(lambda self: self.plan.settings.crop_context)


def load_run(lora: str, paths: AppPaths, base_model: str | None = None, data_dir: str | None = None) -> RunInfo:
    """Read a run (`read_run`), resolve it for synthesis (the run's base model, prompt and scale; the app's
    `--pretrained_model_name_or_path` and `--data_dir` win) and list its good images and held-out masks. A LoRA
    trained elsewhere (no run file, so no object class) is prompted with the defect prompt, "A photo of [V*]"."""
    lora = paths.local(lora)
    record = read_run(lora)
    base = paths.local(base_model or (record.base_model if record else None))
    data = paths.local(data_dir or (record.data_dir if record else None))
    prompt = None if record is not None else method.defect_prompt(method.DEFAULT_TOKEN)
    plan = plan_run(lora, record, RunOverrides(pretrained_model_name_or_path=base, data_dir=data, prompt=prompt))
    goods, masks = [], []
    if plan.data_dir and plan.object_class and Path(plan.data_dir).is_dir():
        layout = split_layout(record.split if record is not None else None)  # the layout the run's split recorded
        goods = list_good_images(plan.data_dir, plan.object_class, layout=layout)
        if record is not None and record.defect_type in record.split.get("defect_types", {}):
            masks = list_heldout_masks(plan.data_dir, record.split, record.defect_type, layout)
    tiny = Path(plan.base_model).exists() and Path(plan.base_model).resolve() == paths.tiny_model.resolve()
    return RunInfo(plan, goods, masks, tiny)


def run_summary(run: RunInfo, selection_note: str, paths: AppPaths, shown: Callable[[str], str] | None = None) -> str:
    """The page's description of the loaded run; `shown` writes its paths (default: `paths.shown`, and the data
    folder as it is)."""
    shown_data = shown or str
    shown = shown or paths.shown
    lines = [f"**Run** `{shown(run.lora)}`: {run.object_class or '?'} / {run.defect_type or '?'}, token `{run.token}`, "
             f"base `{shown(run.base_model)}`, {run.resolution} px, prompt *{run.prompt}*, "
             f"{'crop around the mask' if run.crop_to_mask else 'whole image'} (the scale it trained at)."]
    if run.is_tiny_demo:
        lines.append("The bundled tiny model is a toy (64 px, pre-trained on procedural images on a CPU): it shows the "
                     "workflow, not SD2 quality. Start the app with `--lora` on an SD2 run for real defects.")
    if not run.good_images:
        lines.append(f"No good images found for this run (data folder: `{shown_data(run.data_dir)}`): upload one, "
                     "or start with `--data_dir`.")
    lines.append(selection_note)
    return "\n\n".join(lines)
