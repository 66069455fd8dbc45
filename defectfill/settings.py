"""Settings shared by several entry points: the base model and where the data comes from.

Each library entry point takes one frozen dataclass of settings, built once in its script from the parsed flags
(`defectfill.cli.settings_from_args`); a field's name is the dest of the flag that sets it, so a setting has one
name in flags, settings and records. `flat_settings` gives those names and values, nested settings included."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass


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


def flat_settings(settings) -> dict[str, object]:
    """{field name: value} of a settings dataclass, the fields of nested settings merged in (their names are flag
    dests, so they do not collide; a collision is an error)."""
    values: dict[str, object] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        inner = flat_settings(value) if is_dataclass(value) and not isinstance(value, type) else {f.name: value}
        clash = values.keys() & inner.keys()
        if clash:
            raise ValueError(f"{type(settings).__name__}: field(s) {', '.join(sorted(clash))} appear twice")
        values.update(inner)
    return values
