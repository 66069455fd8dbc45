"""The page's image inputs, checked before Gradio decodes anything: on a public server Gradio's own
`ImageEditor` and `Image` accept only files in Gradio's upload folder, refuse an image with too many pixels
by its header, and the editor takes a few layers and keeps a few pending uploads.

Gradio already refuses a client's file outside its upload folder before `preprocess`; the check is repeated
here so the rule does not depend on that. The checks wrap the methods of the component instances, not a
subclass: Gradio writes a `.pyi` stub next to the source file of every component class it sees defined, which
would put files in the package at run time. So give these components new values, not `gr.update(...)` of
their properties (Gradio rebuilds a component from its constructor arguments for that, without the checks).
Imported by `ui.build_app` only (it imports gradio)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import gradio as gr
from gradio import utils as gradio_utils

from defectfill.app.policy import PublicLimits, RequestRefused, check_image_size


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
    """`editor` with its inputs checked against `limits` (None: unchanged, Gradio's own behaviour)."""
    if limits is None:
        return editor
    preprocess, convert, accept_blobs = editor.preprocess, editor.convert_and_format_image, editor.accept_blobs

    def checked_preprocess(payload):
        if payload is not None and len(payload.layers or []) > limits.max_editor_layers:
            _refuse(RequestRefused(f"the mask editor sent {len(payload.layers)} layers; this server takes at most "
                                   f"{limits.max_editor_layers}"))
        return preprocess(payload)

    def checked_convert(file, flatten_on_white: bool = False):
        checked_file(file, limits, "an image of the mask editor")
        return convert(file, flatten_on_white)

    def checked_accept_blobs(data):
        """The browser's editor sends its images here before an event, kept until the event reads them: capped,
        so pending ones cannot fill the server's memory."""
        index = data.data.get("index")
        if index not in (None, "", "null") and not (str(index).isdigit() and int(index) < limits.max_editor_layers):
            _refuse(RequestRefused(f"the mask editor sent layer {index!r}; this server takes at most {limits.max_editor_layers}"))
        for _, blob in data.files:
            checked_file(blob, limits, "an image of the mask editor")
        if not isinstance(editor.blob_storage, OrderedDict):
            editor.blob_storage = OrderedDict(editor.blob_storage)
        while data.data.get("id") not in editor.blob_storage and len(editor.blob_storage) >= limits.max_pending_editor_uploads:
            editor.blob_storage.popitem(last=False)  # the oldest edit never submitted
        return accept_blobs(data)

    checked_accept_blobs._is_server_fn = True  # what Gradio's component server calls
    editor.preprocess, editor.convert_and_format_image, editor.accept_blobs = checked_preprocess, checked_convert, checked_accept_blobs
    return editor


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
