"""The dataset builder (`build_dataset_defectfill.py`): what it is asked for (`settings`), what a build makes
(`plan`), its masks (`augment`: new masks from few; `defect_masks`: per item), its context and fingerprint
(`context`), painting (`paint`), the summary (`summary`), the MVTec export (`export`), and the steps in order
(`builder`)."""
