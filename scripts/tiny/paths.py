"""The bundled files of the repository the tiny tooling reads and writes. This folder is scripts/tiny/ of a
clone (never installed), so the repository is two folders above it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO_ROOT / "models" / "tiny-sd2-inpainting"
DEMO_RUN = REPO_ROOT / "models" / "demo-lora-metal_nut-color"
SYNTHETIC_DATA = REPO_ROOT / "data" / "synthetic_mvtec"
CONFIGS = REPO_ROOT / "configs"
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
