#!/usr/bin/env python
"""Does the synthetic data make a better inspection model? Train a defect localizer and a defect-type
classifier on synthetic defects, test them on the real held-out defects, next to baselines trained the
same way (issue #14).

    python downstream_defectfill.py --data_dir /data/mvtec_ad --object_class bottle \
        --synthetic defectfill=synthetic/bottle-broken_large,synthetic/bottle-contamination \
        --encoder_weights imagenet

The protocol is the one AnomalyDiffusion, DualAnoDiff and SeaS report (AnomalyDiffusion's
train-localization.py / test-localization.py / train-classification.py), with these differences:

- Split: the saved few-shot split (``few_shot_split.json`` of the runs, also in each synthesis folder's
  ``synthesis.json``): per defect type the first third trains the generator; the other two thirds plus
  every ``test/good`` image are the test set. No new split is ever made.
- Localizer: one per object class, a segmentation-models-pytorch U-Net (ResNet encoder, one output
  channel, sigmoid; AnomalyDiffusion uses DRAEM's U-Net with a two-channel softmax, the same decision
  function) trained with focal loss (gamma 2), Adam 1e-4, the learning rate x0.2 at 80 % and 90 % of the
  epochs, on samples that are half ``train/good`` images with empty masks and half defect images with
  their masks. Image score: max of the 21x21 average-pooled map.
- Classifier: a torchvision ResNet-34 trained on the defect images of every defect type of the class
  (cross-entropy, Adam 1e-4), accuracy on the real held-out defects.
- No test-set model selection (AnomalyDiffusion keeps the epoch that scores best on the test set): the
  last epoch is reported, or, with ``--validation_fraction``, early stopping on a validation set carved
  out of the training data (never the real test images).
- Several seeds in one command (mean and spread), and baselines with the same protocol and seeds:
  ``untrained`` (the random-init model, a floor), ``real_only`` (the few real training defects, augmented)
  and ``copy_paste`` (real training defects cut out with their masks and pasted onto good images at the
  mask positions of the first synthetic set).

Writes to ``--output_dir``: ``downstream_results.json``, ``downstream_table.md``, ``curves.png`` (image and
pixel ROC / PR curves, first seed) and ``anomaly_maps.png`` (test images, their masks and each model's map).
"""

from __future__ import annotations

import argparse
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dataset_mvtec as dm
import downstream_data as dd
import downstream_metrics as metrics
from cli_config import parse_args_with_config
from fileio import save_image_atomic, write_json_atomic, write_text_atomic
from run_files import METADATA_FILENAME, SPLIT_FILENAME, RunFileError, SynthesisRecord, read_metadata

RESULTS_FILENAME = "downstream_results.json"
TABLE_FILENAME = "downstream_table.md"
CURVES_FILENAME = "curves.png"
MAPS_FILENAME = "anomaly_maps.png"
BASELINES = ("untrained", "real_only", "copy_paste")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
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


class DownstreamError(ValueError):
    """Bad input to the downstream evaluation; the message names the flag, folder or file."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--synthetic", action="append", default=None, metavar="[NAME=]DIR[,DIR...]",
                      help="A synthetic training set: one or more synthesis folders (imagefolder with metadata.jsonl, as "
                           "infer_defectfill.py writes them; e.g. one per defect type), named NAME in the table (default: "
                           "the first folder's name). Repeat for each set to compare (ours, another run, another generator).")
    data.add_argument("--data_dir", default=None, help="MVTec AD root (real good images and held-out defects). Default: "
                                                        "the data_dir in the synthesis folders' synthesis.json.")
    data.add_argument("--object_class", default=None, help="The category, e.g. bottle. Default: the synthesis folders'.")
    data.add_argument("--split_file", action="append", default=None,
                      help="A saved few_shot_split.json, or a training run folder holding one; repeat for several runs. "
                           "Added to the splits in the synthesis folders' synthesis.json; the test set is the held-out "
                           "images of every defect type they hold.")
    data.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                      help="Baselines trained and tested with the same protocol and seeds.")
    data.add_argument("--copy_paste_count", type=int, default=None,
                      help="Images in the copy-paste set. Default: as many as the first synthetic set (10 per real training "
                           "defect without one).")
    model = p.add_argument_group("models")
    model.add_argument("--resolution", type=int, default=256, help="Square side every image is resized to (protocol: 256).")
    model.add_argument("--encoder", default="resnet34", help="segmentation-models-pytorch encoder of the U-Net localizer.")
    model.add_argument("--encoder_depth", type=int, default=5, help="Encoder stages of the U-Net (smp encoder_depth).")
    model.add_argument("--decoder_channels", type=int, nargs="+", default=[256, 128, 64, 32, 16],
                       help="U-Net decoder channels, one per encoder stage (smp decoder_channels).")
    model.add_argument("--encoder_weights", default="none", choices=("none", "imagenet"),
                       help="'imagenet': ImageNet-pretrained encoders for both models (downloads them; the peers pretrain). "
                            "'none': random init, works offline; say so next to any figure.")
    model.add_argument("--classifier", default="resnet34", choices=("resnet18", "resnet34", "resnet50"),
                       help="torchvision classifier of the defect type (protocol: resnet34).")
    train = p.add_argument_group("training")
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="One model per seed; mean and spread reported.")
    train.add_argument("--epochs", type=int, default=200, help="Localizer epochs (AnomalyDiffusion: 200).")
    train.add_argument("--samples_per_epoch", type=int, default=500,
                       help="Localizer samples per epoch, half good and half defect (AnomalyDiffusion: 500).")
    train.add_argument("--batch_size", type=int, default=8, help="Batch size of both models (AnomalyDiffusion: 8).")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate of both models.")
    train.add_argument("--classifier_epochs", type=int, default=30, help="Classifier epochs (AnomalyDiffusion: 30).")
    train.add_argument("--classifier_repeats", type=int, default=5,
                       help="Classifier epoch length in passes over its training set (AnomalyDiffusion: 5).")
    train.add_argument("--validation_fraction", type=float, default=0.0,
                       help="If > 0: this share of each training set (defects and good images) is held back, and the "
                            "localizer epoch with the best validation pixel AP is kept (early stopping). Default 0: the "
                            "last epoch of the fixed schedule. The real test images are never used to choose.")
    train.add_argument("--patience", type=int, default=20, help="Early stopping: epochs without a better validation AP.")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="downstream-results", help="Where the JSON, table and figures go.")
    out.add_argument("--num_map_images", type=int, default=6, help="Test images in anomaly_maps.png.")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Progress bars while training.")
    return p


def parse_args(input_args=None) -> argparse.Namespace:
    args = parse_args_with_config(build_parser(), input_args)
    if args.resolution % 2 ** args.encoder_depth:
        raise SystemExit(f"error: --resolution {args.resolution} must be a multiple of 2**--encoder_depth = {2 ** args.encoder_depth}")
    if len(args.decoder_channels) != args.encoder_depth:
        raise SystemExit(f"error: --decoder_channels needs {args.encoder_depth} values (one per --encoder_depth stage)")
    if not 0 <= args.validation_fraction < 1:
        raise SystemExit(f"error: --validation_fraction must be in [0, 1), got {args.validation_fraction}")
    return args


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class SyntheticSource:
    name: str
    folders: list[Path]
    records: list[SynthesisRecord | None]


def parse_synthetic_entry(entry: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` or ``DIR[,DIR...]`` -> (name, folders); the name defaults to the first folder's."""
    name, _, folders = entry.rpartition("=") if "=" in entry else ("", "", entry)
    paths = [Path(f) for f in folders.split(",") if f]
    if not paths:
        raise DownstreamError(f"--synthetic {entry!r} names no folder")
    return name or paths[0].name, paths


def read_synthetic_sources(entries: list[str] | None) -> list[SyntheticSource]:
    sources = []
    for entry in entries or []:
        name, folders = parse_synthetic_entry(entry)
        for folder in folders:
            if not (folder / METADATA_FILENAME).is_file():
                raise DownstreamError(f"--synthetic {folder} has no {METADATA_FILENAME}: expected an output folder of infer_defectfill.py")
        try:
            records = [SynthesisRecord.read(folder) for folder in folders]
        except RunFileError as error:
            raise DownstreamError(str(error)) from error
        if name in BASELINES or name in {s.name for s in sources}:
            raise DownstreamError(f"--synthetic name {name!r} is taken; give NAME=DIR")
        sources.append(SyntheticSource(name, folders, records))
    return sources


def agreed_value(flag: str, given, sources: list[SyntheticSource], field_name: str):
    """The flag's value, else the one value the synthesis records agree on."""
    if given is not None:
        return given
    found = {getattr(r, field_name) for s in sources for r in s.records if r is not None and getattr(r, field_name)}
    if len(found) > 1:
        raise DownstreamError(f"the synthesis folders disagree on {field_name} ({', '.join(map(str, sorted(found)))}): give {flag}")
    if not found:
        raise DownstreamError(f"give {flag} (no synthesis.json names it)")
    return found.pop()


def collect_split(split_files: list[str] | None, sources: list[SyntheticSource]) -> dict:
    """The merged saved split: --split_file files (or run folders) and the synthesis records' splits."""
    splits = []
    for given in split_files or []:
        path = Path(given)
        path = path / SPLIT_FILENAME if path.is_dir() else path
        splits.append((str(path), dm.load_split(path)))
    for source in sources:
        for folder, record in zip(source.folders, source.records):
            if record is not None and record.split:
                splits.append((str(folder), record.split))
    if not splits:
        raise DownstreamError("no few-shot split: give --split_file (the run's few_shot_split.json or the run folder); "
                              "the protocol tests on the held-out part of the split the generator was trained with")
    return dd.merge_splits(splits)


def load_synthetic_set(source: SyntheticSource, object_class: str, resolution: int) -> dd.ImageSet:
    sets = []
    for folder in source.folders:
        rows = dm.load_synthetic(folder)
        # Rows without an object class (another generator's folder) count as this class.
        rows = rows.filter(lambda value: value in ("", object_class), input_columns="object_class")
        if len(rows) == 0:
            raise DownstreamError(f"--synthetic {folder} has no image of object class {object_class!r}")
        part = dd.dataset_to_set(rows, resolution)
        part.names = [f"{folder.name}/{n}" for n in part.names]
        sets.append(part)
    return dd.concat_sets(sets)


def count_test_set_reuse(source: SyntheticSource, split: dict) -> dict[str, int]:
    """How many rows of a synthetic set were made from the test set: ``masks``, painted in a held-out test
    mask of the split (infer_defectfill.py's default: the localizer then trains on the test defects' shapes
    and positions); ``images``, painted on a ``test/good`` image (``--good_split test|all``: the test's
    defect-free images were seen in training). ``rows``: all rows."""
    heldout = {(Path(p).parent.name, Path(p).stem) for e in split["defect_types"].values() for p in e["heldout"]}
    counts = {"masks": 0, "images": 0, "rows": 0}
    for folder in source.folders:
        for row in read_metadata(folder, require_files=False).values():
            counts["rows"] += 1
            mask, image = row.get("source_mask"), row.get("source_image")
            if mask and (Path(mask).parent.name, Path(mask).stem.removesuffix("_mask")) in heldout:
                counts["masks"] += 1
            if image and Path(image).parts[-3:-1] == ("test", dm.GOOD):
                counts["images"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def build_localizer(args, seed: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    weights = None if args.encoder_weights == "none" else args.encoder_weights
    try:
        return smp.Unet(encoder_name=args.encoder, encoder_weights=weights, encoder_depth=args.encoder_depth,
                        decoder_channels=list(args.decoder_channels), in_channels=3, classes=1)
    except (KeyError, ValueError) as error:
        raise DownstreamError(f"--encoder {args.encoder}: {error}") from error
    except OSError as error:
        raise DownstreamError(f"--encoder_weights {args.encoder_weights}: the weights could not be downloaded ({error}); "
                              "offline, use --encoder_weights none") from error


def build_classifier(args, num_classes: int, seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    weights = "IMAGENET1K_V1" if args.encoder_weights == "imagenet" else None
    try:
        model = getattr(torchvision.models, args.classifier)(weights=weights)
    except OSError as error:
        raise DownstreamError(f"--encoder_weights imagenet: the {args.classifier} weights could not be downloaded "
                              f"({error}); offline, use --encoder_weights none") from error
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def normalize(images_uint8_or_float: torch.Tensor, device) -> torch.Tensor:
    """uint8 (or [0, 1] float) images to ImageNet-normalized float on `device`."""
    images = images_uint8_or_float.to(device)
    if images.dtype == torch.uint8:
        images = images.float() / 255
    return (images - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)


def step_schedule(optimizer, epochs: int):
    """AnomalyDiffusion's schedule: the learning rate x0.2 at 80 % and x0.2 again at 90 % of the epochs."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(epochs * 0.8), int(epochs * 0.9)], gamma=0.2)


@torch.no_grad()
def predict_maps(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Anomaly maps (N, H, W) in [0, 1] of uint8 images (N, 3, H, W)."""
    model.eval()
    maps = [torch.sigmoid(model(normalize(images[i:i + batch_size], device)))[:, 0].float().cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(maps)


def split_validation(data: dd.ImageSet, fraction: float, seed: int) -> tuple[dd.ImageSet, dd.ImageSet | None]:
    """(training part, validation part) of a set; no validation part for fraction 0."""
    if fraction <= 0:
        return data, None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(len(data) * fraction))
    if count >= len(data):
        raise DownstreamError(f"--validation_fraction {fraction} leaves no training image of a set of {len(data)}")
    return data.select(sorted(order[count:])), data.select(sorted(order[:count]))


def localizer_batch(defects: dd.ImageSet, goods: dd.ImageSet, size: int, augment: bool, generator: torch.Generator):
    """A batch of `size` samples, each a good image (empty mask) or a defect image with probability 1/2:
    float images in [0, 1] (B, 3, R, R) and float masks (B, R, R)."""
    is_defect = torch.rand(size, generator=generator) < 0.5
    good_index = torch.randint(len(goods), (size,), generator=generator)
    defect_index = torch.randint(len(defects), (size,), generator=generator)
    images = torch.where(is_defect[:, None, None, None], defects.images[defect_index], goods.images[good_index]).float() / 255
    masks = torch.where(is_defect[:, None, None], defects.masks[defect_index], goods.masks[good_index]).float()
    if augment:
        images, masks = dd.augment_batch(images, masks, generator)
    return images, masks


def train_localizer(args, defects: dd.ImageSet, goods: dd.ImageSet, seed: int, device, augment: bool, label: str):
    """A U-Net trained on `defects` and `goods`; returns (model, history). With a validation part carved out
    (--validation_fraction), the epoch with the best validation pixel AP is restored."""
    import segmentation_models_pytorch as smp
    from tqdm.auto import tqdm

    train_defects, val_defects = split_validation(defects, args.validation_fraction, seed)
    train_goods, val_goods = split_validation(goods, args.validation_fraction, seed + 1)
    model = build_localizer(args, seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    scheduler = step_schedule(optimizer, args.epochs)
    focal = smp.losses.FocalLoss(mode="binary", gamma=2.0)
    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(args.samples_per_epoch / args.batch_size)
    history = {"loss": [], "validation_pixel_ap": [], "epoch_kept": args.epochs}
    best = (-1.0, None)
    bar = tqdm(range(args.epochs), desc=f"localizer {label}", disable=not args.progress, leave=False)
    for epoch in bar:
        model.train()
        total = 0.0
        for step in range(steps):
            size = min(args.batch_size, args.samples_per_epoch - step * args.batch_size)
            images, masks = localizer_batch(train_defects, train_goods, size, augment, generator)
            loss = focal(model(normalize(images, device)), masks[:, None].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * size
        scheduler.step()
        history["loss"].append(total / args.samples_per_epoch)
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
        if val_defects is not None:
            val = dd.concat_sets([val_defects, val_goods])
            ap = metrics.average_precision(predict_maps(model, val.images, args.batch_size, device), val.masks)
            history["validation_pixel_ap"].append(ap)
            if ap > best[0]:
                best = (ap, {k: v.detach().clone() for k, v in model.state_dict().items()})
                history["epoch_kept"] = epoch + 1
            elif epoch + 1 - history["epoch_kept"] >= args.patience:
                break
    if best[1] is not None:
        model.load_state_dict(best[1])
    return model, history


def train_classifier(args, defects: dd.ImageSet, classes: list[str], seed: int, device, augment: bool, label: str):
    """A ResNet trained to tell the defect types `classes` apart on `defects`."""
    from tqdm.auto import tqdm

    keep = [i for i, d in enumerate(defects.defect_types) if d in classes]
    data = defects.select(keep)
    labels = torch.tensor([classes.index(d) for d in data.defect_types])
    model = build_classifier(args, len(classes), seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    scheduler = step_schedule(optimizer, args.classifier_epochs)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(args.classifier_epochs), desc=f"classifier {label}", disable=not args.progress, leave=False):
        model.train()
        order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(args.classifier_repeats)])
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            images = data.images[index].float() / 255
            if augment:
                images, _ = dd.augment_batch(images, data.masks[index], generator)
            loss = F.cross_entropy(model(normalize(images, device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model


@torch.no_grad()
def classification_accuracy(model, test: dd.ImageSet, classes: list[str], batch_size: int, device) -> float:
    """Share of the test defects whose type is predicted right (a type the model lacks counts as wrong)."""
    model.eval()
    predictions = torch.cat([model(normalize(test.images[i:i + batch_size], device)).argmax(1).cpu()
                             for i in range(0, len(test), batch_size)])
    truth = torch.tensor([classes.index(d) if d in classes else -1 for d in test.defect_types])
    return float((predictions == truth).float().mean())


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


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


def plot_curves(maps_by_source: dict[str, torch.Tensor], test: dd.ImageSet, path: Path) -> Path:
    """Image and pixel ROC and PR curves, one line per training set, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    image_labels = test.is_defective
    for name, maps in maps_by_source.items():
        image_scores = metrics.image_scores_from_maps(maps)
        for column, (scores, labels) in enumerate(((image_scores, image_labels), (maps, test.masks))):
            fpr, tpr, _ = metrics.roc_curve(scores, labels)
            precision, recall, _ = metrics.precision_recall_curve(scores, labels)
            axes[2 * column].plot(*thin_curve(fpr, tpr), label=name)
            axes[2 * column + 1].plot(*thin_curve(recall, precision), label=name)
    for axis, title, (x, y) in zip(axes, ("image ROC", "image PR", "pixel ROC", "pixel PR"),
                                   [("FPR", "TPR"), ("recall", "precision")] * 2):
        axis.set(title=title, xlabel=x, ylabel=y, xlim=(0, 1), ylim=(0, 1.02))
    axes[0].legend(loc="lower right", fontsize=8)
    image = figure_to_image(figure)
    plt.close(figure)
    return save_image_atomic(image, path)


def map_grid(maps_by_source: dict[str, torch.Tensor], test: dd.ImageSet, count: int, path: Path) -> Path:
    """A PNG grid: one row per chosen test image (defects of each type first, then a good one):
    the image, its mask, then each training set's anomaly map (grey, 0 black to 1 white)."""
    from PIL import Image, ImageDraw

    chosen: list[int] = []
    by_type: dict[str, list[int]] = {}
    for index, defect in enumerate(test.defect_types):
        by_type.setdefault(defect, []).append(index)
    goods = by_type.pop(dm.GOOD, [])
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


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def main(args) -> dict:
    import datasets
    from accelerate import Accelerator

    started = time.perf_counter()
    datasets.disable_progress_bars()  # the loaders' filter bars; training has its own
    device = Accelerator().device
    sources = read_synthetic_sources(args.synthetic)
    build_localizer(args, args.seeds[0])  # a wrong --encoder or unreachable weights fail before any work
    if args.encoder_weights == "imagenet":
        build_classifier(args, 2, args.seeds[0])
    data_dir = agreed_value("--data_dir", args.data_dir, sources, "data_dir")
    object_class = agreed_value("--object_class", args.object_class, sources, "object_class")
    split = collect_split(args.split_file, sources)
    classes = sorted(split["defect_types"])
    output_dir = Path(args.output_dir)

    test = dd.real_test_set(data_dir, object_class, split, args.resolution)
    real_train = dd.real_defects(data_dir, object_class, split, "train", args.resolution)
    goods = dd.train_good_set(data_dir, object_class, args.resolution)
    heldout_defects = test.select([i for i, d in enumerate(test.defect_types) if d != dm.GOOD])
    synthetic_sets = {s.name: load_synthetic_set(s, object_class, args.resolution) for s in sources}

    training_sets: dict[str, tuple[dd.ImageSet | None, bool]] = {}
    if "untrained" in args.baselines:
        training_sets["untrained"] = (None, False)
    if "real_only" in args.baselines:
        training_sets["real_only"] = (real_train, True)
    if "copy_paste" in args.baselines:
        targets = next(iter(synthetic_sets.values()), None)
        count = args.copy_paste_count or (len(targets) if targets is not None else 10 * len(real_train))
        training_sets["copy_paste"] = (dd.copy_paste_set(real_train, goods, targets, count, seed=0), False)
    for name, data in synthetic_sets.items():
        training_sets[name] = (data, False)

    notes = [f"encoders: {'ImageNet-pretrained' if args.encoder_weights == 'imagenet' else 'random init (offline; the peers pretrain on ImageNet)'}"]
    for source in sources:
        reuse = count_test_set_reuse(source, split)
        if reuse["masks"]:
            notes.append(f"{source.name}: {reuse['masks']} of {reuse['rows']} images were painted in held-out test masks "
                         "(infer_defectfill.py's default): the localizer sees the test defects' shapes and positions, "
                         "so its figures are optimistic; copy-paste pastes at the same positions")
        if reuse["images"]:
            notes.append(f"{source.name}: {reuse['images']} of {reuse['rows']} images were painted on test/good images "
                         "(--good_split test or all): the test's defect-free images were seen in training")
    if len(classes) < 2:
        notes.append(f"classification: n/a, the split holds one defect type ({', '.join(classes)}); it needs two or more")
    if args.validation_fraction > 0:
        notes.append(f"early stopping on {args.validation_fraction:.0%} of each training set (validation pixel AP)")
    else:
        notes.append(f"fixed schedule, last epoch reported ({args.epochs} localizer / {args.classifier_epochs} classifier epochs)")

    per_seed: dict[str, list[dict]] = {name: [] for name in training_sets}
    first_maps: dict[str, torch.Tensor] = {}
    for seed in args.seeds:
        for name, (data, augment) in training_sets.items():
            label = f"{name} seed {seed}"
            if data is None:
                model, history = build_localizer(args, seed).to(device), {"loss": [], "epoch_kept": 0}
            else:
                model, history = train_localizer(args, data, goods, seed, device, augment, label)
            maps = predict_maps(model, test.images, args.batch_size, device)
            figures = metrics.localization_metrics(maps, test.masks)
            figures["classification_accuracy"] = None
            if data is not None and len(classes) >= 2:
                classifier = train_classifier(args, data, classes, seed, device, augment, label)
                figures["classification_accuracy"] = classification_accuracy(classifier, heldout_defects, classes,
                                                                             args.batch_size, device)
            per_seed[name].append({"seed": seed, **figures, "epoch_kept": history["epoch_kept"],
                                   "final_loss": history["loss"][-1] if history["loss"] else None})
            if seed == args.seeds[0]:
                first_maps[name] = maps

    summary = {name: {k: summarize([r[k] for r in rows]) for k in COLUMNS} for name, rows in per_seed.items()}
    table = results_table(summary)
    peer_table = results_table({}, PEER_FIGURES)
    seconds = time.perf_counter() - started
    header = (f"Downstream evaluation, {object_class}: mean ± std over seeds {', '.join(map(str, args.seeds))}, in %; "
              f"test: {int(test.is_defective.sum())} held-out real defects ({', '.join(classes)}) + "
              f"{int((~test.is_defective).sum())} test/good images at {args.resolution} px; {args.encoder} U-Net, "
              f"{args.classifier} classifier, device {device}.")
    text = "\n".join([header, "", table, "", *[f"- {n}" for n in notes], "",
                      f"Peers on MVTec AD ({PEER_SOURCE}; a different data set, pretrained encoders and test-set "
                      "epoch selection: context, not a comparison):", "", peer_table, ""])
    print(text)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / TABLE_FILENAME, text)
    plot_curves(first_maps, test, output_dir / CURVES_FILENAME)
    map_grid(first_maps, test, args.num_map_images, output_dir / MAPS_FILENAME)
    results = {
        "object_class": object_class, "data_dir": str(data_dir), "device": str(device),
        "encoder_weights": args.encoder_weights, "split": split, "classes": classes,
        "test_set": {d: test.defect_types.count(d) for d in sorted(set(test.defect_types))},
        "training_sets": {name: {"images": len(data) if data is not None else 0, "augmented": augment,
                                 "defect_types": sorted(set(data.defect_types)) if data is not None else []}
                          for name, (data, augment) in training_sets.items()},
        "synthetic_folders": {s.name: [str(f) for f in s.folders] for s in sources},
        "settings": {k: v for k, v in vars(args).items()},
        "notes": notes, "summary": summary, "per_seed": per_seed,
        "peer_figures": {"source": PEER_SOURCE, "percent": PEER_FIGURES},
        "seconds": round(seconds, 1),
    }
    write_json_atomic(output_dir / RESULTS_FILENAME, results)
    print(f"wrote {output_dir / RESULTS_FILENAME}, {TABLE_FILENAME}, {CURVES_FILENAME}, {MAPS_FILENAME} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DownstreamError, dm.DatasetError, RunFileError) as error:
        raise SystemExit(f"error: {error}")
