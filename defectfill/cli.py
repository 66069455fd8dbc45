"""The command lines of the entry scripts: `--config file.yaml` over argparse (the parser is the one
definition of every option; a YAML file supplies values for some of them, keys being the flags' names
without dashes, and a value given on the command line overrides the file), the argument groups several
scripts share, `settings_from_args`, which turns the parsed flags into the typed settings the library takes,
and `run_main`, which every entry script calls so that any `DefectFillError` ends the command with its message
and exit code 1.

Two kinds of bad input, each refused one way: a flag value wrong by itself (a count below its minimum,
`check_minimums`) is a usage error from the parser (exit code 2); a value wrong only against the model or the
files (a resolution the VAE cannot divide, an output folder that cannot be written, a broken image) is a
`DefectFillError` raised before anything is written (exit code 1)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import yaml

from defectfill.errors import ConfigError, DefectFillError


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a config key may use: the dest and each long flag without its dashes (aliases too)."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help", "config"):
            continue
        keys[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--"):
                keys[option[2:]] = action
    return keys


def _coerce(action: argparse.Action, key: str, value, path: Path):
    if value is None:
        return None
    try:
        if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
            if not isinstance(value, bool):
                raise TypeError(f"expected true or false, got {value!r}")
            return value
        if action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction):
            values = value if isinstance(value, list) else [value]
            return [_check_int(action, v) for v in values]
        _check_int(action, value)
        # YAML reads 2e-4 as a string (YAML 1.1 wants 2.0e-4); the flag's own type converts it.
        return action.type(value) if action.type and isinstance(value, str) else value
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: bad value for {key!r}: {error}") from error


def _check_int(action: argparse.Action, value):
    """An integer flag takes what the command line would: an int (or its string), not 2.5, 2.0 or true."""
    if action.type is int and (isinstance(value, (float, bool)) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit())):
        raise TypeError(f"expected an integer, got {value!r}")
    return action.type(value) if action.type and isinstance(value, str) else value


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """The values of a YAML config file, keyed by the parser's dests, checked against its options."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(raw).__name__}")
    actions = _actions_by_key(parser)
    values = {}
    for key, value in raw.items():
        action = actions.get(str(key))
        if action is None:
            raise ConfigError(f"{path}: unknown option {key!r}; known options: {', '.join(sorted(actions))}")
        value = _coerce(action, key, value, path)
        if action.choices is not None and value is not None and value not in action.choices:
            raise ConfigError(f"{path}: {key!r} must be one of {list(action.choices)}, got {value!r}")
        values[action.dest] = value
    return values


def parse_args_with_config(
    parser: argparse.ArgumentParser, input_args: Sequence[str] | None = None, required: Sequence[str] = ()
) -> argparse.Namespace:
    """Parse `input_args` with the defaults of `--config` (if given) applied first. `required` names
    dests that must be set by either the file or the command line."""
    parser.add_argument(
        "--config", default=None, help="YAML file of option values (keys are flag names); command-line flags win."
    )
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(input_args)
    config = {}
    if known.config:
        try:
            config = load_config(known.config, parser)
        except ConfigError as error:
            parser.error(str(error))
    args = _parse_over_config(parser, input_args, config)
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        parser.error("missing required option(s): " + ", ".join(f"--{name}" for name in missing))
    return args


def _parse_over_config(parser: argparse.ArgumentParser, input_args: Sequence[str] | None, config: dict) -> argparse.Namespace:
    """Parse with the config's values as defaults. An append flag (given once per value) would add its command-line
    values to a default list, so the config's list would be extended, not replaced: such flags parse from None, and
    take the config's value (else their own default) only when the command line gives none."""
    appends = [a for a in parser._actions if isinstance(a, argparse._AppendAction)]
    fallback = {a.dest: config.pop(a.dest) if a.dest in config else a.default for a in appends}
    parser.set_defaults(**config, **{a.dest: None for a in appends})
    args = parser.parse_args(input_args)
    for dest, value in fallback.items():
        if getattr(args, dest) is None:
            setattr(args, dest, list(value) if isinstance(value, (list, tuple)) else value)
    return args


def flag_of(parser: argparse.ArgumentParser, dest: str) -> str:
    """The long flag of a dest as its help shows it first (`--train_batch_size` for train_batch_size)."""
    for action in parser._actions:
        if action.dest == dest:
            return next((o for o in action.option_strings if o.startswith("--")), f"--{dest}")
    return f"--{dest}"


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Every count flag at or above its minimum (1 for a count where 0 means nothing, 0 where 0 is a choice such as
    'off'), from the command line or the config alike; a value below is a usage error (`parser.error`: exit code 2)
    naming the flag. None (a flag's "not set") and each value of a list flag are checked as they are."""
    for dest, minimum in minimums.items():
        value = getattr(args, dest)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and item < minimum:
                parser.error(f"{flag_of(parser, dest)} must be >= {minimum}, got {item}")


# ----------------------------------------------------------------------------------------------------
# Argument groups the scripts share
# ----------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, base_help: str) -> argparse._ArgumentGroup:
    """--pretrained_model_name_or_path, --revision, --variant."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", default=None, help=base_help)
    group.add_argument("--revision", default=None, help="Base model revision (branch, tag or commit) on the Hub.")
    group.add_argument("--variant", default=None, help="Base model weights variant to load, e.g. fp16.")
    return group


def add_hub_arguments(parser: argparse.ArgumentParser, repo_flag: str, what: str) -> argparse._ArgumentGroup:
    """--push_to_hub, the repo id flag (`repo_flag`), --hub_token."""
    group = parser.add_argument_group("Hub")
    group.add_argument("--push_to_hub", action="store_true", help=f"Upload {what} to the Hub.")
    group.add_argument(repo_flag, default=None, help="Hub repo id; default: the output folder's name.")
    group.add_argument("--hub_token", default=None, help="Hub token; prefer `huggingface-cli login` (never logged or saved).")
    return group


def add_layout_argument(group, default: str = "detected from --data_dir and --object_class") -> None:
    """--layout: force one dataset layout (`defectfill.data.layouts`) instead of detecting it."""
    from defectfill.data.layouts import LAYOUT_NAMES

    group.add_argument("--layout", default=None, choices=LAYOUT_NAMES,
                       help=f"Dataset layout of --data_dir (docs/data.md); default: {default}.")


Settings = TypeVar("Settings")


def settings_from_args(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The frozen settings dataclass `cls` filled from the parsed flags: each field from the Namespace attribute of
    the same name (a field whose type is itself a settings dataclass is filled the same way from the same
    Namespace; a field the Namespace lacks keeps its default; a list goes into a tuple field as a tuple)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            values[field.name] = settings_from_args(kind, args)
        elif hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) and _is_tuple_type(kind) else value
    return cls(**values)


def _is_tuple_type(kind) -> bool:
    """tuple, tuple[...], or an optional one (tuple[str, ...] | None)."""
    if kind is tuple or typing.get_origin(kind) is tuple:
        return True
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and any(_is_tuple_type(k) for k in typing.get_args(kind))


def run_main(main: Callable[[argparse.Namespace], object], parse_args: Callable[[], argparse.Namespace]) -> None:
    """`main(parse_args())`; a `DefectFillError` (bad input, a run that cannot go on) ends the command with
    ``error: <message>`` and exit code 1 instead of a traceback."""
    try:
        main(parse_args())
    except DefectFillError as error:
        raise SystemExit(f"error: {error}") from None
