"""Drive the app in a real browser (Debian's chromium, headless, through Playwright): paint a stroke
across the middle of the image, Generate, wait for the result, and save a screenshot. The browser test
(tests/test_app.py) uses `paint_stroke_and_generate`; `docs/app_screenshot.png` is made (`take_screenshot`) with

    python app_defectfill.py &                # the real app, offline defaults
    python scripts/app_screenshot.py --url http://127.0.0.1:7860 --output docs/app_screenshot.png
"""

from __future__ import annotations

import io
from pathlib import Path

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    return next((p for p in CHROMIUM_PATHS if Path(p).exists()), None)


def fetch_image(page, selector: str):
    """The image an <img> of the page shows, as the server sends it (PIL)."""
    from PIL import Image

    return Image.open(io.BytesIO(page.request.get(page.get_attribute(selector, "src")).body()))


def paint_stroke_and_generate(page, url: str, half_length: int = 40, timeout_ms: int = 180_000):
    """Open the app, wait for the run to load, paint a horizontal stroke through the editor's centre with
    the brush, click Generate and wait for the result. Returns (result image, its mask) as PIL images."""
    page.goto(url)
    page.wait_for_selector("#editor canvas", timeout=timeout_ms)
    page.wait_for_function("document.querySelector('#summary') && document.querySelector('#summary').innerText.includes('Run')",
                           timeout=timeout_ms)
    page.wait_for_timeout(1500)  # the editor draws its background
    page.get_by_role("button", name="Brush", exact=True).click()
    box = page.locator("#editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - half_length, cy)
    page.mouse.down()
    for dx in range(-half_length, half_length + 1, 4):
        page.mouse.move(cx + dx, cy)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.click("#generate")
    page.wait_for_selector("#result img", timeout=timeout_ms)
    page.wait_for_selector("#attention img", timeout=timeout_ms)
    page.wait_for_timeout(1000)
    return fetch_image(page, "#result img"), fetch_image(page, "#mask img")


def take_screenshot(url: str, output: str, width: int = 1400, height: int = 1250) -> None:
    """Paint a stroke and Generate on the app at `url` in headless chromium, and save the whole page to `output`."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("error: no chromium executable (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            paint_stroke_and_generate(page, url)
            page.screenshot(path=output, full_page=True)
        finally:
            browser.close()
