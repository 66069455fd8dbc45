"""The parts of `train_defectfill.py`: its data (`data`), setup (`setup`: accelerator, models, optimizer, state
hooks, the checks before loading), the loop (`loop`), checkpoints (`checkpoints`), validation (`validation`)
and what a finished run leaves (`outputs`: LoRA, run record, model card, Hub upload)."""
