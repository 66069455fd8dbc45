"""The repository's demos, run as a user runs them, and what they measure written into the docs.

    python scripts/refresh_docs.py                      # every part below (about half an hour on 2 CPU cores)
    python scripts/refresh_docs.py --only demo build    # some of them

Parts, each the commands the README (or docs/downstream.md) prints, from the repository root, in subprocesses:

- `demo`: the tiny training run and its synthesis (`configs/tiny.yaml`, `configs/tiny_infer.yaml`): the preview
  (docs/tiny_demo_preview.png), the time each command took (README block `tiny-demo`), and the run bundled as
  `models/demo-lora-metal_nut-color` (what the app opens on and the tests measure);
- `build`: the class dataset (`--defect_type all` training, `configs/tiny_build.yaml`): the preview
  (docs/tiny_build_preview.png), the build's summary and timings (docs/builder.md block `build-demo`);
- `downstream`: the class dataset of `build` (run first, unless it ran in the same call) checked by
  `configs/tiny_downstream.yaml`: its table and the three commands' times (docs/downstream.md block
  `downstream-demo`);
- `model`, `generalisation`: `scripts/measure_tiny_model.py --update_readme --prompt_following` and
  `scripts/check_generalisation.py --update_readme --train_seeds 2 --downstream_seeds 3`, which write their own
  blocks (the model README's tables, the summary sentence of docs/demo.md);
- `app`: the app started on the bundled demo run and the README's screenshot retaken (docs/app_screenshot.png);
  needs chromium.

A change of a config is then this one command and one commit: every figure quoted in the docs is in a block that
one of these parts writes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from defectfill.runs.files import LORA_FILENAME, PREVIEW_FILENAME, SPLIT_FILENAME, SUMMARY_FILENAME
from defectfill.runs.records import RunRecord
from defectfill.training.outputs import save_model_card

from .docs import write_block
from .paths import CONFIGS, DEMO_RUN, DOCS, README, REPO_ROOT

PARTS = ("demo", "build", "downstream", "model", "generalisation", "app")
DOWNSTREAM_DOC = DOCS / "downstream.md"


def machine() -> str:
    """This machine in a few words (CPU model, cores), and the torch version."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_timed(*command: str) -> float:
    """Run `python <command>` from the repository root as a user does; its wall time in seconds. A failure
    raises with the tail of its output."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - started


def config_value(config: str, key: str):
    return yaml.safe_load((CONFIGS / config).read_text())[key]


def fresh(folder: str | Path) -> Path:
    """A demo's output folder, emptied first, so the demo runs as it does on a fresh clone."""
    path = REPO_ROOT / folder
    shutil.rmtree(path, ignore_errors=True)
    return path


def stamp() -> str:
    return f"{datetime.date.today().isoformat()}, {machine()}"


DEMO_FOLDER_NOTE = """
## This folder

The app's embedded default (`python app_defectfill.py` with no `--lora` opens on it, offline, on a CPU) and the run
`tests/test_pretrained_tiny_model.py` measures. It is what `python train_defectfill.py --config configs/tiny.yaml`
writes to `outputs/tiny-metal_nut-color`, kept to its LoRA, run file, split and model card by
`python scripts/refresh_docs.py --only demo`; its `base_model` and `data_dir` are relative to the repository root,
and the app resolves them from there whatever the working directory. A toy: the tiny model is 64 px and was
pre-trained on procedural images, so the stain it paints is only roughly the real one's hue.
"""


def bundle_demo_run(run_dir: Path, target: Path = DEMO_RUN) -> Path:
    """The demo's run as the repository ships it (the app opens on it, the tests measure it): its LoRA, split and
    record, the record's paths and the model card's relative to the repository."""
    record = RunRecord.read(run_dir)
    record.base_model = os.path.relpath(record.base_model, REPO_ROOT)
    record.data_dir = os.path.relpath(record.data_dir, REPO_ROOT) if record.data_dir else None
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (LORA_FILENAME, SPLIT_FILENAME):
        shutil.copyfile(run_dir / name, staging / name)
    record.write(staging)
    save_model_card(staging, record, os.path.relpath(target, REPO_ROOT))
    with open(staging / "README.md", "a") as card:
        card.write(DEMO_FOLDER_NOTE)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def demo() -> dict:
    """The README's first demo: train, then synthesize; preview and timings; the bundled demo run retrained."""
    run_dir = fresh(config_value("tiny.yaml", "output_dir"))
    synthetic = fresh(config_value("tiny_infer.yaml", "output_dir"))
    train = run_timed("train_defectfill.py", "--config", "configs/tiny.yaml")
    infer = run_timed("infer_defectfill.py", "--config", "configs/tiny_infer.yaml")
    bundle_demo_run(run_dir)
    shutil.copyfile(synthetic / PREVIEW_FILENAME, DOCS / "tiny_demo_preview.png")
    write_block(README, "tiny-demo", f"Measured by `python scripts/refresh_docs.py --only demo` ({stamp()}): the training "
                                     f"command took {train:.0f} s and the synthesis {infer:.0f} s, each from a cold start.")
    return {"train_seconds": train, "infer_seconds": infer}


def build() -> dict:
    """The class dataset of the README: both runs, the build, its summary and preview."""
    runs = "outputs/tiny-metal_nut"
    fresh(runs)
    output = fresh(config_value("tiny_build.yaml", "output_dir"))
    fresh(f"{output.relative_to(REPO_ROOT)}-mvtec")
    train = run_timed("train_defectfill.py", "--config", "configs/tiny.yaml", "--defect_type", "all", "--output_dir", runs)
    seconds = run_timed("build_dataset_defectfill.py", "--config", "configs/tiny_build.yaml")
    summary = json.loads((output / SUMMARY_FILENAME).read_text())
    shutil.copyfile(output / PREVIEW_FILENAME, DOCS / "tiny_build_preview.png")
    labels = ", ".join(f"{count} `{label}`" for label, count in summary["images_per_label"].items())
    by_reason: dict[str, int] = {}
    for reason, count in summary["masks_rejected_by_reason"].items():  # "<defect type>/<reason>"
        by_reason[reason.split("/")[-1]] = by_reason.get(reason.split("/")[-1], 0) + count
    reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(by_reason.items()))
    write_block(DOCS / "builder.md", "build-demo", (
        f"Measured by `python scripts/refresh_docs.py --only build` ({stamp()}): {summary['images']} images ({labels}), "
        f"{summary['masks_augmented']} augmented masks kept and {summary['masks_rejected']} rejected ({reasons or 'none'}); "
        f"the `--defect_type all` training took {train:.0f} s, the build {seconds:.0f} s "
        f"({summary['generation_seconds_per_kept_image']:.2f} s of generation per kept image by its own clock)."))
    return {"train_seconds": train, "build_seconds": seconds, "summary": summary}


def downstream(build_done: dict | None = None) -> dict:
    """The downstream demo, the README's three commands: both defect types trained, the class dataset built (the
    `build` part, unless it ran in the same call), then `configs/tiny_downstream.yaml` on it; the table and the
    time each command took into docs/downstream.md."""
    build_done = build_done or build()
    output = fresh(config_value("tiny_downstream.yaml", "output_dir"))
    seconds = run_timed("downstream_defectfill.py", "--config", "configs/tiny_downstream.yaml")
    table = (output / "downstream_table.md").read_text().split("\nPeers on MVTec AD")[0].strip()
    results = json.loads((output / "downstream_results.json").read_text())
    total = build_done["train_seconds"] + build_done["build_seconds"] + seconds
    write_block(DOWNSTREAM_DOC, "downstream-demo", (
        f"Measured by `python scripts/refresh_docs.py --only downstream` ({stamp()}): the three commands took {total:.0f} s "
        f"(training {build_done['train_seconds']:.0f} s, build {build_done['build_seconds']:.0f} s, downstream "
        f"{seconds:.0f} s, {results['seconds']:.0f} s of it by its own clock), each from a cold start. What the last one "
        f"printed (the part above the peers' figures):\n\n{table}"))
    write_block(DOCS / "demo.md", "downstream-demo-time", (
        f"Measured by `python scripts/refresh_docs.py --only downstream` ({stamp()}): the three commands took {total:.0f} s "
        f"({build_done['train_seconds']:.0f} s, {build_done['build_seconds']:.0f} s and {seconds:.0f} s)."))
    return {"seconds": seconds, "total_seconds": total}


def model() -> dict:
    seconds = run_timed("scripts/measure_tiny_model.py", "--update_readme", "--prompt_following")
    return {"seconds": seconds}


def generalisation() -> dict:
    seconds = run_timed("scripts/check_generalisation.py", "--update_readme", "--train_seeds", "2", "--downstream_seeds", "3")
    return {"seconds": seconds}


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def app() -> dict:
    """The app on the bundled demo run, and the README's screenshot retaken through it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "app_defectfill.py", "--server_port", str(port)], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):  # start-up imports torch and gradio
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        seconds = run_timed("scripts/app_screenshot.py", "--url", url, "--output", str(DOCS / "app_screenshot.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"seconds": seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="The parts to run, in this order.")
    args = parser.parse_args(argv)
    done = {}
    for part in PARTS:
        if part in args.only:
            print(f"{part} ...", flush=True)
            done[part] = downstream(done.get("build")) if part == "downstream" else globals()[part]()
            print(f"{part}: {json.dumps(done[part], default=str)[:300]}", flush=True)
    return done
