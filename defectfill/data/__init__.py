"""The real data: MVTec AD (and the DefectFill2 layout, and `load_dataset` datasets) as a `datasets.Dataset`
(`mvtec`), the paper's few-shot split (`split`), the paired image / mask transform of training
(`transform`), and synthesis folders read as the same Dataset (`synthetic`)."""
