"""The page's image inputs, checked before Gradio decodes anything: on a public server Gradio's own
`ImageEditor` and `Image` accept only files in Gradio's upload folder, refuse an image with too many pixels
by its header, and the editor takes a few layers and keeps a few pending uploads per session (`pending`).

Gradio already refuses a client's file outside its upload folder before `preprocess`; the check is repeated
here so the rule does not depend on that. The checks wrap the methods of the component instances, not a
subclass: Gradio writes a `.pyi` stub next to the source file of every component class it sees defined, which
would put files in the package at run time. So give these components new values, not `gr.update(...)` of
their properties (Gradio rebuilds a component from its constructor arguments for that, without the checks).
Imported by `ui.build_app` only (it imports gradio)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from fastapi import HTTPException
from gradio import utils as gradio_utils
from pydantic import ValidationError

from defectfill.app.limits import PublicLimits, check_image_size
from defectfill.app.pending import PendingEdits, PendingValue
from defectfill.errors import RequestRefused


def _refuse(error: RequestRefused):
    raise gr.Error(str(error), print_exception=False) from None


def checked_file(file, limits: PublicLimits | None, what: str) -> None:
    """Refuse (gr.Error) a file value a client sent (Gradio's FileData or ImageData, or the bytes of an editor
    upload) that is not in Gradio's upload folder, is a data URL, or has more pixels than `limits` allow. No
    limits (local mode): nothing is checked."""
    if limits is None or file is None:
        return
    try:
        if isinstance(file, (bytes, bytearray)):
            check_image_size(bytes(file), limits.max_image_pixels, what)
            return
        if file.url and file.url.startswith("data:"):
            raise RequestRefused(f"{what}: send images as uploaded files, not data URLs")
        upload_folder = Path(gradio_utils.get_upload_folder()).resolve()
        if not file.path or not gradio_utils.is_in_or_equal(Path(file.path).resolve(), upload_folder):
            raise RequestRefused(f"{what} was not uploaded to this server; upload the file first")
        check_image_size(file.path, limits.max_image_pixels, what)
    except RequestRefused as error:
        _refuse(error)


def guard_image_editor(editor: gr.ImageEditor, limits: PublicLimits | None) -> gr.ImageEditor:
    """`editor` with its inputs checked against `limits` (None: unchanged, Gradio's own behaviour). Its pending
    uploads (`editor.pending`, `PendingEdits`) belong to the session that sent them: an event that names one gets a
    `PendingValue`, which the handler resolves for its session (`editor_images`)."""
    if limits is None:
        return editor
    preprocess, convert = editor.preprocess, editor.convert_and_format_image
    editor.pending = PendingEdits(limits)

    def checked_preprocess(payload):
        if payload is not None and len(payload.layers or []) > limits.max_editor_layers:
            _refuse(RequestRefused(f"the mask editor sent {len(payload.layers)} layers; this server takes at most "
                                   f"{limits.max_editor_layers}"))
        if payload is not None and payload.id is not None:
            return PendingValue(str(payload.id))  # the session is known in the handler, not here
        return preprocess(payload)

    def checked_convert(file, flatten_on_white: bool = False):
        checked_file(file, limits, "an image of the mask editor")
        return convert(file, flatten_on_white)

    def checked_accept_blobs(data):
        """The browser's editor sends its images here before an event. A refusal is an HTTP 400 with its message
        (not a bare 500)."""
        try:
            session, edit_id, kind, index, blob = blob_fields(data, limits)
            check_image_size(blob, limits.max_image_pixels, "an image of the mask editor")
            editor.pending.put(session, edit_id, kind, index, blob)
        except RequestRefused as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    checked_accept_blobs._is_server_fn = True  # what Gradio's component server calls
    editor.preprocess, editor.convert_and_format_image, editor.accept_blobs = checked_preprocess, checked_convert, checked_accept_blobs
    return editor


def blob_fields(data, limits: PublicLimits) -> tuple[str, str, str, int | None, bytes]:
    """(session, edit id, kind, layer index, image bytes) of what the browser's editor sends `accept_blobs`, each
    checked: a form with one file, a session, an edit id, a layer number under the cap."""
    fields, files = getattr(data, "data", None), getattr(data, "files", None)
    if not isinstance(fields, dict) or not isinstance(files, list) or len(files) != 1:
        raise RequestRefused("the mask editor's upload is a form with its fields and one image file")
    session, edit_id, kind = (fields.get(k) for k in ("session_hash", "id", "type"))
    if not all(isinstance(v, str) and v for v in (session, edit_id, kind)):
        raise RequestRefused("the mask editor's upload names its session, its edit id and its type")
    index = fields.get("index")
    if index in (None, "", "null"):
        index = None
    elif str(index).isdigit() and int(index) < limits.max_editor_layers:
        index = int(index)
    else:
        raise RequestRefused(f"the mask editor sent layer {index!r}; this server takes at most {limits.max_editor_layers}")
    blob = files[0][1] if isinstance(files[0], (tuple, list)) and len(files[0]) == 2 else None
    if not isinstance(blob, (bytes, bytearray)):
        raise RequestRefused("the mask editor's upload holds no image file")
    return session, edit_id, kind, index, bytes(blob)


def editor_images(editor: gr.ImageEditor, value, session: str | None):
    """The editor's value as the handler takes it ({background, layers, composite}): a `PendingValue` is this
    session's pending edit, decoded through the editor's checks; anything else is as Gradio gave it."""
    if not isinstance(value, PendingValue):
        return value
    try:
        edit = editor.pending.take(session, value.edit_id)
        return {"background": editor.convert_and_format_image(edit.background, flatten_on_white=True),
                "layers": [x for x in (editor.convert_and_format_image(layer) for layer in edit.layers) if x is not None],
                "composite": editor.convert_and_format_image(edit.composite, flatten_on_white=True)}
    except RequestRefused as error:
        _refuse(error)


def guard_image(image: gr.Image, limits: PublicLimits | None) -> gr.Image:
    """`image` (an input) with its uploads checked against `limits` (None: unchanged)."""
    if limits is None:
        return image
    preprocess = image.preprocess

    def checked_preprocess(payload):
        checked_file(payload, limits, "the uploaded image")
        return preprocess(payload)

    image.preprocess = checked_preprocess
    return image


def guard_number(number, what: str):
    """`number` (a gr.Slider or gr.Number input) refusing, with a message, a value that is not a number (Gradio's
    own bounds check would end in a TypeError with no message for a list or a text)."""
    preprocess = number.preprocess

    def checked_preprocess(payload):
        if payload is not None and (isinstance(payload, bool) or not isinstance(payload, (int, float))):
            _refuse(RequestRefused(f"{what}: expected a number, got {type(payload).__name__} {str(payload)[:80]!r}"))
        return preprocess(payload)

    number.preprocess = checked_preprocess
    return number


def guard_file_value(component, what: str):
    """`component` (an image input) refusing, with a message, a value that is not the file value it takes (a text,
    a list, a dict of other fields): Gradio validates the value against its data model before any method of the
    component runs, and would answer with no message of its own."""
    model = component.data_model

    def model_validate(cls, obj, *args, **kwargs):
        try:
            return model.model_validate(obj, *args, **kwargs)
        except ValidationError:
            _refuse(RequestRefused(f"{what}: expected an image file uploaded to this server, got "
                                   f"{type(obj).__name__} {str(obj)[:80]!r}"))

    component.data_model = type(model.__name__, (model,), {"model_validate": classmethod(model_validate),
                                                           "__module__": model.__module__})
    return component
