"""The data side of training: the few-shot rows of one defect type and their split, the dataset and sampler
that give every sample its own seed (so a resumed or multi-process run sees what a single uninterrupted one
sees), and which defect types a command trains."""

from __future__ import annotations

import math
import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from defectfill.data.mvtec import check_defect_types, list_defect_types, load_defect_dataset
from defectfill.data.split import few_shot_split, load_split, select_split
from defectfill.data.transform import PairTransform
from defectfill.errors import TrainingError
from defectfill.settings import DataSourceSettings
from defectfill.training.settings import TrainingSettings


class FewShotDefectDataset(Dataset):
    """The few-shot defect images and masks, transformed together (`PairTransform`). Indexed by
    (row, sample seed) pairs from `EpochShuffleSampler`; the seed drives the sample's augmentation here
    and its noise, timestep and random boxes in the step, so a sample's randomness depends only on the
    run's seed and its place in the schedule: not on resuming, DataLoader workers or how a global batch
    is split over processes."""

    def __init__(self, hf_dataset, transform: PairTransform):
        self.rows = hf_dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: tuple[int, int]) -> dict:
        row_index, sample_seed = index
        row = self.rows[row_index]
        image, mask = self.transform(row["image"], row["mask"], random.Random(sample_seed))
        return {"pixel_values": image, "masks": mask, "row_index": torch.tensor(row_index), "sample_seed": torch.tensor(sample_seed)}


class EpochShuffleSampler(Sampler):
    """Each epoch, a permutation of the rows seeded by (seed, epoch), repeated to at least `min_length`
    so a few-shot set smaller than the batch still fills batches; each row comes with its own
    seed. Seeding by epoch makes a resumed run see the same order as an uninterrupted one."""

    def __init__(self, num_items: int, min_length: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0
        self.length = max(num_items, min_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        repeats = math.ceil(self.length / self.num_items)
        order = torch.cat([torch.randperm(self.num_items, generator=generator) for _ in range(repeats)])
        sample_seeds = torch.randint(0, 2**62, (self.length,), generator=generator)
        return iter(zip(order[: self.length].tolist(), sample_seeds.tolist()))


def collate(examples: list[dict]) -> dict:
    return {key: torch.stack([e[key] for e in examples]) for key in ("pixel_values", "masks", "row_index", "sample_seed")}


def load_training_split(settings: TrainingSettings, defect_type: str):
    """The training rows of `defect_type` and the split (saved next to the run)."""
    data, few_shot = settings.data, settings.few_shot
    full = load_defect_dataset(
        data.object_class, data_dir=data.data_dir, dataset_name=data.dataset_name, defect_types=[defect_type], layout=data.layout,
        **({"config_name": data.dataset_config_name, "cache_dir": settings.model.cache_dir} if data.dataset_name else {}),
    )
    if few_shot.split_file:
        split = load_split(few_shot.split_file)
        if defect_type not in split["defect_types"]:
            raise TrainingError(f"--split_file {few_shot.split_file} has no entry for defect type {defect_type!r}")
        split = {**split, "defect_types": {defect_type: split["defect_types"][defect_type]}}
    else:
        split = few_shot_split(full, few_shot.split_strategy, few_shot.train_fraction, few_shot.train_count, settings.seed)
    train_rows = select_split(full, split, "train")
    if len(train_rows) == 0:
        raise TrainingError(f"no training image of {data.object_class}/{defect_type} in the split")
    return train_rows, split


def build_dataloader(train_rows, settings: TrainingSettings, num_processes: int) -> DataLoader:
    augmentation, batch_size = settings.augmentation, settings.optimization.train_batch_size
    transform = PairTransform(augmentation.resolution, (1.0, augmentation.max_scale), augmentation.random_flip,
                              augmentation.defect_crop_probability, augmentation.defect_crop_context)
    sampler = EpochShuffleSampler(len(train_rows), batch_size * num_processes, settings.seed)
    return DataLoader(
        FewShotDefectDataset(train_rows, transform), batch_size=batch_size, sampler=sampler,
        collate_fn=collate, num_workers=settings.runtime.dataloader_num_workers, drop_last=True,
        # Its own generator: creating an iterator would otherwise draw from the global torch RNG, so a
        # resumed run (new iterator after the restored RNG state) would draw different noise.
        generator=torch.Generator().manual_seed(settings.seed),
    )


def defect_types_to_train(data: DataSourceSettings, defect_type: str | None) -> list[str]:
    """The defect types a command trains: `defect_type` (--defect_type), every one of the class with "all", or the
    class's only one when None."""
    if data.dataset_name:
        if defect_type in (None, "all"):
            raise TrainingError("with --dataset_name, give --defect_type")
        return [defect_type]
    available = list_defect_types(data.data_dir, data.object_class, data.layout)
    if defect_type == "all":
        return available
    if defect_type is None:
        if len(available) != 1:
            raise TrainingError(f"{data.object_class} has defect types {', '.join(available)}: choose one with --defect_type (or 'all')")
        return available
    check_defect_types([defect_type], available, f"{data.data_dir}/{data.object_class}")
    return [defect_type]
