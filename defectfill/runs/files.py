"""The names of the files a run and a synthesis folder are made of, defined once.

A training run (the output folder of `train_defectfill.py`): the LoRA in diffusers format, the run record
(what synthesis needs), the few-shot split, the model card, and resumable checkpoints. A synthesis folder
(what `infer_defectfill.py`, the dataset builder and the app write; an imagefolder dataset): images/ and
masks/ with one metadata row each, the synthesis record, a preview, what made it (its fingerprint, for
resuming), and the builder's summary and skipped items."""

# A training run
RUN_FILENAME = "defectfill_run.json"
LORA_FILENAME = "pytorch_lora_weights.safetensors"
SPLIT_FILENAME = "few_shot_split.json"
MODEL_CARD_FILENAME = "README.md"
CHECKPOINT_PREFIX = "checkpoint-"

# A synthesis folder
METADATA_FILENAME = "metadata.jsonl"
SYNTHESIS_FILENAME = "synthesis.json"
PREVIEW_FILENAME = "preview.png"
FINGERPRINT_FILENAME = "build.json"
SUMMARY_FILENAME = "build_summary.json"
SKIPPED_FILENAME = "skipped.json"
LOCK_FILENAME = ".metadata.lock"
WRITER_LOCK_FILENAME = ".writer.lock"  # held by the one run that writes the folder
