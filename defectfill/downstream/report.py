"""What the downstream comparison reports: mean and spread over seeds, the markdown table (with the peers'
published figures for context), the ROC / PR curves and a grid of anomaly maps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from defectfill.data.mvtec import GOOD
from defectfill.downstream.data import ImageSet
from defectfill.downstream.metrics import image_scores_from_maps, precision_recall_curve, roc_curve
from defectfill.fileio import save_image_atomic

RESULTS_FILENAME = "downstream_results.json"
TABLE_FILENAME = "downstream_table.md"
CURVES_FILENAME = "curves.png"
MAPS_FILENAME = "anomaly_maps.png"
MAP_IMAGES = 6  # test images in anomaly_maps.png
LOCALIZATION_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_au_pro")
COLUMNS = LOCALIZATION_KEYS + ("classification_accuracy",)
COLUMN_TITLES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "P-AUPRO", "Cls acc")

# MVTec AD averages over the 15 classes, in %, as the SeaS README reports them (image AUROC / AP / F1-max,
# pixel AUROC / AP / F1-max); each with its authors' own encoders, schedule and test-set epoch selection.
PEER_FIGURES = {
    "DFMGAN": {"image_auroc": 90.91, "image_ap": 94.75, "image_f1_max": 90.43,
               "pixel_auroc": 93.94, "pixel_ap": 61.50, "pixel_f1_max": 60.85},
    "AnomalyDiffusion": {"image_auroc": 93.95, "image_ap": 97.08, "image_f1_max": 94.24,
                         "pixel_auroc": 96.48, "pixel_ap": 68.06, "pixel_f1_max": 65.40},
    "SeaS": {"image_auroc": 96.72, "image_ap": 98.41, "image_f1_max": 95.97,
             "pixel_auroc": 97.72, "pixel_ap": 73.59, "pixel_f1_max": 69.86},
}
PEER_SOURCE = "SeaS README (MVTec AD, average of 15 classes)"




def summarize(values: list[float | None]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of the figures that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else 0.0,
            "n": len(present)}


def format_cell(summary: dict) -> str:
    if summary.get("mean") is None:
        return "n/a"
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def results_table(summary: dict[str, dict], peers: dict[str, dict] | None = None) -> str:
    """Markdown table: one row per training set (mean ± std over seeds, in %), then the peers' figures."""
    lines = ["| training set | " + " | ".join(COLUMN_TITLES) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join(format_cell(row[k]) for k in COLUMNS) + " |")
    for name, figures in (peers or {}).items():
        cells = [f"{figures[k]:.2f}" if k in figures else "–" for k in COLUMNS]
        lines.append(f"| {name} (reported) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SWEEP_KEYS = (("pixel_ap", "P-AP"), ("image_auroc", "I-AUROC"), ("classification_accuracy", "Cls acc"))


def sweep_table(sweep: dict[str, dict[float, str]], summary: dict[str, dict], real_count: int) -> str:
    """The size sweep as markdown: one row per share of generated images added to the real defects (the first
    row, none: real_only), its P-AP, I-AUROC and classification accuracy (mean ± std, %)."""
    [(generator, shares)] = sweep.items()
    lines = [f"Size sweep: the {real_count} real training defects plus images of {generator} (a fixed random subset per share):",
             "", "| training set | generated images added | " + " | ".join(t for _, t in SWEEP_KEYS) + " |",
             "|---" * (2 + len(SWEEP_KEYS)) + "|"]
    rows = ([("real_only", "0")] if "real_only" in summary else []) + [
        (name, f"{round(share * real_count)} ({share:g}x)") for share, name in sorted(shares.items())]
    for name, added in rows:
        lines.append(f"| {name} | {added} | " + " | ".join(format_cell(summary[name][k]) for k, _ in SWEEP_KEYS) + " |")
    return "\n".join(lines)


def figure_to_image(figure):
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def thin_curve(x: np.ndarray, y: np.ndarray, points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` evenly spaced points of a curve, its ends kept (pixel curves of a full MVTec class
    have millions of points; a plot needs a few thousand)."""
    if len(x) <= points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[keep], y[keep]


def plot_curves(maps_by_source: dict[str, torch.Tensor], test: ImageSet, path: Path) -> Path:
    """Image and pixel ROC and PR curves, one line per training set, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    image_labels = test.is_defective
    for name, maps in maps_by_source.items():
        image_scores = image_scores_from_maps(maps)
        for column, (scores, labels) in enumerate(((image_scores, image_labels), (maps, test.masks))):
            fpr, tpr, _ = roc_curve(scores, labels)
            precision, recall, _ = precision_recall_curve(scores, labels)
            axes[2 * column].plot(*thin_curve(fpr, tpr), label=name)
            axes[2 * column + 1].plot(*thin_curve(recall, precision), label=name)
    for axis, title, (x, y) in zip(axes, ("image ROC", "image PR", "pixel ROC", "pixel PR"),
                                   [("FPR", "TPR"), ("recall", "precision")] * 2):
        axis.set(title=title, xlabel=x, ylabel=y, xlim=(0, 1), ylim=(0, 1.02))
    axes[0].legend(loc="lower right", fontsize=8)
    image = figure_to_image(figure)
    plt.close(figure)
    return save_image_atomic(image, path)


def map_grid(maps_by_source: dict[str, torch.Tensor], test: ImageSet, count: int, path: Path) -> Path:
    """A PNG grid: one row per chosen test image (defects of each type first, then a good one):
    the image, its mask, then each training set's anomaly map (grey, 0 black to 1 white)."""
    from PIL import Image, ImageDraw

    chosen: list[int] = []
    by_type: dict[str, list[int]] = {}
    for index, defect in enumerate(test.defect_types):
        by_type.setdefault(defect, []).append(index)
    goods = by_type.pop(GOOD, [])
    queues = [list(v) for _, v in sorted(by_type.items())]
    while len(chosen) < max(count - 1, 1) and any(queues):
        for queue in queues:
            if queue and len(chosen) < max(count - 1, 1):
                chosen.append(queue.pop(0))
    chosen += goods[: max(count - len(chosen), 0)]
    side = test.images.shape[-1]
    titles = ["image", "mask", *maps_by_source]
    header = 14
    grid = Image.new("RGB", (side * len(titles), header + side * len(chosen)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((column * side + 2, 1), title[: side // 6], fill="black")
    for row, index in enumerate(chosen):
        panels = [Image.fromarray(test.images[index].permute(1, 2, 0).numpy()),
                  Image.fromarray(test.masks[index].numpy().astype(np.uint8) * 255).convert("RGB")]
        panels += [Image.fromarray((maps[index].clamp(0, 1).numpy() * 255).astype(np.uint8)).convert("RGB")
                   for maps in maps_by_source.values()]
        for column, panel in enumerate(panels):
            grid.paste(panel, (column * side, header + row * side))
    return save_image_atomic(grid, path)
