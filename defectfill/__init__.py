"""defectfill: DefectFill (Song et al., CVPR 2025, arXiv 2503.13985) as a Hugging Face training recipe.

The library behind the repository's entry scripts (`train_defectfill.py`, `infer_defectfill.py`,
`build_dataset_defectfill.py`, `eval_defectfill.py`, `downstream_defectfill.py`, `app_defectfill.py`):

- `method`, `masks`: the paper's prompts, loss weights and losses, and the mask contract shared by training
  and synthesis (pure tensor functions, no other module of ours);
- `attention`, `step`, `models`: the [V*] attention capture, one training step, loading the base model;
- `data`: MVTec AD as a `datasets.Dataset`, the few-shot split, the paired transform;
- `synthesis`, `scoring`: painting a defect with a LoRA and Low-Fidelity Selection;
- `runs`: a run's files (records, LoRA file, Hub upload), its synthesis settings, and the synthesis folder;
- `training`, `build`, `downstream`, `evaluation`, `app`: the parts of each entry script that others reuse;
- `tiny`: the bundled tiny model and data, and the measurements made on them.

Modules are imported by name (`from defectfill import painting`); importing the package loads nothing heavy.
`docs/architecture.md` walks one image through them.
"""

__version__ = "0.2.0"
