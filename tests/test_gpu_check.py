"""bench/gpu_check.py, the script a lent GPU runs: its smoke mode runs every part on a CPU with the tiny model and
writes the JSON and markdown a GPU run writes (the SDXL part on SDXL's structure at width 32), so the check does not
rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_in_smoke_mode(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--smoke", "--output_dir", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and set(report["parts"]) == {"training step", "peak memory", "synthesis per kept image",
                                                        "sdxl training step"}
    assert not [part for part, figures in report["parts"].items() if "error" in figures], report["parts"]
    steps = report["parts"]["training step"]["medians_s"]
    assert {"baseline", "naive", "ours"} <= set(steps) and all(seconds > 0 for seconds in steps.values())
    fast = report["parts"]["synthesis per kept image"]["rows"]["tiny"]
    assert fast["passes_ratio"] >= 1  # the fast defaults never take more UNet passes than the paper's
    sdxl = report["parts"]["sdxl training step"]
    assert sdxl["shape"] == "sdxl_tiny" and all(row["step_s"] > 0 for row in sdxl["batches"].values())
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "### training step" in markdown and "### synthesis per kept image" in markdown
