"""The downstream comparison, step by step: the real test set and training data of the saved split, the
training sets to compare (baselines and synthetic sets), every (set, seed) trained and tested the same way,
and the report (`downstream_defectfill.py` is its command line)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from defectfill.data.mvtec import GOOD
from defectfill.downstream.data import ImageSet, copy_paste_set, real_defects, real_test_set, train_good_set
from defectfill.downstream.metrics import localization_metrics
from defectfill.downstream.models import (
    build_classifier,
    build_localizer,
    classification_accuracy,
    predict_maps,
    train_classifier,
    train_localizer,
)
from defectfill.downstream.report import (
    COLUMNS,
    CURVES_FILENAME,
    MAPS_FILENAME,
    PEER_FIGURES,
    PEER_SOURCE,
    RESULTS_FILENAME,
    TABLE_FILENAME,
    map_grid,
    plot_curves,
    results_table,
    summarize,
)
from defectfill.downstream.sources import (
    SyntheticSource,
    agreed_value,
    collect_split,
    count_test_set_reuse,
    load_synthetic_set,
    read_synthetic_sources,
)
from defectfill.fileio import write_json_atomic, write_text_atomic


@dataclass
class RealData:
    """The real images of the saved split: the test set (held-out defects + test/good), the few real training
    defects, and the train/good images every localizer trains on."""

    test: ImageSet
    train_defects: ImageSet
    goods: ImageSet

    @property
    def heldout_defects(self) -> ImageSet:
        return self.test.select([i for i, d in enumerate(self.test.defect_types) if d != GOOD])


def training_sets(args, real: RealData, synthetic_sets: dict[str, ImageSet]) -> dict[str, tuple[ImageSet | None, bool]]:
    """{name: (images, augmented)} of every set compared: the baselines asked for, then the synthetic sets."""
    sets: dict[str, tuple[ImageSet | None, bool]] = {}
    if "untrained" in args.baselines:
        sets["untrained"] = (None, False)
    if "real_only" in args.baselines:
        sets["real_only"] = (real.train_defects, True)
    if "copy_paste" in args.baselines:
        targets = next(iter(synthetic_sets.values()), None)
        count = args.copy_paste_count or (len(targets) if targets is not None else 10 * len(real.train_defects))
        sets["copy_paste"] = (copy_paste_set(real.train_defects, real.goods, targets, count, seed=0), False)
    for name, data in synthetic_sets.items():
        sets[name] = (data, False)
    return sets


def protocol_notes(args, sources: list[SyntheticSource], split: dict, classes: list[str]) -> list[str]:
    """What a reader of the table must know: the encoders, test-set reuse by the synthetic sets, the schedule."""
    encoders = "ImageNet-pretrained" if args.encoder_weights == "imagenet" else "random init (offline; the peers pretrain on ImageNet)"
    notes = [f"encoders: {encoders}"]
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
    return notes


def evaluate_set(args, data: ImageSet | None, augment: bool, real: RealData, classes: list[str], seed: int, device,
                 label: str) -> tuple[dict, torch.Tensor]:
    """One training set at one seed: the localizer (and, with two or more defect types, the classifier) trained
    on it and tested on the real test set. Returns (its figures, its anomaly maps of the test images)."""
    if data is None:
        model, history = build_localizer(args, seed).to(device), {"loss": [], "epoch_kept": 0}
    else:
        model, history = train_localizer(args, data, real.goods, seed, device, augment, label)
    maps = predict_maps(model, real.test.images, args.batch_size, device)
    figures = localization_metrics(maps, real.test.masks)
    figures["classification_accuracy"] = None
    if data is not None and len(classes) >= 2:
        classifier = train_classifier(args, data, classes, seed, device, augment, label)
        figures["classification_accuracy"] = classification_accuracy(classifier, real.heldout_defects, classes,
                                                                     args.batch_size, device)
    return {"seed": seed, **figures, "epoch_kept": history["epoch_kept"],
            "final_loss": history["loss"][-1] if history["loss"] else None}, maps


def run_comparison(args) -> dict:
    """The whole comparison the flags describe; writes the results JSON, table, curves and maps to
    `--output_dir` and returns the results."""
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

    real = RealData(real_test_set(data_dir, object_class, split, args.resolution),
                    real_defects(data_dir, object_class, split, "train", args.resolution),
                    train_good_set(data_dir, object_class, args.resolution))
    sets = training_sets(args, real, {s.name: load_synthetic_set(s, object_class, args.resolution) for s in sources})
    notes = protocol_notes(args, sources, split, classes)

    per_seed: dict[str, list[dict]] = {name: [] for name in sets}
    first_maps: dict[str, torch.Tensor] = {}
    for seed in args.seeds:
        for name, (data, augment) in sets.items():
            figures, maps = evaluate_set(args, data, augment, real, classes, seed, device, f"{name} seed {seed}")
            per_seed[name].append(figures)
            if seed == args.seeds[0]:
                first_maps[name] = maps

    summary = {name: {k: summarize([r[k] for r in rows]) for k in COLUMNS} for name, rows in per_seed.items()}
    test = real.test
    header = (f"Downstream evaluation, {object_class}: mean ± std over seeds {', '.join(map(str, args.seeds))}, in %; "
              f"test: {int(test.is_defective.sum())} held-out real defects ({', '.join(classes)}) + "
              f"{int((~test.is_defective).sum())} test/good images at {args.resolution} px; {args.encoder} U-Net, "
              f"{args.classifier} classifier, device {device}.")
    text = "\n".join([header, "", results_table(summary), "", *[f"- {n}" for n in notes], "",
                      f"Peers on MVTec AD ({PEER_SOURCE}; a different data set, pretrained encoders and test-set "
                      "epoch selection: context, not a comparison):", "", results_table({}, PEER_FIGURES), ""])
    print(text)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / TABLE_FILENAME, text)
    plot_curves(first_maps, test, output_dir / CURVES_FILENAME)
    map_grid(first_maps, test, args.num_map_images, output_dir / MAPS_FILENAME)
    seconds = time.perf_counter() - started
    results = {
        "object_class": object_class, "data_dir": str(data_dir), "device": str(device),
        "encoder_weights": args.encoder_weights, "split": split, "classes": classes,
        "test_set": {d: test.defect_types.count(d) for d in sorted(set(test.defect_types))},
        "training_sets": {name: {"images": len(data) if data is not None else 0, "augmented": augment,
                                 "defect_types": sorted(set(data.defect_types)) if data is not None else []}
                          for name, (data, augment) in sets.items()},
        "synthetic_folders": {s.name: [str(f) for f in s.folders] for s in sources},
        "settings": {k: v for k, v in vars(args).items()},
        "notes": notes, "summary": summary, "per_seed": per_seed,
        "peer_figures": {"source": PEER_SOURCE, "percent": PEER_FIGURES},
        "seconds": round(seconds, 1),
    }
    write_json_atomic(output_dir / RESULTS_FILENAME, results)
    print(f"wrote {output_dir / RESULTS_FILENAME}, {TABLE_FILENAME}, {CURVES_FILENAME}, {MAPS_FILENAME} ({seconds:.0f} s)")
    return results
