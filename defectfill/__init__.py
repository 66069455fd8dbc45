"""defectfill: DefectFill (Song et al., CVPR 2025, arXiv 2503.13985) as a Hugging Face training recipe.

The library behind the repository's entry scripts (`train_defectfill.py`, `infer_defectfill.py`,
`build_dataset_defectfill.py`, `eval_defectfill.py`, `downstream_defectfill.py`, `app_defectfill.py`):

- `method`, `masks`: the paper's prompts, loss weights and losses, and the mask contract shared by training
  and synthesis (pure tensor functions, no other module of ours);
- `settings`, `cli`: the settings pieces entry points share, and the command lines' plumbing (`--config`,
  `settings_from_args`, `run_main`);
- `bases`, `sdxl`: the supported base models (SD 1.x/2.x and SDXL inpainting, told apart by their
  `model_index.json`; withdrawn Hub ids and their mirrors) and SDXL's conditioning;
- `attention`, `step`, `models`: the [V*] attention capture, one training step, loading the base model;
- `data`: the datasets as a `datasets.Dataset` (one module per layout), mask files, the few-shot split, the paired
  transform;
- `painting`, `pipelines`, `vstar_map`, `scoring`: painting a defect with a LoRA and Low-Fidelity Selection, loading
  the pipeline of the base's family, the [V*] map during synthesis, LPIPS;
- `runs`: a run's files (records, LoRA file, Hub upload), its synthesis settings, and the synthesis folder;
- `training`, `build`, `downstream`, `evaluation`, `app`: each entry script's library, each with its settings.

Modules are imported by name (`from defectfill import painting`); importing the package loads nothing heavy.
`docs/architecture.md` walks one image through them.
"""

__version__ = "0.2.0"
