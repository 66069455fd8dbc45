"""The caps of a public server, in one table: the numeric settings of a Generate (`GENERATE_SETTINGS`), what one
visitor may send and store (`PublicLimits`), and the check of an image's pixel count from its header. Local mode
(a person on their own machine) has none of these caps."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from io import BytesIO

from PIL import Image

from defectfill.errors import RequestRefused

MB = 1024 * 1024


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def format_bytes(size: int) -> str:
    """A byte count as the page says it: MB below a gigabyte, else GB."""
    return f"{size / MB:.0f} MB" if size < 1024 * MB else f"{size / (1024 * MB):g} GB"


@dataclass(frozen=True)
class NumericSetting:
    """A number a Generate takes from the page: the page's range (`maximum` None: a number box) and the
    most a public server accepts, so one request cannot hold the server."""

    label: str
    minimum: float
    maximum: float | None
    public_maximum: float
    integer: bool = False
    step: float = 1

    def page_range(self, public: bool) -> tuple[float | None, float | None]:
        """(minimum, maximum) of the page's widget: a slider ends at the public cap in public mode; a number box is
        open in local mode."""
        if public:
            return self.minimum, self.public_maximum
        return (self.minimum, self.maximum) if self.maximum is not None else (None, None)

    def checked(self, value, public: bool):
        """The value as the handler takes it. Local mode passes it on as today; public mode refuses what is not
        a finite number in [minimum, public_maximum] (an integer where the setting is one)."""
        if not public:
            return value
        try:
            if isinstance(value, (list, dict, tuple, bool)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise RequestRefused(f"{self.label}: expected a number, got {value!r}") from None
        if not math.isfinite(number) or not self.minimum <= number <= self.public_maximum or (self.integer and not number.is_integer()):
            kind = "an integer" if self.integer else "a number"
            raise RequestRefused(f"{self.label}: {value!r} is not accepted; this server takes {kind} from "
                                 f"{format_number(self.minimum)} to {format_number(self.public_maximum)}")
        return int(number) if self.integer else number


# The numeric settings of a Generate, by the keyword `handlers.generate` takes; the page's widgets are built from
# this table and every value a client sends is checked against it. The public caps are the paper's settings
# (8 candidates, 50 steps).
GENERATE_SETTINGS: dict[str, NumericSetting] = {
    "num_candidates": NumericSetting("Candidates", 1, 16, public_maximum=8, integer=True),
    "num_inference_steps": NumericSetting("Denoising steps", 1, 100, public_maximum=50, integer=True),
    "guidance_scale": NumericSetting("Guidance scale", 1.0, 15.0, public_maximum=15.0, step=0.5),
    "seed": NumericSetting("Seed", 0, None, public_maximum=2**32 - 1, integer=True),
}


@dataclass(frozen=True)
class PublicLimits:
    """What one visitor may send a public server and leave on it.

    Sent: the bytes of an upload (Gradio refuses larger ones before they are stored), the pixels of an image (read
    from its header, before it is decoded), the layers of the mask editor, the editor's pending uploads (per
    session, in total, and how long one waits for its Generate), the requests waiting in the queue, and how long
    Gradio keeps cached files. Stored by 'Add to dataset': images and bytes per session folder and under the
    dataset root in total."""

    max_file_size: int = 10 * MB
    max_image_pixels: int = 4096 * 4096
    max_editor_layers: int = 4
    max_pending_editor_uploads: int = 4
    max_pending_editor_uploads_total: int = 64
    pending_editor_seconds: int = 600
    queue_size: int = 16
    cache_seconds: int = 3600
    max_session_images: int = 100
    max_session_bytes: int = 100 * MB
    max_dataset_images: int = 5000
    max_dataset_bytes: int = 2048 * MB

    def dataset_note(self) -> str:
        """The caps of 'Add to dataset', as the page and the README say them."""
        return (f"at most {self.max_session_images} images and {format_bytes(self.max_session_bytes)} per session, "
                f"{self.max_dataset_images} images and {format_bytes(self.max_dataset_bytes)} on this server in all; "
                "the same result is stored once")


def image_pixels(source: str | os.PathLike | bytes, what: str = "the image") -> int:
    """The pixel count of an image file or its bytes, read from its header; nothing is decoded."""
    try:
        with Image.open(BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:  # PIL's own limit, far above a public server's
        raise RequestRefused(f"{what} is too large to be decoded ({error})") from None
    except (OSError, SyntaxError, ValueError):  # PIL's message names the server's file: not repeated
        raise RequestRefused(f"{what} cannot be read as an image") from None
    return width * height


def check_image_size(source: str | os.PathLike | bytes, max_pixels: int | None, what: str = "the image") -> None:
    """Refuse an image with more than `max_pixels` pixels before anything decodes it (a small compressed file
    can decode to gigabytes)."""
    if max_pixels is None:
        return
    pixels = image_pixels(source, what)
    if pixels > max_pixels:
        raise RequestRefused(f"{what} has {pixels:,} pixels; this server accepts images of at most {max_pixels:,} pixels "
                             f"(e.g. {math.isqrt(max_pixels)}x{math.isqrt(max_pixels)})")
