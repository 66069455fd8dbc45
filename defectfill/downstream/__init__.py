"""The downstream check (`downstream_defectfill.py`): do synthetic defects train a better detector? What it
is asked for (`settings`), the synthetic sets compared (`sources`), the image sets (`data`), the models (`models`), the metrics
(`metrics`), the report (`report`) and the comparison itself (`protocol`)."""
