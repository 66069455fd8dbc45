"""The repository's embedded default: the bundled tiny SD2-inpainting-shaped model (`model`: its architecture
and tokenizer, `pretrain`: how its weights were trained), the bundled synthetic MVTec-shaped data
(`synthetic_data`), procedural defect families it never saw (`families`), and the measurements made on them
(`measure`, `generalisation`), which write the measured tables of the model README.

These tools work on a clone of the repository (the scripts in scripts/ are their command lines): `paths`
names the bundled files they read and write."""
