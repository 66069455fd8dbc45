"""The downstream check (`downstream_defectfill.py`): do synthetic defects train a better detector? The
synthetic sets compared (`sources`), the image sets (`data`), the models (`models`), the metrics
(`metrics`), the report (`report`) and the comparison itself (`protocol`)."""
