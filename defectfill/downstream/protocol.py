"""The downstream comparison, step by step: the real test set and training data of the saved split, the
training sets to compare (baselines and synthetic sets), every (set, seed) trained and tested the same way,
and the report (`downstream_defectfill.py` is its command line)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from defectfill.data.mvtec import GOOD, split_layout
from defectfill.downstream.data import ImageSet, concat_sets, copy_paste_set, real_defects, real_test_set, train_good_set
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
    MAP_IMAGES,
    MAPS_FILENAME,
    PEER_FIGURES,
    PEER_SOURCE,
    RESULTS_FILENAME,
    TABLE_FILENAME,
    map_grid,
    plot_curves,
    results_table,
    summarize,
    sweep_table,
)
from defectfill.downstream.settings import DownstreamSettings
from defectfill.downstream.sources import (
    REAL_PLUS,
    SyntheticSource,
    agreed_value,
    collect_split,
    count_test_set_reuse,
    leak_error,
    load_synthetic_set,
    read_synthetic_sources,
)
from defectfill.errors import DownstreamError
from defectfill.fileio import check_output_folder, write_json_atomic, write_text_atomic


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


def copy_paste_count(settings: DownstreamSettings, real: RealData, targets: ImageSet | None) -> int:
    """Images in the copy-paste set: --copy_paste_count, else as many as the first synthetic set (without one: 10
    per real training defect, and at least the largest share of the sweep, which then sweeps copy-paste)."""
    count = settings.copy_paste_count or (len(targets) if targets is not None else 10 * len(real.train_defects))
    if targets is None:  # copy-paste is the swept set
        count = max([count, *(share_count(share, real) for share in settings.synthetic_shares)])
    return count


def share_count(share: float, real: RealData) -> int:
    return max(1, round(share * len(real.train_defects)))


def training_sets(settings: DownstreamSettings, real: RealData, synthetic_sets: dict[str, ImageSet]) -> dict[str, ImageSet | None]:
    """Every set compared, by name: the baselines asked for, the synthetic sets, and (--with_real) each generated
    set with the real training defects added (`real+NAME`, the set a team would train on). The real defects are
    augmented wherever they are; generated images are used as they are."""
    real_part = real.train_defects.augmented()
    sets: dict[str, ImageSet | None] = {}
    generated: dict[str, ImageSet] = {}
    if "untrained" in settings.baselines:
        sets["untrained"] = None
    if "real_only" in settings.baselines:
        sets["real_only"] = real_part
    if "copy_paste" in settings.baselines:
        targets = next(iter(synthetic_sets.values()), None)
        generated["copy_paste"] = copy_paste_set(real.train_defects, real.goods, targets,
                                                 copy_paste_count(settings, real, targets), seed=0)
    generated.update(synthetic_sets)
    sets.update(generated)
    if settings.with_real:
        sets.update({f"{REAL_PLUS}{name}": concat_sets([real_part, data]) for name, data in generated.items()})
    return sets


def sweep_sets(settings: DownstreamSettings, real: RealData, sets: dict[str, ImageSet | None],
               synthetic_names: list[str]) -> dict[str, dict[float, str]]:
    """The size sweep (--synthetic_shares): the real defects plus `share` x as many images of the first synthetic
    set (copy-paste without one), one fixed random subset per share, the same for every seed. Adds the sets to
    train to `sets`; returns {generator: {share: set name}}, a share that takes the whole generated set naming the
    `real+NAME` set of the main table."""
    generator_name = synthetic_names[0] if synthetic_names else "copy_paste" if "copy_paste" in sets else None
    if not settings.synthetic_shares or generator_name is None:
        return {}
    data = sets[generator_name]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    sweep: dict[float, str] = {}
    for share in settings.synthetic_shares:
        count = share_count(share, real)
        if count > len(data):
            raise DownstreamError(f"--synthetic_shares {share:g}: {count} images of {generator_name} wanted, it has "
                                  f"{len(data)}; make more (--num_images) or give smaller shares")
        name = f"{REAL_PLUS}{generator_name}" if count == len(data) and settings.with_real else \
            f"{REAL_PLUS}{generator_name} ({share:g}x)"
        if name not in sets:
            sets[name] = concat_sets([real.train_defects.augmented(), data.select(sorted(order[:count]))])
        sweep[share] = name
    return {generator_name: sweep}


def provenance_notes(sources: list[SyntheticSource], reuse: dict[str, dict], sets: dict[str, ImageSet | None],
                     classes: list[str]) -> list[str]:
    """Where each synthetic set's masks and images came from, and which images the classifier leaves out."""
    notes = []
    for source in sources:
        counts = reuse[source.name]
        origins = sorted({r.mask_from for r in source.records if r is not None and r.mask_from} or {"not recorded"})
        if counts["masks"] or counts["images"]:
            if counts["masks"]:
                notes.append(f"LEAK {source.name}: {counts['masks']} of {counts['rows']} images have a defect painted in "
                             "a held-out test mask or one augmented from it: the localizer sees the test defects' shapes "
                             "and positions, its figures are optimistic (copy-paste pastes at the same positions)")
            if counts["images"]:
                notes.append(f"LEAK {source.name}: {counts['images']} of {counts['rows']} images were painted on "
                             "test/good images: the test's defect-free images were seen in training")
        else:
            notes.append(f"{source.name}: {counts['rows']} images, masks from {', '.join(origins)} (none is a held-out "
                         "test mask or made from one), no test/good image")
    left_out = {name: sum(d not in classes for d in data.defect_types) for name, data in sets.items()
                if data is not None and len(classes) >= 2 and not name.startswith(REAL_PLUS)}
    if any(left_out.values()):
        counts = ", ".join(f"{count} of {name}" for name, count in left_out.items() if count)
        notes.append(f"classifier: the images with several defect types (combined: {counts}, the same in their real+ "
                     "sets) are left out; the localizer learns their union mask")
    return notes


def protocol_notes(settings: DownstreamSettings, classes: list[str]) -> list[str]:
    """What a reader of the table must know: the encoders, the classifier's scope, the schedule."""
    training = settings.training
    encoders = ("ImageNet-pretrained" if settings.model.encoder_weights == "imagenet"
                else "random init (offline; the peers pretrain on ImageNet)")
    notes = [f"encoders: {encoders}"]
    if len(classes) < 2:
        notes.append(f"classification: n/a, the split holds one defect type ({', '.join(classes)}); it needs two or more")
    if training.validation_fraction > 0:
        notes.append(f"early stopping on {training.validation_fraction:.0%} of each training set (validation pixel AP)")
    else:
        notes.append(f"fixed schedule, last epoch reported ({training.epochs} localizer / {training.classifier_epochs} "
                     "classifier epochs)")
    return notes


def evaluate_set(settings: DownstreamSettings, data: ImageSet | None, real: RealData, classes: list[str], seed: int, device,
                 label: str) -> tuple[dict, torch.Tensor]:
    """One training set at one seed: the localizer (and, with two or more defect types, the classifier) trained
    on it and tested on the real test set. Returns (its figures, its anomaly maps of the test images)."""
    if data is None:
        model, history = build_localizer(settings.model, seed).to(device), {"loss": [], "epoch_kept": 0}
    else:
        model, history = train_localizer(settings.model, settings.training, data, real.goods, seed, device, label)
    maps = predict_maps(model, real.test.images, settings.training.batch_size, device)
    figures = localization_metrics(maps, real.test.masks)
    figures["classification_accuracy"] = None
    if data is not None and len(classes) >= 2:
        classifier = train_classifier(settings.model, settings.training, data, classes, seed, device, label)
        figures["classification_accuracy"] = classification_accuracy(classifier, real.heldout_defects, classes,
                                                                     settings.training.batch_size, device)
    return {"seed": seed, **figures, "epoch_kept": history["epoch_kept"],
            "final_loss": history["loss"][-1] if history["loss"] else None}, maps


def check_test_set_reuse(settings: DownstreamSettings, sources: list[SyntheticSource], split: dict, data_dir,
                         object_class: str | None = None, layout: str | None = None) -> dict[str, dict]:
    """Each source's count of images made from the test set; a leaky source stops the comparison unless
    --allow_test_leak (before any image is loaded or model trained)."""
    reuse = {s.name: count_test_set_reuse(s, split, data_dir, object_class, layout) for s in sources}
    errors = [e for e in (leak_error(s.name, reuse[s.name]) for s in sources) if e]
    if errors and not settings.allow_test_leak:
        raise DownstreamError("\n".join(errors))
    return reuse


def train_and_test(settings: DownstreamSettings, sets: dict[str, ImageSet | None], real: RealData, classes: list[str], device):
    """Every set at every seed: ({name: per-seed figures}, {name: anomaly maps of the first seed})."""
    per_seed: dict[str, list[dict]] = {name: [] for name in sets}
    first_maps: dict[str, torch.Tensor] = {}
    for seed in settings.seeds:
        for name, data in sets.items():
            figures, maps = evaluate_set(settings, data, real, classes, seed, device, f"{name} seed {seed}")
            per_seed[name].append(figures)
            if seed == settings.seeds[0]:
                first_maps[name] = maps
    return per_seed, first_maps


def run_comparison(settings: DownstreamSettings) -> dict:
    """The whole comparison `settings` describe; writes the results JSON, table, curves and maps to
    `output_dir` and returns the results."""
    import datasets
    from accelerate import Accelerator

    started = time.perf_counter()
    check_output_folder(settings.output_dir, "--output_dir")  # before hours of training, not after
    datasets.disable_progress_bars()  # the loaders' filter bars; training has its own
    device = Accelerator().device
    sources = read_synthetic_sources(settings.synthetic)
    build_localizer(settings.model, settings.seeds[0])  # a wrong --encoder or unreachable weights fail before any work
    if settings.model.encoder_weights == "imagenet":
        build_classifier(settings.model, 2, settings.seeds[0])
    data_dir = agreed_value("--data_dir", settings.data.data_dir, sources, "data_dir")
    object_class = agreed_value("--object_class", settings.data.object_class, sources, "object_class")
    split = collect_split(settings.split_file, sources)
    classes = sorted(split["defect_types"])
    layout = split_layout(split, settings.data.layout)
    reuse = check_test_set_reuse(settings, sources, split, data_dir, object_class, layout)

    resolution = settings.model.resolution
    real = RealData(real_test_set(data_dir, object_class, split, resolution, layout),
                    real_defects(data_dir, object_class, split, "train", resolution, layout),
                    train_good_set(data_dir, object_class, resolution, layout))
    sets = training_sets(settings, real, {s.name: load_synthetic_set(s, object_class, resolution) for s in sources})
    notes = protocol_notes(settings, classes) + provenance_notes(sources, reuse, sets, classes)
    main_names = list(sets)
    sweep = sweep_sets(settings, real, sets, [s.name for s in sources])
    per_seed, first_maps = train_and_test(settings, sets, real, classes, device)

    summary = {name: {k: summarize([r[k] for r in rows]) for k in COLUMNS} for name, rows in per_seed.items()}
    leaky = any(r["masks"] or r["images"] for r in reuse.values())
    sweep_text = sweep_table(sweep, summary, len(real.train_defects)) if sweep else None
    text = comparison_text(settings, object_class, real, classes, str(device), leaky, {n: summary[n] for n in main_names},
                           notes, sweep_text)
    print(text)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / TABLE_FILENAME, text)
    shown = {n: first_maps[n] for n in main_names}
    plot_curves(shown, real.test, output_dir / CURVES_FILENAME)
    map_grid(shown, real.test, MAP_IMAGES, output_dir / MAPS_FILENAME)
    seconds = time.perf_counter() - started
    results = {
        "object_class": object_class, "data_dir": str(data_dir), "device": str(device),
        "encoder_weights": settings.model.encoder_weights, "split": split, "classes": classes, "leaky": leaky,
        "test_set": {d: real.test.defect_types.count(d) for d in sorted(set(real.test.defect_types))},
        "training_sets": {name: {"images": len(data) if data is not None else 0,
                                 "augmented": int(data.augment.sum()) if data is not None else 0,
                                 "defect_types": sorted(set(data.defect_types)) if data is not None else []}
                          for name, data in sets.items()},
        "synthetic_folders": {s.name: [str(f) for f in s.folders] for s in sources},
        "test_set_reuse": reuse,
        "sweep": {g: {f"{share:g}": name for share, name in shares.items()} for g, shares in sweep.items()},
        "settings": asdict(settings), "notes": notes, "summary": summary, "per_seed": per_seed,
        "peer_figures": {"source": PEER_SOURCE, "percent": PEER_FIGURES}, "seconds": round(seconds, 1),
    }
    write_json_atomic(output_dir / RESULTS_FILENAME, results)
    print(f"wrote {output_dir / RESULTS_FILENAME}, {TABLE_FILENAME}, {CURVES_FILENAME}, {MAPS_FILENAME} ({seconds:.0f} s)")
    return results


def comparison_text(settings: DownstreamSettings, object_class: str, real: RealData, classes: list[str], device: str,
                    leaky: bool, summary: dict, notes: list[str], sweep: str | None) -> str:
    """The table of the main sets, the notes, the size sweep's table and the peers' figures, under a title that
    says what was tested and how (and LEAKY first for a set made from the test set)."""
    test, model = real.test, settings.model
    header = (f"{'LEAKY (--allow_test_leak: a synthetic set was made from the test set, see the notes). ' if leaky else ''}"
              f"Downstream evaluation, {object_class}: mean ± std over seeds {', '.join(map(str, settings.seeds))}, in %; "
              f"test: {int(test.is_defective.sum())} held-out real defects ({', '.join(classes)}) + "
              f"{int((~test.is_defective).sum())} test/good images at {model.resolution} px; training: "
              f"{len(real.train_defects)} real defects, {len(real.goods)} train/good images; {model.encoder} U-Net, "
              f"{model.classifier} classifier, device {device}.")
    blocks = [header, "", results_table(summary), "", *[f"- {n}" for n in notes], ""]
    if sweep:
        blocks += [sweep, ""]
    return "\n".join([*blocks, f"Peers on MVTec AD ({PEER_SOURCE}; a different data set, pretrained encoders and test-set "
                      "epoch selection: context, not a comparison):", "", results_table({}, PEER_FIGURES), ""])
