"""What the app accepts from a client, in one place: every value the page (or any client of its API) sends
goes through an `AppPolicy` before a handler sees it.

Local mode (a person on their own machine) keeps the app open: any run folder, Hub id or dataset folder.
Public mode (a Space, a `--share` link, a non-loopback address, or `--public`) treats every request as hostile:

- runs are the ones given at launch, picked by label; no other path or Hub id is accepted;
- good images and held-out masks are picked by label from the run's lists, and mapped back here;
- "Add to dataset" writes only to this session's folder under the dataset root given at launch, and no path
  from the client is joined to it; a symbolic link in that folder, or a root that moved, stops the write; what it
  stores has caps per session and in total, and a result already stored is not stored again (`datasets`);
- paths shown to the page are relative to the dataset root, the repository, the run or its data (`shown`);
- a value of the wrong type (a list where a label goes) is refused with a message (`label`);
- uploads, image sizes, the settings of a Generate (`GENERATE_SETTINGS`) and the queue have caps (`limits`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from defectfill.app.datasets import PUBLIC_DATASET_ROOT, session_folder, session_folder_name
from defectfill.app.limits import GENERATE_SETTINGS, PublicLimits, check_image_size, format_number
from defectfill.app.runs import AppPaths, RunInfo, list_runs
from defectfill.app.settings import AppSettings
from defectfill.errors import RequestRefused, SynthesisError

__all__ = ["AppPolicy", "GENERATE_SETTINGS", "PUBLIC_DATASET_ROOT", "PublicLimits", "RequestRefused", "check_image_size",
           "label", "mode_errors", "serving_mode", "session_folder_name"]


def label(value, what: str) -> str:
    """A text value a client sent where a label, name or folder goes: None is empty; a list, dict or number is
    refused with a message (not a TypeError further on)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestRefused(f"{what}: expected a label (text), got {type(value).__name__} {str(value)[:80]!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Which mode
# ----------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = (host or "").strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: reachable from wherever it resolves
        return False


def serving_mode(public: bool, private: bool, share: bool, server_name: str,
                 environ: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """(public, why): public with --public, --share, on a Space (SPACE_ID) or on a non-loopback address;
    --private forces local mode (on a trusted network)."""
    if private:
        return False, "--private"
    if public:
        return True, "--public"
    if share:
        return True, "--share: a public gradio.live link"
    if environ.get("SPACE_ID"):
        return True, "SPACE_ID is set: a Hugging Face Space"
    if not is_loopback(server_name):
        return True, f"listening on {server_name}, not a loopback address"
    return False, f"listening on {server_name} only"


def mode_errors(private: bool, share: bool, page_values: Mapping[str, float | None], public: bool) -> list[str]:
    """What is wrong with the flags for the mode: --private with --share, and the page's starting values
    (`page_values`, by GENERATE_SETTINGS name) above the public caps."""
    errors = []
    if private and share:
        errors.append("--private cannot be used with --share: a gradio.live link is reachable by anyone")
    if public:
        for name, setting in GENERATE_SETTINGS.items():
            value = page_values.get(name)
            if value is not None and not setting.minimum <= value <= setting.public_maximum:
                errors.append(f"--{name} {value} is outside what a public server accepts "
                              f"({format_number(setting.minimum)} to {format_number(setting.public_maximum)})")
    return errors


# ----------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------


def unique_labels(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{label: value}, a repeated label numbered (" [2]") so each one names one value."""
    labelled: dict[str, str] = {}
    for label, value in pairs:
        name, n = label, 1
        while name in labelled:
            n += 1
            name = f"{label} [{n}]"
        labelled[name] = value
    return labelled


ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/[^\s'\"`,;()\[\]{}<>]+")


@dataclass
class AppPolicy:
    """The rules of one server: its mode, the runs given at launch ({label: LoRA folder or Hub id}), the dataset
    root of public mode, and the caps. Every handler of the page calls it for every value a client sends."""

    paths: AppPaths
    public: bool = False
    reason: str = "listening on 127.0.0.1 only"
    locations: list[str] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)
    dataset_root: Path | None = None
    datasets: bool = True
    limits: PublicLimits = field(default_factory=PublicLimits)

    @classmethod
    def from_settings(cls, settings: AppSettings, paths: AppPaths, environ: Mapping[str, str] = os.environ) -> "AppPolicy":
        """The policy of `app_defectfill.py`'s settings; lists the runs of `--lora` (a wrong one fails here, in the
        CLI's words, before a server starts)."""
        server = settings.server
        public, reason = serving_mode(server.public, server.private, server.share, server.server_name, environ)
        locations = list(settings.lora or [str(paths.demo_run)])
        runs = unique_labels([pair for location in locations for pair in list_runs(location, paths).items()])
        root = Path(settings.output_dir or PUBLIC_DATASET_ROOT).resolve() if public else None
        if root is not None and root.exists() and not root.is_dir():
            raise SynthesisError(f"--output_dir {root} is not a folder (public mode: the dataset root, one folder per session)")
        return cls(paths, public, reason, locations, runs, root, bool(server.public_datasets))

    @classmethod
    def local(cls, paths: AppPaths, location: str | None = None) -> "AppPolicy":
        """Local mode on one run location (default: the bundled demo run)."""
        location = location or str(paths.demo_run)
        return cls(paths, locations=[location], runs=list_runs(location, paths))

    # -- what the page shows ---------------------------------------------------------------------------

    def mode_note(self) -> str:
        if not self.public:
            return (f"**Local mode** ({self.reason}): any run folder, Hub id and dataset folder of this machine can be "
                    "used. A server others reach runs in public mode (`--public`; on by itself with `--share`, a "
                    "non-loopback `--server_name` and on a Space).")
        dataset = (f"'Add to dataset' writes to this session's folder on the server ({self.limits.dataset_note()})"
                   if self.datasets else "'Add to dataset' is off on this server")
        limits, steps = self.limits, GENERATE_SETTINGS["num_inference_steps"].public_maximum
        candidates = GENERATE_SETTINGS["num_candidates"].public_maximum
        return (f"**Public mode** ({self.reason}): the runs this server was started with; {dataset}; uploads up to "
                f"{limits.max_file_size // (1024 * 1024)} MB and {limits.max_image_pixels:,} pixels; "
                f"at most {format_number(candidates)} candidates and {format_number(steps)} steps per Generate.")

    def initial_location(self) -> str:
        """The run box's text: the run location given at launch (local mode, one location), else empty (the
        runs given at launch)."""
        return self.paths.shown(self.locations[0]) if not self.public and len(self.locations) == 1 else ""

    def shown(self, path: str | os.PathLike | None, run: RunInfo | None = None) -> str:
        """A path as the page shows it. Local mode: relative to the repository when inside it, else as is. Public
        mode: relative to the dataset root or the repository (the bundled runs), else to the run's folder or its
        data (prefixed with that folder's name), else the file's name alone; a Hub id as it is."""
        if path is None:
            return ""
        if not self.public:
            return self.paths.shown(path)
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            return str(path)  # a Hub id or a name
        resolved = path.resolve()
        roots = [(self.dataset_root, False), (self.paths.root, False)]
        if run is not None:
            roots += [(Path(r).resolve(), True) for r in (run.lora, run.data_dir) if r and Path(r).exists()]
        for root, named in roots:
            if root is not None and resolved.is_relative_to(root):
                relative = resolved.relative_to(root)
                return str(Path(root.name) / relative) if named else (str(relative) if relative.parts else ".")
        return path.name

    def public_text(self, text: str, run: RunInfo | None = None) -> str:
        """A message for the page: in public mode every absolute path in it is `shown`."""
        if not self.public:
            return text

        def replace(match: re.Match) -> str:
            token = match.group(0)
            stripped = token.rstrip(".:")
            return self.shown(stripped, run) + token[len(stripped):]

        return ABSOLUTE_PATH.sub(replace, text)

    # -- runs ------------------------------------------------------------------------------------------

    def run_choices(self, location: str | None) -> dict[str, str]:
        """{label: value} of the run dropdown. An empty location: the runs given at launch. Local mode lists any
        other location (`runs.list_runs`); public mode accepts none."""
        location = label(location, "the run location").strip()
        if not location:
            runs = self.runs
        elif self.public:
            raise RequestRefused(f"this server serves only the runs it was started with; a run folder or Hub id ({location!r}) "
                                 "cannot be given here: pick a run from the list")
        else:
            runs = list_runs(location, self.paths)
        return {label: label for label in runs} if self.public else runs

    def run_for(self, value: str) -> str:
        """The LoRA (folder or Hub id) to load for the run dropdown's value: public mode maps a launch run's label."""
        value = label(value, "the run")
        if not self.public:
            return value
        if value not in self.runs:
            raise RequestRefused(f"{value!r} is not one of the runs this server was started with: pick a run from the list")
        return self.runs[value]

    # -- a run's files ---------------------------------------------------------------------------------

    def good_labels(self, run: RunInfo) -> dict[str, str]:
        """{label: path} of the run's good images, labelled relative to the class folder."""
        base = Path(run.data_dir or ".") / (run.object_class or "")
        def name_of(p: Path) -> str:
            return str(p.relative_to(base)) if run.object_class and p.is_relative_to(base) else p.name
        return unique_labels([(name_of(p), str(p)) for p in run.good_images])

    def mask_labels(self, run: RunInfo) -> dict[str, str]:
        """{label: path} of the run's held-out masks, labelled `<defect type>/<file>`."""
        return unique_labels([(f"{p.parent.name}/{p.name}", str(p)) for p in run.heldout_masks])

    def choices(self, labelled: dict[str, str]) -> list[tuple[str, str]]:
        """Dropdown choices: (label, path) in local mode, (label, label) in public mode, where no path reaches the page."""
        return [(label, label if self.public else path) for label, path in labelled.items()]

    def good_image(self, run: RunInfo | None, value: str | None) -> str | None:
        """The good image file a dropdown value names (public mode: one of the run's, by label)."""
        value = label(value, "the good image")
        if not self.public or not value:
            return value or None
        return self._pick(run, value, self.good_labels, "good images")

    def heldout_mask(self, run: RunInfo | None, value: str | None) -> str | None:
        """The held-out mask file a dropdown value names; empty: paint with the brush."""
        value = label(value, "the held-out mask")
        if not self.public or not value:
            return value or None
        return self._pick(run, value, self.mask_labels, "held-out masks")

    def _pick(self, run: RunInfo | None, value: str, labels, what: str) -> str:
        if run is None:
            raise RequestRefused("no run loaded: pick a run first")
        labelled = labels(run)
        if value not in labelled:
            raise RequestRefused(f"{value!r} is not one of this run's {what}: pick one from the list")
        return labelled[value]

    # -- the settings of a Generate --------------------------------------------------------------------

    def settings(self, **values) -> dict:
        """The numeric settings of a Generate, each checked against `GENERATE_SETTINGS` (public mode)."""
        return {name: GENERATE_SETTINGS[name].checked(value, self.public) for name, value in values.items()}

    # -- "Add to dataset" ------------------------------------------------------------------------------

    def dataset_label(self, session_hash: str | None, default: str) -> str:
        """The dataset folder box's text: the session's folder, relative to the dataset root (public mode), else
        `default`."""
        if not self.public:
            return default
        return session_folder_name(session_hash) if session_hash and self.datasets else ""

    def dataset_folder(self, requested: str | None, session_hash: str | None) -> str | Path:
        """The folder 'Add to dataset' writes. Local mode: the folder given, as given (the handler checks it).
        Public mode: this session's folder under the dataset root, whatever the client sent (which may only be
        that folder's name, or empty); the folder must resolve inside the root and hold no symbolic link."""
        requested = label(requested, "the dataset folder").strip()
        if not self.public:
            return requested
        if not self.datasets:
            raise RequestRefused("'Add to dataset' is off on this server")
        if not session_hash:
            raise RequestRefused("'Add to dataset' needs a browser session")
        name = session_folder_name(session_hash)
        if requested not in ("", name):
            raise RequestRefused(f"'Add to dataset' writes only to this session's folder ({name}) on this server; "
                                 f"a folder of your choice ({requested!r}) is not accepted")
        return session_folder(self.dataset_root, session_hash)

    # -- what Gradio enforces --------------------------------------------------------------------------

    def queue_options(self) -> dict:
        return {"max_size": self.limits.queue_size, "default_concurrency_limit": 1} if self.public else {}

    def launch_options(self) -> dict:
        return {"max_file_size": self.limits.max_file_size} if self.public else {}

    def blocks_options(self) -> dict:
        seconds = self.limits.cache_seconds
        return {"delete_cache": (seconds, seconds)} if self.public else {}

    @property
    def max_image_pixels(self) -> int | None:
        return self.limits.max_image_pixels if self.public else None
