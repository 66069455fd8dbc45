"""A public server as a careless or hostile visitor uses it, through `gradio_client` and raw HTTP, in several
sessions: what 'add to dataset' may store (caps per session and in total, a repeat stored once), uploads decoded
as the command lines decode them (a 16-bit PNG scaled, not white), the mask editor's pending uploads kept per
session, an all-black mask layer and values of the wrong type refused with a message; and the app's temporary
folder removed when it stops, with nothing downloaded at start-up offline."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from defectfill.app import datasets, selection  # noqa: E402
from defectfill.app.editor import MASK_COLOUR  # noqa: E402
from defectfill.app.handlers import AppState  # noqa: E402
from defectfill.app.limits import MB, PublicLimits  # noqa: E402
from defectfill.app.pending import PendingEdits  # noqa: E402
from defectfill.app.policy import AppPolicy, RequestRefused, label, session_folder_name  # noqa: E402
from defectfill.app.ui import build_app  # noqa: E402
from defectfill.runs.folder import read_metadata  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.test_app import DEMO, PATHS, fast_settings, free_port, serve, settings_of  # noqa: E402

LIMITS = PublicLimits(max_session_images=2, max_dataset_images=3, max_pending_editor_uploads=2,
                      max_pending_editor_uploads_total=6)
RUN_LABEL = "metal_nut / color (demo-lora-metal_nut-color)"


@pytest.fixture(scope="module")
def state(offline_lpips_weights) -> AppState:
    return AppState.from_settings(fast_settings(), PATHS)


@pytest.fixture(scope="module")
def public_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def public_server(state, public_root):
    """A public server (--public on 127.0.0.1) with small caps, so a test reaches them in a few requests."""
    settings = settings_of("--public", "--lora", str(DEMO), "--output_dir", str(public_root / "datasets"),
                           "--num_candidates", "2", "--num_inference_steps", "2")
    policy = dataclasses.replace(AppPolicy.from_settings(settings, PATHS), limits=LIMITS)
    blocks = build_app(state, policy=policy)
    try:
        yield serve(blocks, policy)
    finally:
        blocks.close()


def png_file(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def stroke_layer(path: Path, size=(128, 128), colour=(*MASK_COLOUR, 255)) -> Path:
    """An editor layer with a painted band through the middle (the brush's colour by default)."""
    layer = np.zeros((size[1], size[0], 4), np.uint8)
    layer[size[1] // 2 - 6: size[1] // 2 + 6, size[0] // 4: 3 * size[0] // 4] = colour
    return png_file(path, Image.fromarray(layer, "RGBA"))


class Visitor:
    """One browser session of the public server, through gradio_client."""

    def __init__(self, url: str, folder: Path):
        from gradio_client import Client

        folder.mkdir(parents=True, exist_ok=True)
        self.url, self.folder = url, folder
        self.client = Client(url, verbose=False, download_files=str(folder / "downloads"))
        self.client.predict(RUN_LABEL, api_name="/load_run")

    @property
    def session(self) -> str:
        return self.client.session_hash

    def editor(self, layer: Path) -> dict:
        from gradio_client import handle_file

        background = png_file(self.folder / "background.png", Image.new("RGB", (128, 128), (90, 90, 90)))
        return {"background": handle_file(str(background)), "layers": [handle_file(str(layer))], "composite": None}

    def generate(self, editor: dict, seed: int = 0):
        return self.client.predict(editor, "", 2, 2, 7.5, seed, True, api_name="/generate")

    def add(self, folder="") -> str:
        return self.client.predict(folder, api_name="/add_to_dataset")

    def refused(self, message: str, *inputs, api_name: str) -> str:
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match=message) as error:
            self.client.predict(*inputs, api_name=api_name)
        return str(error.value)


# ----------------------------------------------------------------------------------------------------
# 'Add to dataset': caps per session and in total; a repeat stored once
# ----------------------------------------------------------------------------------------------------


def test_add_to_dataset_stores_a_result_once_and_within_its_caps(public_server, public_root, tmp_path):
    datasets_root = public_root / "datasets"
    page = httpx.get(f"{public_server}config").text
    assert "at most 2 images and 100 MB per session, 3 images and 2 GB on this server in all" in page

    a = Visitor(public_server, tmp_path / "a")
    editor = a.editor(stroke_layer(tmp_path / "stroke.png"))
    a.generate(editor, seed=0)
    assert a.add().startswith("Added `images/00000.png`")
    folder = datasets_root / session_folder_name(a.session)
    stored = datasets.usage(folder)
    for _ in range(5):  # the same result again: not stored again
        assert a.add().startswith("This result is already in") and "as `images/00000.png`" in a.add()
    assert datasets.usage(folder) == stored and len(read_metadata(folder)) == 1
    a.generate(editor, seed=0)  # the same settings make the same result: still one copy
    assert a.add().startswith("This result is already in")
    a.generate(editor, seed=1)
    assert a.add().startswith("Added `images/00001.png`")
    a.generate(editor, seed=2)
    a.refused(re.escape("this session's dataset folder already holds 2 images, the most this server keeps (2); "
                        "nothing was added"), "", api_name="/add_to_dataset")
    assert len(read_metadata(folder)) == 2

    b = Visitor(public_server, tmp_path / "b")  # another session: its own folder, within the total cap
    b.generate(b.editor(stroke_layer(tmp_path / "stroke_b.png")), seed=5)
    assert b.add().startswith("Added `images/00000.png`")
    c = Visitor(public_server, tmp_path / "c")
    c.generate(c.editor(stroke_layer(tmp_path / "stroke_c.png")), seed=6)
    c.refused(re.escape("this server's datasets already hold 3 images, the most this server keeps (3)"), "",
              api_name="/add_to_dataset")
    assert datasets.usage(datasets_root).images == 3 and not (datasets_root / session_folder_name(c.session)).exists()


def test_the_byte_caps_count_what_a_write_would_add(tmp_path):
    root = tmp_path / "root"
    mine, other = root / "session-a", root / "session-b"
    for folder, size in ((mine, 600), (other, 300)):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "00000.png").write_bytes(b"\0" * size)
    limits = PublicLimits(max_session_bytes=1000, max_dataset_bytes=1500)
    datasets.check_quota(root, mine, 400, limits)  # 600 + 400: at the cap, not past it
    with pytest.raises(RequestRefused, match=r"this session's dataset folder would pass 0 MB.*nothing was added"):
        datasets.check_quota(root, mine, 401, limits)
    with pytest.raises(RequestRefused, match="this server's datasets would pass"):
        datasets.check_quota(root, root / "session-new", 601, limits)
    assert datasets.usage(root) == datasets.Usage(images=2, bytes=900)


# ----------------------------------------------------------------------------------------------------
# Uploads: decoded as the command lines decode them
# ----------------------------------------------------------------------------------------------------


def test_a_16_bit_upload_is_scaled_as_the_command_lines_scale_it(public_server, public_root, tmp_path):
    from gradio_client import handle_file

    ramp = np.tile(np.linspace(0, 65535, 128).round().astype(np.uint16), (128, 1))
    sixteen = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I;16")
    expected = np.round(ramp / 65535.0 * 255).astype(np.uint8)

    v = Visitor(public_server, tmp_path / "v")
    shown = v.client.predict(handle_file(str(sixteen)), api_name="/upload_good_image")
    background = np.asarray(Image.open(shown["background"]).convert("L"))
    assert np.array_equal(background, expected)  # not 255 everywhere
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    v.refused("the uploaded image cannot be read as an image", handle_file(str(not_an_image)), api_name="/upload_good_image")

    editor = {"background": handle_file(shown["background"]), "layers": [handle_file(str(stroke_layer(tmp_path / "s.png")))],
              "composite": None}
    *_, files = v.generate(editor)
    result = np.asarray(Image.open(next(f for f in files if not f.endswith("_mask.png"))).convert("L"))
    mask = np.asarray(Image.open(next(f for f in files if f.endswith("_mask.png")))) > 0
    assert np.abs(result[~mask].astype(int) - expected[~mask]).max() <= 1  # outside the mask: the scaled image


# ----------------------------------------------------------------------------------------------------
# The mask editor's pending uploads belong to their session
# ----------------------------------------------------------------------------------------------------


def editor_component_id(url: str) -> int:
    config = httpx.get(f"{url}config").json()
    return next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "editor")


def send_blob(url: str, session: str, edit: str, kind: str, index, data: bytes) -> httpx.Response:
    """What the browser's editor sends before an event: one image of an edit, by the session's hash."""
    fields = {"component_id": str(editor_component_id(url)), "session_hash": session, "fn_name": "accept_blobs",
              "id": edit, "type": kind, "index": "null" if index is None else str(index)}
    return httpx.post(f"{url}gradio_api/component_server/", data=fields, files={"blob": ("blob", data, "image/png")})


def test_a_pending_edit_belongs_to_its_session(public_server, tmp_path):
    a, b = Visitor(public_server, tmp_path / "a"), Visitor(public_server, tmp_path / "b")
    background = png_file(tmp_path / "bg.png", Image.new("RGB", (128, 128), (90, 90, 90))).read_bytes()
    layer = stroke_layer(tmp_path / "layer.png").read_bytes()
    for kind, index, data in (("background", None, background), ("layer", 0, layer)):
        assert send_blob(public_server, a.session, "edit-a", kind, index, data).status_code == 200
    pending = {"background": None, "layers": [], "composite": None, "id": "edit-a"}

    # B names A's edit: refused, and A's edit stays
    b.refused("the mask editor's images did not reach the server in this session", pending, "", 2, 2, 7.5, 0, True,
              api_name="/generate")
    for n in range(2 * LIMITS.max_pending_editor_uploads_total):  # B's many edits push out only B's own
        answer = send_blob(public_server, b.session, f"edit-b{n}", "background", None, background)
        assert answer.status_code == 200, answer.text
    *_, status, files = a.generate(pending)
    assert "chosen" in status and len(files) == 2
    mask = np.asarray(Image.open(next(f for f in files if f.endswith("_mask.png")))) > 0
    assert mask.any() and not mask.all()  # A's stroke
    a.refused("did not reach the server in this session", pending, "", 2, 2, 7.5, 0, True, api_name="/generate")  # used once

    # a refused upload: an HTTP 400 with its message, not a bare 500
    answer = send_blob(public_server, a.session, "edit-x", "layer", 99, layer)
    assert answer.status_code == 400 and "the mask editor sent layer '99'; this server takes at most 4" in answer.json()["detail"]
    answer = httpx.post(f"{public_server}gradio_api/component_server/",
                        json={"component_id": editor_component_id(public_server), "session_hash": a.session,
                              "fn_name": "accept_blobs", "data": {"id": "x"}})
    assert answer.status_code == 400 and "a form with its fields and one image file" in answer.json()["detail"]


def test_pending_edits_expire_and_have_a_total_cap():
    now = [0.0]
    edits = PendingEdits(PublicLimits(max_pending_editor_uploads=2, max_pending_editor_uploads_total=3,
                                      pending_editor_seconds=60), clock=lambda: now[0])
    for session, edit in (("a", "1"), ("b", "1"), ("c", "1")):
        edits.put(session, edit, "background", None, b"png")
    with pytest.raises(RequestRefused, match="too many unsent mask edits of other visitors"):
        edits.put("d", "1", "background", None, b"png")
    assert edits.sessions() == ["a", "b", "c"]
    with pytest.raises(RequestRefused, match="of kind 'thumbnail'"):
        edits.put("a", "1", "thumbnail", None, b"png")
    now[0] = 61.0  # every edit waited past its time
    edits.put("d", "1", "background", None, b"png")
    assert edits.sessions() == ["d"]
    with pytest.raises(RequestRefused, match="did not reach the server in this session"):
        edits.take("a", "1")
    assert edits.take("d", "1").background == b"png" and len(edits) == 0


# ----------------------------------------------------------------------------------------------------
# An all-black layer, and values of the wrong type
# ----------------------------------------------------------------------------------------------------


def test_a_black_layer_is_an_empty_mask_and_wrong_types_get_a_message(public_server, tmp_path, capfd):
    v = Visitor(public_server, tmp_path / "v")
    black = png_file(tmp_path / "black.png", Image.new("RGBA", (128, 128), (0, 0, 0, 255)))
    v.refused(re.escape("the painted mask is empty (no pixel >= 128); nothing to inpaint"), v.editor(black), "", 2, 2,
              7.5, 0, True, api_name="/generate")
    for value in (["train/good/000.png"], {"path": "/etc/hostname"}):
        kind = type(value).__name__
        v.refused(f"the good image: expected a label \\(text\\), got {kind}", value, api_name="/pick_good_image")
        v.refused(f"the held-out mask: expected a label \\(text\\), got {kind}", value, api_name="/pick_heldout_mask")
        v.refused(f"the run: expected a label \\(text\\), got {kind}", value, api_name="/load_run")
        v.refused(f"the held-out mask: expected a label \\(text\\), got {kind}", v.editor(black), value, 2, 2, 7.5, 0, True,
                  api_name="/generate")
        for api_name in ("/list_runs", "/add_to_dataset"):  # text boxes: Gradio passes the text of the value on
            message = v.refused(".+", value, api_name=api_name)
            assert "this server" in message and "Gradio" not in message
        for position, what in enumerate(("Candidates", "Denoising steps", "Guidance scale", "Seed")):  # the numbers
            numbers = [2, 2, 7.5, 0]
            numbers[position] = value
            v.refused(f"{what}: expected a number, got {kind}", v.editor(black), "", *numbers, True, api_name="/generate")
    for value in ("abc", [1], {"background": 3}):  # where a file value goes
        v.refused(f"the mask editor: expected an image file uploaded to this server, got {type(value).__name__}", value, "",
                  2, 2, 7.5, 0, True, api_name="/generate")
    for value in ("abc", [1]):
        v.refused(f"the uploaded image: expected an image file uploaded to this server, got {type(value).__name__}", value,
                  api_name="/upload_good_image")
    err = capfd.readouterr().err
    assert "Error" not in err and "Traceback" not in err


def test_label_refuses_what_is_not_text():
    assert label(None, "x") == "" and label("a", "x") == "a"
    for value in (["a"], {"a": 1}, 3):
        with pytest.raises(RequestRefused, match=f"x: expected a label \\(text\\), got {type(value).__name__}"):
            label(value, "x")


# ----------------------------------------------------------------------------------------------------
# Temporary folders, and nothing downloaded offline
# ----------------------------------------------------------------------------------------------------


def app_folders(root: Path) -> list[Path]:
    return sorted(root.glob("defectfill-app-*"))


def test_closing_the_app_removes_its_temporary_folder(state, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocks = build_app(state)
    [folder] = app_folders(tmp_path)
    (folder / "download.png").write_bytes(b"x")
    serve(blocks, AppPolicy.local(PATHS))
    blocks.close()
    assert app_folders(tmp_path) == []


def test_offline_selection_uses_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    assert selection.offline_without_backbone("alex", {}) is None  # online: torchvision may fetch it
    why = selection.offline_without_backbone("alex", {"HF_HUB_OFFLINE": "1"})
    assert why and "not in the local torch hub cache" in why and str(tmp_path) not in why
    checkpoint = selection.backbone_file("alex")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    assert selection.offline_without_backbone("alex", {"HF_HUB_OFFLINE": "1"}) is None


@pytest.mark.slow
def test_the_app_offline_downloads_nothing_says_so_and_cleans_up_on_sigterm(tmp_path):
    """`python app_defectfill.py` with HF_HUB_OFFLINE=1 and an empty torch cache: it starts without fetching the LPIPS
    backbone, the page says at once that selection is off, and SIGTERM removes its temporary folder."""
    port, torch_home, temp = free_port(), tmp_path / "torch_home", tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(torch_home), "TMPDIR": str(temp),
           "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "app_defectfill.py"), "--server_port", str(port)],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                page = httpx.get(f"{url}config", timeout=5)
                if page.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert process.poll() is None, process.stdout.read()
        assert "Low-Fidelity Selection is off" in page.text and "HF_HUB_OFFLINE is set" in page.text
        assert len(app_folders(temp)) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert not torch_home.exists() or not any(torch_home.rglob("*.pth"))  # nothing fetched
    assert "Downloading" not in output
    assert app_folders(temp) == [], output


def test_images_read_rgb_scales_high_bit_depth(tmp_path):
    from defectfill.images import read_rgb

    ramp = np.tile(np.array([0, 257 * 128, 65535], np.uint16), (2, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert np.asarray(read_rgb(tmp_path / "g16.png", "image"))[0, :, 0].tolist() == [0, 128, 255]
    buffer = io.BytesIO()
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(buffer, format="JPEG")
    (tmp_path / "cmyk.jpg").write_bytes(buffer.getvalue())
    assert read_rgb(tmp_path / "cmyk.jpg", "image").mode == "RGB"
    assert MB == 1024 * 1024
