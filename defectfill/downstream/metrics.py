"""Detection and localization metrics of the downstream protocol (AnomalyDiffusion, DualAnoDiff, SeaS):
image AUROC / AP / F1-max from per-image scores, pixel AUROC / AP / F1-max / AU-PRO from anomaly maps.

AUROC, AP and the precision-recall / ROC curves are torchmetrics' exact (threshold-free) binary metrics.
F1-max is the largest F1 over every threshold of the exact precision-recall curve (AnomalyDiffusion's
image F1-max does the same with scikit-learn; its pixel F1-max tries only 21 thresholds 0, 0.05, ..., 1,
which can only be lower or equal). AU-PRO follows the MVTec evaluation code the peers copy: the PRO curve
(mean overlap of each connected ground-truth region vs. the false-positive rate over all defect-free
pixels) integrated up to an FPR limit (0.3) by the trapezoid rule and divided by the limit; ours takes
every distinct score as a threshold instead of 100 quantiles. anomalib computes the same two metrics
but would pull lightning, opencv and pandas into the environment; these are tested against hand-computed
cases in tests/test_downstream.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# AnomalyDiffusion's image score: the max of the anomaly map average-pooled over 21x21 windows.
IMAGE_SCORE_POOL = 21
AU_PRO_FPR_LIMIT = 0.3


def _as_flat_tensors(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64)).flatten()
    labels = torch.as_tensor(np.asarray(labels).astype(bool)).flatten().long()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {tuple(scores.shape)} vs {tuple(labels.shape)}")
    if labels.min() == labels.max():
        raise ValueError("the labels hold only one class: AUROC, AP and F1-max need defects and defect-free samples")
    return scores, labels


def image_scores_from_maps(maps: torch.Tensor, pool_size: int = IMAGE_SCORE_POOL) -> torch.Tensor:
    """Per-image score of anomaly maps (N, H, W): the max of the map average-pooled over
    `pool_size` x `pool_size` windows (stride 1, zero padding counted, as AnomalyDiffusion does)."""
    pooled = F.avg_pool2d(maps[:, None].float(), pool_size, stride=1, padding=pool_size // 2, count_include_pad=True)
    return pooled.flatten(1).max(dim=1).values


def auroc(scores, labels) -> float:
    """Area under the ROC curve (exact; ties count half)."""
    from torchmetrics.functional.classification import binary_auroc

    s, y = _as_flat_tensors(scores, labels)
    return float(binary_auroc(s, y))


def average_precision(scores, labels) -> float:
    """Average precision (area under the step precision-recall curve, as scikit-learn defines it)."""
    from torchmetrics.functional.classification import binary_average_precision

    s, y = _as_flat_tensors(scores, labels)
    return float(binary_average_precision(s, y))


def f1_max(scores, labels) -> float:
    """The best F1 over every threshold of the exact precision-recall curve."""
    precision, recall, _ = precision_recall_curve(scores, labels)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(f1.max())


def precision_recall_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), torchmetrics' exact curve."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    s, y = _as_flat_tensors(scores, labels)
    precision, recall, thresholds = binary_precision_recall_curve(s, y)
    return precision.numpy(), recall.numpy(), thresholds.numpy()


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, thresholds), torchmetrics' exact curve."""
    from torchmetrics.functional.classification import binary_roc

    s, y = _as_flat_tensors(scores, labels)
    fpr, tpr, thresholds = binary_roc(s, y)
    return fpr.numpy(), tpr.numpy(), thresholds.numpy()


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve of anomaly maps (N, H, W) against boolean masks (N, H, W):
    (FPR, PRO) at every distinct score taken as a threshold (a pixel is flagged when its score is >= the
    threshold), from (0, 0) to (1, 1). FPR counts defect-free pixels of all images together; PRO is the
    mean over the connected defect regions (8-connectivity, each image on its own) of the share of
    the region flagged."""
    from scipy import ndimage

    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps and masks differ in shape: {maps.shape} vs {masks.shape}")
    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        labelled, found = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(labelled > 0, labelled + count, 0)
        count += found
    negatives = int((regions == 0).sum())
    if count == 0 or negatives == 0:
        raise ValueError("AU-PRO needs at least one defect region and one defect-free pixel")
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    # Each flagged pixel adds its share to the FPR (1 / negatives) or to the mean overlap (1 / (size * count)).
    region_of = regions.ravel()
    fpr_step = np.where(region_of == 0, 1.0 / negatives, 0.0)
    pro_step = np.where(region_of > 0, 1.0 / (sizes[region_of] * count), 0.0)
    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_scores = maps.ravel()[order]
    fpr, pro = np.cumsum(fpr_step[order]), np.cumsum(pro_step[order])
    # One point per distinct score: the last pixel of each run of equal scores.
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    return np.r_[0.0, np.clip(fpr[last_of_run], 0, 1)], np.r_[0.0, np.clip(pro[last_of_run], 0, 1)]


def au_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = AU_PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1 is perfect; a constant map
    gives fpr_limit / 2). The curve is linear between its points, so the value at the limit is interpolated."""
    fpr, pro = pro_curve(maps, masks)
    pro_at_limit = np.interp(fpr_limit, fpr, pro)
    keep = fpr < fpr_limit
    x, y = np.r_[fpr[keep], fpr_limit], np.r_[pro[keep], pro_at_limit]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def localization_metrics(maps: torch.Tensor, masks: torch.Tensor, pool_size: int = IMAGE_SCORE_POOL,
                         fpr_limit: float = AU_PRO_FPR_LIMIT) -> dict[str, float]:
    """Every metric of the protocol for anomaly maps (N, H, W) in [0, 1] and boolean masks (N, H, W);
    an image is defective when its mask has a defect pixel."""
    maps, masks = maps.float().cpu(), masks.bool().cpu()
    image_labels = masks.flatten(1).any(dim=1)
    image_scores = image_scores_from_maps(maps, pool_size)
    return {
        "image_auroc": auroc(image_scores, image_labels),
        "image_ap": average_precision(image_scores, image_labels),
        "image_f1_max": f1_max(image_scores, image_labels),
        "pixel_auroc": auroc(maps, masks),
        "pixel_ap": average_precision(maps, masks),
        "pixel_f1_max": f1_max(maps, masks),
        "pixel_au_pro": au_pro(maps.numpy(), masks.numpy(), fpr_limit),
    }
