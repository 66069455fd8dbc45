#!/usr/bin/env python
"""Does the synthetic data make a better inspection model? Train a defect localizer and a defect-type
classifier on synthetic defects, test them on the real held-out defects, next to baselines trained the
same way.

    python downstream_defectfill.py --synthetic defectfill=synthetic/bottle --encoder_weights imagenet \
        --synthetic_shares 1 2 4

(`synthetic/bottle`: a build of `build_dataset_defectfill.py` with every defect type of the class, its masks
augmented from the runs' training masks; or infer_defectfill.py folders, one per defect type, comma-separated.)

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
  (cross-entropy, Adam 1e-4), accuracy on the real held-out defects. A builder's ``combined`` images (several
  defect types in one) train the localizer (their union mask) and are left out of the classifier.
- Nothing of the test set in training: a synthetic set painted in a held-out test mask (or a mask augmented
  from one) or on a ``test/good`` image is refused unless ``--allow_test_leak`` (the title then says LEAKY).
- No test-set model selection (AnomalyDiffusion keeps the epoch that scores best on the test set): the
  last epoch is reported, or, with ``--validation_fraction``, early stopping on a validation set carved
  out of the training data (never the real test images).
- Several seeds in one command (mean and spread), and baselines with the same protocol and seeds:
  ``untrained`` (the random-init model, a floor), ``real_only`` (the few real training defects, augmented)
  and ``copy_paste`` (real training defects cut out with their masks and pasted onto good images at the
  defect types and mask positions of the first synthetic set); with ``--with_real`` (default) also
  ``real+copy_paste`` and ``real+NAME`` for each synthetic set: the real defects plus the generated ones, the
  set a team would train on; ``--synthetic_shares`` sweeps how many generated images are added.

The steps are `defectfill.downstream` (`sources`, `data`, `models`, `metrics`, `report`, `protocol`). Writes to
``--output_dir``: ``downstream_results.json``, ``downstream_table.md``, ``curves.png`` (image and
pixel ROC / PR curves, first seed) and ``anomaly_maps.png`` (test images, their masks and each model's map).
"""

from __future__ import annotations

import argparse

from defectfill.cli import add_layout_argument, check_minimums, parse_args_with_config, run_main, settings_from_args
from defectfill.downstream.protocol import run_comparison
from defectfill.downstream.settings import DownstreamSettings
from defectfill.downstream.sources import BASELINES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--synthetic", action="append", default=None, metavar="[NAME=]DIR[,DIR...]",
                      help="A synthetic training set: one or more synthesis folders (imagefolder with metadata.jsonl, as "
                           "infer_defectfill.py writes them; e.g. one per defect type), named NAME in the table (default: "
                           "the first folder's name). Repeat for each set to compare (ours, another run, another generator).")
    data.add_argument("--data_dir", default=None, help="The dataset folder, any layout of docs/data.md (real good images and "
                                                        "held-out defects). Default: the data_dir in the synthesis folders' "
                                                        "synthesis.json.")
    add_layout_argument(data, "the layout the few-shot split recorded, else detected")
    data.add_argument("--object_class", default=None, help="The category, e.g. bottle. Default: the synthesis folders'.")
    data.add_argument("--split_file", action="append", default=None,
                      help="A saved few_shot_split.json, or a training run folder holding one; repeat for several runs. "
                           "Added to the splits in the synthesis folders' synthesis.json; the test set is the held-out "
                           "images of every defect type they hold.")
    data.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                      help="Baselines trained and tested with the same protocol and seeds.")
    data.add_argument("--copy_paste_count", type=int, default=None,
                      help="Images in the copy-paste set. Default: as many as the first synthetic set (10 per real training "
                           "defect without one), and at least the largest --synthetic_shares.")
    data.add_argument("--with_real", action=argparse.BooleanOptionalAction, default=True,
                      help="Also train on each generated set (copy_paste, every --synthetic) with the real training defects "
                           "added, as real+NAME: the training set a team would use.")
    data.add_argument("--synthetic_shares", type=float, nargs="*", default=[],
                      help="Size sweep, e.g. 1 2 4: the real training defects plus this many times as many images of the "
                           "first --synthetic set (copy-paste without one), in a second table. Default: none.")
    data.add_argument("--allow_test_leak", action="store_true",
                      help="Run on a synthetic set made from the test set (a held-out test mask, a mask augmented from one, "
                           "a test/good image), which is refused otherwise; the table's title then says LEAKY.")
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
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Progress bars while training.")
    return p


def parse_args(input_args=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args)
    check_minimums(parser, args, {"resolution": 1, "encoder_depth": 1, "decoder_channels": 1, "copy_paste_count": 1,
                                  "epochs": 1, "samples_per_epoch": 1, "batch_size": 1, "classifier_epochs": 1,
                                  "classifier_repeats": 1, "patience": 1})
    if args.resolution % 2 ** args.encoder_depth:
        parser.error(f"--resolution {args.resolution} must be a multiple of 2**--encoder_depth = {2 ** args.encoder_depth}")
    if len(args.decoder_channels) != args.encoder_depth:
        parser.error(f"--decoder_channels needs {args.encoder_depth} values (one per --encoder_depth stage)")
    if any(share <= 0 for share in args.synthetic_shares):
        parser.error(f"--synthetic_shares must be positive, got {args.synthetic_shares}")
    if not 0 <= args.validation_fraction < 1:
        parser.error(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    return args


def main(args: argparse.Namespace) -> dict:
    return run_comparison(settings_from_args(DownstreamSettings, args))


if __name__ == "__main__":
    run_main(main, parse_args)
