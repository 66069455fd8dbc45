"""The models of the downstream protocol and how they train: a segmentation-models-pytorch U-Net localizer
(focal loss, half good and half defect samples, AnomalyDiffusion's step schedule) and a torchvision ResNet
classifier of the defect type; optional early stopping on a validation part of the training data (never the
test images)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from defectfill.downstream.data import ImageSet, augment_batch, concat_sets
from defectfill.downstream.metrics import average_precision
from defectfill.downstream.settings import DetectorModelSettings, DetectorTrainingSettings
from defectfill.errors import DownstreamError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_localizer(settings: DetectorModelSettings, seed: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    weights = None if settings.encoder_weights == "none" else settings.encoder_weights
    try:
        return smp.Unet(encoder_name=settings.encoder, encoder_weights=weights, encoder_depth=settings.encoder_depth,
                        decoder_channels=list(settings.decoder_channels), in_channels=3, classes=1)
    except (KeyError, ValueError) as error:
        raise DownstreamError(f"--encoder {settings.encoder}: {error}") from error
    except OSError as error:
        raise DownstreamError(f"--encoder_weights {settings.encoder_weights}: the weights could not be downloaded ({error}); "
                              "offline, use --encoder_weights none") from error


def build_classifier(settings: DetectorModelSettings, num_classes: int, seed: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    weights = "IMAGENET1K_V1" if settings.encoder_weights == "imagenet" else None
    try:
        model = getattr(torchvision.models, settings.classifier)(weights=weights)
    except OSError as error:
        raise DownstreamError(f"--encoder_weights imagenet: the {settings.classifier} weights could not be downloaded "
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


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """(training part, validation part) of a set; no validation part for fraction 0."""
    if fraction <= 0:
        return data, None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(len(data) * fraction))
    if count >= len(data):
        raise DownstreamError(f"--validation_fraction {fraction} leaves no training image of a set of {len(data)}")
    return data.select(sorted(order[count:])), data.select(sorted(order[:count]))


def augment_where(images: torch.Tensor, masks: torch.Tensor, flags: torch.Tensor, generator: torch.Generator):
    """`augment_batch` on the samples whose flag is set; the others as they are."""
    if not flags.any():
        return images, masks
    images, masks = images.clone(), masks.clone()
    chosen = flags.nonzero()[:, 0]
    images[chosen], masks[chosen] = augment_batch(images[chosen], masks[chosen], generator)
    return images, masks


def localizer_batch(defects: ImageSet, goods: ImageSet, size: int, generator: torch.Generator):
    """A batch of `size` samples, each a good image (empty mask) or a defect image with probability 1/2:
    float images in [0, 1] (B, 3, R, R) and float masks (B, R, R). A defect sample is augmented when its image
    is marked to be (`ImageSet.augment`: the real defects); good samples are, in a set that augments any."""
    is_defect = torch.rand(size, generator=generator) < 0.5
    good_index = torch.randint(len(goods), (size,), generator=generator)
    defect_index = torch.randint(len(defects), (size,), generator=generator)
    images = torch.where(is_defect[:, None, None, None], defects.images[defect_index], goods.images[good_index]).float() / 255
    masks = torch.where(is_defect[:, None, None], defects.masks[defect_index], goods.masks[good_index]).float()
    flags = torch.where(is_defect, defects.augment[defect_index], bool(defects.augment.any()))
    return augment_where(images, masks, flags, generator)


def train_localizer(model_settings: DetectorModelSettings, training: DetectorTrainingSettings, defects: ImageSet,
                    goods: ImageSet, seed: int, device, label: str):
    """A U-Net trained on `defects` and `goods`; returns (model, history). With a validation part carved out
    (--validation_fraction), the epoch with the best validation pixel AP is restored."""
    import segmentation_models_pytorch as smp
    from tqdm.auto import tqdm

    train_defects, val_defects = split_validation(defects, training.validation_fraction, seed)
    train_goods, val_goods = split_validation(goods, training.validation_fraction, seed + 1)
    model = build_localizer(model_settings, seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    scheduler = step_schedule(optimizer, training.epochs)
    focal = smp.losses.FocalLoss(mode="binary", gamma=2.0)
    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(training.samples_per_epoch / training.batch_size)
    history = {"loss": [], "validation_pixel_ap": [], "epoch_kept": training.epochs}
    best = (-1.0, None)
    bar = tqdm(range(training.epochs), desc=f"localizer {label}", disable=not training.progress, leave=False)
    for epoch in bar:
        model.train()
        total = 0.0
        for step in range(steps):
            size = min(training.batch_size, training.samples_per_epoch - step * training.batch_size)
            images, masks = localizer_batch(train_defects, train_goods, size, generator)
            loss = focal(model(normalize(images, device)), masks[:, None].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * size
        scheduler.step()
        history["loss"].append(total / training.samples_per_epoch)
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
        if val_defects is not None:
            val = concat_sets([val_defects, val_goods])
            ap = average_precision(predict_maps(model, val.images, training.batch_size, device), val.masks)
            history["validation_pixel_ap"].append(ap)
            if ap > best[0]:
                best = (ap, {k: v.detach().clone() for k, v in model.state_dict().items()})
                history["epoch_kept"] = epoch + 1
            elif epoch + 1 - history["epoch_kept"] >= training.patience:
                break
    if best[1] is not None:
        model.load_state_dict(best[1])
    return model, history


def train_classifier(model_settings: DetectorModelSettings, training: DetectorTrainingSettings, defects: ImageSet,
                     classes: list[str], seed: int, device, label: str):
    """A ResNet trained to tell the defect types `classes` apart on the images of `defects` of one of those
    types (a `combined` image, several types in one, is left out); images marked to be are augmented."""
    from tqdm.auto import tqdm

    keep = [i for i, d in enumerate(defects.defect_types) if d in classes]
    data = defects.select(keep)
    labels = torch.tensor([classes.index(d) for d in data.defect_types])
    model = build_classifier(model_settings, len(classes), seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    scheduler = step_schedule(optimizer, training.classifier_epochs)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(training.classifier_epochs), desc=f"classifier {label}", disable=not training.progress, leave=False):
        model.train()
        order = torch.cat([torch.randperm(len(data), generator=generator) for _ in range(training.classifier_repeats)])
        for start in range(0, len(order), training.batch_size):
            index = order[start:start + training.batch_size]
            images, _ = augment_where(data.images[index].float() / 255, data.masks[index], data.augment[index], generator)
            loss = F.cross_entropy(model(normalize(images, device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model


@torch.no_grad()
def classification_accuracy(model, test: ImageSet, classes: list[str], batch_size: int, device) -> float:
    """Share of the test defects whose type is predicted right (a type the model lacks counts as wrong)."""
    model.eval()
    predictions = torch.cat([model(normalize(test.images[i:i + batch_size], device)).argmax(1).cpu()
                             for i in range(0, len(test), batch_size)])
    truth = torch.tensor([classes.index(d) if d in classes else -1 for d in test.defect_types])
    return float((predictions == truth).float().mean())
