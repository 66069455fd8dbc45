"""The repository's embedded default: the bundled tiny SD2-inpainting-shaped model (`model`: its architecture
and tokenizer, `pretrain`: how its weights were trained), the bundled synthetic MVTec-shaped data
(`synthetic_data`), procedural defect families it never saw (`families`), the measurements made on them
(`measure`, `generalisation`, `fast_synthesis`), which write the measured tables of the model README, the demos
(`demos`), and the measured blocks of the docs they write (`docs`).

Tooling of a clone of the repository, not part of the installed `defectfill` package: the scripts in scripts/ are
its command lines (run as `python scripts/<name>.py`, they import it as `tiny`; the tests import it as
`scripts.tiny`, so its modules import each other relatively). `paths` names the bundled files they read and write."""
