#!/usr/bin/env python
"""DefectFill in the browser: pick a trained run, a good image and a mask (painted, or one of the run's
held-out masks), generate candidates, see their LPIPS-inside-the-mask scores, the chosen one, the
full-resolution result and what the [V*] token looks at, download it or add it to a dataset folder.

    python app_defectfill.py                                 # the bundled demo, offline, on a CPU
    python app_defectfill.py --lora runs/bottle-broken_large # an SD2 run (base model from its run file)
    python app_defectfill.py --lora you/defectfill-bottle-broken_large --share

A server others can reach (`--share`, a non-loopback `--server_name`, a Space, or `--public`) runs in public
mode: only the runs given with `--lora`, "add to dataset" only into a session's folder under `--output_dir`,
no server path on the page, caps on uploads, images, settings and the queue (`defectfill.app.policy`).
`--private` keeps local mode on a trusted network.

The generation is `defectfill.painting` (the same core as `infer_defectfill.py`); "add to dataset" fills a
synthesis folder in `infer_defectfill.py`'s layout (`defectfill.runs.folder`). The page and its handlers are
`defectfill.app`. With no `--lora` the app opens on the bundled demo run (`models/demo-lora-metal_nut-color`,
a LoRA trained by `configs/tiny.yaml` on the bundled tiny 64 px model): a toy that shows the workflow, not
SD2 quality.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

from defectfill.app.handlers import AppState  # noqa: E402
from defectfill.app.policy import GENERATE_SETTINGS, PUBLIC_DATASET_ROOT, AppPolicy, mode_errors, serving_mode  # noqa: E402
from defectfill.app.runs import AppPaths  # noqa: E402
from defectfill.app.settings import AppSettings  # noqa: E402
from defectfill.app.ui import build_app, launch  # noqa: E402
from defectfill.cli import check_minimums, parse_args_with_config, run_main, settings_from_args  # noqa: E402

logger = logging.getLogger("defectfill")

PATHS = AppPaths.of_repository(Path(__file__).resolve().parent)


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill browser app (Gradio): paint a mask, generate a defect, grow a dataset.")
    p.add_argument("--lora", nargs="+", default=None,
                   help="One or several training runs: the output folder of train_defectfill.py, a folder of runs "
                        "(--defect_type all: its defect types are listed), or a Hub repo id. In public mode these are the "
                        f"only runs served. Default: the bundled demo run ({PATHS.shown(PATHS.demo_run)}, tiny 64 px model).")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="Base inpainting model; default: the run's base_model.")
    p.add_argument("--data_dir", default=None, help="Dataset root for the good images and held-out masks (read in the layout "
                        "the run's split records); default: the run's.")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu.")
    p.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "fp16", "bf16"),
                   help="Inference dtype; auto: bf16 (or fp16 where bf16 is unsupported) on a GPU, fp32 on a CPU.")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg", "squeeze"), help="LPIPS backbone for Low-Fidelity Selection.")
    p.add_argument("--num_candidates", type=int, default=4, help="Default candidates per Generate (the paper: 8).")
    p.add_argument("--num_inference_steps", type=int, default=30, help="Default denoising steps (the paper: 50).")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="Default classifier-free guidance scale.")
    p.add_argument("--seed", type=int, default=0, help="Default seed.")
    p.add_argument("--output_dir", default=None,
                   help="Local mode: the default folder for 'add to dataset' (imagefolder layout of infer_defectfill.py; "
                        "default outputs/app-<object>-<defect>). Public mode: the dataset root, the only place 'add to "
                        f"dataset' writes, one folder per browser session (default {PUBLIC_DATASET_ROOT}).")
    p.add_argument("--server_name", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="Address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME as on a Space).")
    p.add_argument("--server_port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="Port (default 7860, or $GRADIO_SERVER_PORT).")
    p.add_argument("--share", action="store_true",
                   help="Also open a temporary public gradio.live link (needs network); turns public mode on.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--public", action="store_true",
                      help="Public mode whatever the address: only the --lora runs, 'add to dataset' only under --output_dir, "
                           "no server path shown, caps on uploads and settings. On by itself with --share, a non-loopback "
                           "--server_name, or on a Space (SPACE_ID).")
    mode.add_argument("--private", action="store_true",
                      help="Local mode even on a non-loopback address or a Space (a trusted network only): any folder or "
                           "Hub id may be opened and written. Not with --share.")
    p.add_argument("--public_datasets", action=argparse.BooleanOptionalAction, default=True,
                   help="Public mode: let visitors add results to their session's folder under --output_dir (default: on; "
                        "--no-public_datasets turns 'add to dataset' off).")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args)
    check_minimums(parser, args, {"num_candidates": 1, "num_inference_steps": 1})
    public, _ = serving_mode(args.public, args.private, args.share, args.server_name)
    errors = mode_errors(args.private, args.share, {name: getattr(args, name) for name in GENERATE_SETTINGS}, public)
    if errors:
        parser.error("; ".join(errors))
    return args


def main(args: argparse.Namespace):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    settings = settings_from_args(AppSettings, args)
    if settings.lora is None:
        logger.info("no --lora: opening the bundled demo run %s (tiny 64 px model, offline, CPU)", PATHS.shown(PATHS.demo_run))
    policy = AppPolicy.from_settings(settings, PATHS)  # a wrong --lora fails here, in the CLI's words, before a server starts
    logger.info("%s", policy.mode_note().replace("**", "").replace("`", ""))
    if policy.public:
        logger.info("runs served: %s; dataset root: %s", ", ".join(policy.runs),
                    policy.dataset_root if policy.datasets else "off (--no-public_datasets)")
    state = AppState.from_settings(settings, PATHS)
    logger.info("%s", state.selection_note.replace("**", ""))
    logger.info("device %s, dtype %s", state.device, str(state.dtype).replace("torch.", ""))
    logger.info("the pipeline (base model + LoRA) loads on the first Generate")
    app = build_app(state, policy=policy)
    # SIGTERM (a Space or a service stopping the app) exits as Ctrl+C does, so the app's temporary folders are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = settings.server
    launch(app, policy, server_name=server.server_name, server_port=server.server_port, share=server.share)
    return app


if __name__ == "__main__":
    run_main(main, parse_args)
