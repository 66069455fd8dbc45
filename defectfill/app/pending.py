"""The mask editor's pending uploads on a public server: the browser's editor sends its images (background,
layers) to the server before an event, under an edit id, and the event names that id. Here they belong to the
browser session that sent them: another session cannot use them by their id or push them out, each session keeps
a few, the server a few in all, and one waits a few minutes for its Generate at most."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from defectfill.app.limits import PublicLimits
from defectfill.errors import RequestRefused


@dataclass
class PendingEdit:
    """The images of one edit: its background and layers (PNG bytes), and when it was last sent to."""

    background: bytes | None = None
    layers: list[bytes | None] = field(default_factory=list)
    composite: bytes | None = None
    updated: float = field(default_factory=time.monotonic)

    def put(self, kind: str, index: int | None, data: bytes) -> None:
        if kind == "layer" and index is not None:
            self.layers.extend([None] * (index + 1 - len(self.layers)))
            self.layers[index] = data
        elif kind == "background":
            self.background = data
        elif kind == "composite":
            self.composite = data
        else:
            raise RequestRefused(f"the mask editor sent an image of kind {kind!r}; this server takes background, layer "
                                 "or composite")
        self.updated = time.monotonic()


@dataclass(frozen=True)
class PendingValue:
    """What the editor's input holds for an event that names a pending edit: resolved in the event's handler,
    which knows the session (`PendingEdits.take`)."""

    edit_id: str


class PendingEdits:
    """Pending edits by (session, edit id), oldest first."""

    def __init__(self, limits: PublicLimits, clock=time.monotonic):
        self.limits, self.clock = limits, clock
        self._edits: OrderedDict[tuple[str, str], PendingEdit] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._edits)

    def sessions(self) -> list[str]:
        return [session for session, _ in self._edits]

    def put(self, session: str, edit_id: str, kind: str, index: int | None, data: bytes) -> None:
        """Keep one image of an edit of `session`: a new edit past the session's cap pushes out that session's
        oldest; past the server's cap it is refused (other sessions' edits stay)."""
        key = (session, edit_id)
        with self._lock:
            self._expire()
            if key not in self._edits:
                mine = [k for k in self._edits if k[0] == session]
                if len(mine) >= self.limits.max_pending_editor_uploads:
                    del self._edits[mine[0]]
                if len(self._edits) >= self.limits.max_pending_editor_uploads_total:
                    raise RequestRefused("this server holds too many unsent mask edits of other visitors; try again in "
                                         f"{self.limits.pending_editor_seconds // 60} minutes")
                self._edits[key] = PendingEdit(updated=self.clock())
            self._edits[key].put(kind, index, data)
            self._edits[key].updated = self.clock()

    def take(self, session: str | None, edit_id: str) -> PendingEdit:
        """The edit `edit_id` of `session`, removed; refused when this session sent no such edit (another session's
        id, an expired one, or one already used)."""
        with self._lock:
            self._expire()
            edit = self._edits.pop((session, edit_id), None) if session else None
        if edit is None:
            raise RequestRefused("the mask editor's images did not reach the server in this session (or waited more than "
                                 f"{self.limits.pending_editor_seconds // 60} minutes): paint the mask again, then Generate")
        return edit

    def _expire(self) -> None:
        oldest = self.clock() - self.limits.pending_editor_seconds
        for key in [k for k, edit in self._edits.items() if edit.updated < oldest]:
            del self._edits[key]
