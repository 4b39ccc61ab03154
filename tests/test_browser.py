"""The explorer page in a real headless Chromium, driven by Playwright: sliders redraw the digit, a
drawing on the canvas gets its reconstruction, and a screenshot is taken.

Needs Debian's chromium (/usr/bin/chromium or $VAEDRAW_CHROMIUM; `scripts/setup.sh --test` installs it)
and the playwright package; the browser Playwright would download is never used. The page serves the
tiny test run, or the run directory in $VAEDRAW_BROWSER_RUN. The screenshot goes to docs/web.png when the
page shows such a trained run (how the committed picture is made), else next to the test's temporary files,
so running the suite leaves the working tree as it was:

    VAEDRAW_BROWSER_RUN=runs/conditional pytest tests/test_browser.py
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


CHROMIUM = os.environ.get("VAEDRAW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web.png"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/setup.sh --test as root, or apt-get install chromium",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from contextlib import contextmanager


@contextmanager
def _serving(make_app):
    """uvicorn on a free 127.0.0.1 port in a thread, for the app `make_app(port)` builds; yields its URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(port), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the explorer server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@contextmanager
def _open(browser, url):
    """A page on `url`, once the page says it is ready; no script error allowed."""
    pg = browser.new_page(viewport={"width": 1180, "height": 900})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(url)
    pg.wait_for_selector("body[data-ready='1']", timeout=20_000)
    yield pg
    pg.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def server(tiny_conditional_run, mnist_dir):
    from vaedraw.run import load_run
    from vaedraw.web import HostRule, create_app

    run = load_run(os.environ.get("VAEDRAW_BROWSER_RUN") or tiny_conditional_run, device="cpu")
    # with the Host check `vaedraw serve` installs: the page works under the address it is served on
    def make(port):
        return create_app(run, mnist_dir, n_map=1000, hosts=HostRule.for_bind("127.0.0.1", port))

    with _serving(make) as url:
        yield url


@pytest.fixture(scope="module")
def page(browser, server):
    with _open(browser, server) as pg:
        yield pg


def _src(page, selector: str) -> str:
    return page.eval_on_selector(selector, "el => el.getAttribute('src') || ''")


def test_slider_redraws_the_digit(page):
    page.wait_for_function("document.getElementById('decoded').complete")
    before = _src(page, "#decoded")
    assert before.startswith("data:image/png;base64,")
    info = page.evaluate("state.info")
    assert page.locator("#sliders input[type=range]").count() == min(info["latent_dim"], 16)
    page.locator("#slider-0").fill("2.5")  # sets the value and fires the input event
    page.wait_for_function("s => document.getElementById('decoded').getAttribute('src') !== s", arg=before,
                           timeout=10_000)
    after = _src(page, "#decoded")
    assert after != before
    if not info["conditional"]:
        return
    # a different digit for the same code is a different picture too
    page.locator("#digit-buttons button", has_text="8").click()
    page.wait_for_function("s => document.getElementById('decoded').getAttribute('src') !== s", arg=after,
                           timeout=10_000)


def test_drawing_gets_a_reconstruction(page):
    assert _src(page, "#drawn-recon") == ""
    box = page.locator("#pad").bounding_box()
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + 140, y0 + 40)
    page.mouse.down()
    for i in range(1, 21):  # a vertical stroke: a one
        page.mouse.move(x0 + 140 + i, y0 + 40 + 10 * i)
    page.mouse.up()
    page.wait_for_function("document.getElementById('drawn-recon').getAttribute('src')", timeout=10_000)
    assert _src(page, "#drawn-recon").startswith("data:image/png;base64,")
    assert _src(page, "#drawn-input").startswith("data:image/png;base64,")
    # the drawing is marked on the latent map
    assert page.evaluate("state.drawnMap !== null && state.drawnMap.length === 2")


def test_random_and_interpolation_then_screenshot(page, tmp_path):
    before = _src(page, "#decoded")
    page.click("#random")
    page.wait_for_function("s => document.getElementById('decoded').getAttribute('src') !== s", arg=before,
                           timeout=10_000)
    page.click("#interp-go")
    page.wait_for_function("document.querySelectorAll('#strip-spherical img').length === 10", timeout=10_000)
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True, type="png"))).convert("RGB")
    assert shot.width > 800 and np.asarray(shot).std() > 10
    # a 256-colour palette keeps the committed picture small
    out = SCREENSHOT if os.environ.get("VAEDRAW_BROWSER_RUN") else tmp_path / "web.png"
    shot.quantize(256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)


def test_a_colour_run_in_the_page(browser):
    """An untrained 3-class model of 3x12x16 colour images: colour pictures, the run's classes, no drawing pad."""
    import torch

    from vaedraw.config import build_config
    from vaedraw.models import build_model
    from vaedraw.run import Run
    from vaedraw.web import HostRule, create_app

    cfg = build_config("default", overrides={"model.latent_dim": 3, "model.channels": 4, "model.hidden": 16,
                                             "model.n_classes": 3, "sample.sampler": "prior"})
    torch.manual_seed(0)
    run = Run(run_dir=None, config=cfg, model=build_model(cfg.model, image_shape=(3, 12, 16)).eval(), step=0,
              metrics={})
    test = SimpleNamespace(images=torch.randint(0, 256, (60, 12, 16, 3), dtype=torch.uint8),
                           labels=torch.arange(60) % 3)

    def make(port):
        return create_app(run, n_map=60, hosts=HostRule.for_bind("127.0.0.1", port), test=test)

    with _serving(make) as url, _open(browser, url) as pg:
        assert pg.locator("#draw").is_hidden() and pg.locator("#interp-card").is_visible()
        assert pg.locator("#digit-buttons button").count() == 3
        assert pg.locator("#interp-from option").count() == 3
        pg.wait_for_function("document.getElementById('decoded').naturalWidth > 0")
        img = Image.open(io.BytesIO(base64.b64decode(_src(pg, "#decoded").split(",", 1)[1])))
        assert img.mode == "RGB" and img.size == (16, 12)
        pg.click("#interp-go")
        pg.wait_for_function("document.querySelectorAll('#strip-spherical img').length === 10", timeout=10_000)
        assert "12x16" in pg.locator("#run-info").text_content()
