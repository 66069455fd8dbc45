"""cli.settings_from_args: parsed flags become frozen, typed settings (nested settings filled from the same flags,
absent flags keep the defaults); settings.flat_settings names every value by its flag."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from defectfill.cli import settings_from_args
from defectfill.settings import BaseModelSettings, DataSourceSettings, flat_settings


@dataclass(frozen=True)
class Inner:
    rank: int = 8
    names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Outer:
    model: BaseModelSettings = field(default_factory=BaseModelSettings)
    data: DataSourceSettings = field(default_factory=DataSourceSettings)
    inner: Inner = field(default_factory=Inner)
    seed: int = 0


def test_nested_settings_are_filled_from_the_same_flags():
    args = argparse.Namespace(pretrained_model_name_or_path="m", revision="r", object_class="bottle", data_dir="d",
                              rank=4, seed=3, names=["a", "b"], unrelated="ignored")
    settings = settings_from_args(Outer, args)
    assert settings.model == BaseModelSettings(pretrained_model_name_or_path="m", revision="r")
    assert settings.data == DataSourceSettings(data_dir="d", object_class="bottle")
    assert settings.inner == Inner(rank=4, names=("a", "b")) and settings.seed == 3


def test_absent_flags_keep_their_defaults():
    settings = settings_from_args(Outer, argparse.Namespace(seed=5))
    assert settings == Outer(seed=5)
    assert settings.inner.rank == 8 and settings.data.layout is None  # a flag this script does not have


def test_settings_are_frozen():
    settings = settings_from_args(Outer, argparse.Namespace(rank=2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.inner.rank = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]


def test_flat_settings_names_each_value_by_its_flag():
    flat = flat_settings(Outer(inner=Inner(rank=2)))
    assert flat["rank"] == 2 and flat["pretrained_model_name_or_path"] is None and flat["seed"] == 0
    assert "inner" not in flat and "model" not in flat

    @dataclass(frozen=True)
    class Clash:
        inner: Inner = field(default_factory=Inner)
        rank: int = 1

    with pytest.raises(ValueError, match="rank appear twice"):
        flat_settings(Clash())
