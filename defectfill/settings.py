"""Settings pieces several entry points share, as frozen dataclasses whose field names are the flags' dests
(`defectfill.cli.settings_from_args` fills them from the parsed flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseModelSettings:
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None


@dataclass(frozen=True)
class DataSourceSettings:
    data_dir: str | None = None
    object_class: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    layout: str | None = None       # forced dataset layout (None: detected); used by the data-layout work
