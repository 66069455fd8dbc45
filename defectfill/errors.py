"""Every error defectfill raises for bad input or a run that cannot go on.

They share one base class, `DefectFillError`, so an entry script catches it once and prints the message;
each message names the file, folder or flag at fault and what was expected. The subclasses say where the
error comes from (and stay `ValueError`s, as they were, so callers that caught those keep working)."""

from __future__ import annotations


class DefectFillError(Exception):
    """Bad input or a run that cannot go on; the message says what is wrong and what was expected."""


class ConfigError(DefectFillError, ValueError):
    """A `--config` YAML file that cannot be used; the message names the file and the key."""


class DatasetError(DefectFillError, ValueError):
    """Bad dataset input; the message names the file or folder and what was expected."""


class RunFileError(DefectFillError, ValueError):
    """A run or synthesis file that cannot be used; the message names the file and the field."""


class InpaintingModelError(DefectFillError, ValueError):
    """A base model that is not a 9-channel inpainting model."""


class SynthesisError(DefectFillError, ValueError):
    """Bad synthesis input; the message names the file or flag and what was expected."""


class TrainingError(DefectFillError, RuntimeError):
    """A training run that cannot go on; the message says why and what to change."""


class BuildError(DefectFillError, ValueError):
    """Bad dataset-builder input; the message names the flag, folder or file."""


class DownstreamError(DefectFillError, ValueError):
    """Bad input to the downstream evaluation; the message names the flag, folder or file."""


class EvaluationError(DefectFillError, ValueError):
    """Bad evaluation input; the message names the folder or file."""


class FlagError(DefectFillError, ValueError):
    """A flag value that does not fit the model or files it is used with (known once their configs are read)."""


class OutputFolderError(DefectFillError, ValueError):
    """An output folder that cannot be written (under a file, or without write permission); names the flag and folder."""


class FolderBusyError(DefectFillError, RuntimeError):
    """An output folder another run is writing to right now; names the folder."""


class RequestRefused(DefectFillError, ValueError):
    """A value a client of the app sent that this server does not accept; the message says what it accepts instead."""
