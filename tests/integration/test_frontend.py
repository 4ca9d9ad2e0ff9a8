"""The ComfyUI frontend in headless Chromium registers our web extension without JS errors.

Needs Python Playwright (`pip install -e '.[integration]'`, no browser download) and a Chromium
binary: Debian's `chromium` at /usr/bin/chromium, or CHROMIUM_PATH. Skips when either is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest
from comfy_harness import PACK_DIR_NAME

pytestmark = pytest.mark.integration

EXTENSION_NAME = "EasyAnimate.Core"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    path = os.environ.get("CHROMIUM_PATH")
    if path:
        return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def page(comfy_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set CHROMIUM_PATH)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page()
            pg.page_errors = []  # uncaught exceptions / unhandled rejections: "message\nstack"
            pg.console_errors = []
            pg.bad_responses = []
            pg.on("pageerror", lambda exc: pg.page_errors.append(f"{exc.message}\n{exc.stack}"))
            pg.on("console", lambda msg: msg.type == "error" and pg.console_errors.append(msg.text))
            pg.on("response", lambda r: r.status >= 400 and pg.bad_responses.append(f"{r.status} {r.url}"))
            pg.goto(comfy_server.url, wait_until="load", timeout=60_000)
            pg.wait_for_function(
                "() => { const a = window.comfyAPI?.app?.app ?? window.app;"
                " return !!(a && a.graph && a.extensions && a.extensions.length > 0); }",
                timeout=90_000,
            )
            yield pg
        finally:
            browser.close()


def test_frontend_registers_our_extension(page):
    names = page.evaluate("() => (window.comfyAPI?.app?.app ?? window.app).extensions.map(e => e.name)")
    assert EXTENSION_NAME in names, names
    assert names.count(EXTENSION_NAME) == 1, names


def _ours(messages: list[str]) -> list[str]:
    return [m for m in messages if PACK_DIR_NAME in m or "EasyAnimate" in m]


def test_frontend_has_no_errors_from_our_extension(page):
    # The stock frontend (1.27.10) itself throws one uncaught TypeError on a fresh user folder
    # (settings onChange, "reading 'id'"), with or without this pack, and logs 404s for optional
    # resources; so only errors whose message or stack involves our extension count.
    page.wait_for_timeout(2000)  # let late setup()/async hooks run
    assert _ours(page.page_errors) == []
    assert _ours(page.console_errors) == []
    assert _ours(page.bad_responses) == []


SNAP_SCRIPT = """async () => {
  const app = window.comfyAPI?.app?.app ?? window.app;
  const node = window.LiteGraph.createNode("EasyAnimateEmptyLatentVideo");
  app.graph.add(node);
  const w = (name) => node.widgets.find((x) => x.name === name);
  const set = (name, value) => { w(name).value = value; w(name).callback(value); };
  for (let i = 0; i < 50 && !node.easyanimateInfo; i++) await new Promise((r) => setTimeout(r, 100));
  const initial = node.easyanimateInfo;
  set("frames", 50);
  set("width", 650);
  set("height", 380);
  const snapped = {frames: w("frames").value, width: w("width").value, height: w("height").value};
  const info = node.easyanimateInfo;
  const {output} = await app.graphToPrompt();
  const inputs = output[String(node.id)]?.inputs;
  app.graph.remove(node);
  return {initial, snapped, info, inputs};
}"""


def test_frames_and_size_widgets_snap_to_the_version_rules_and_show_duration(page):
    result = page.evaluate(SNAP_SCRIPT)
    assert result["initial"] == "49 frames · 6.1 s at 8 fps · latent 13×48×84", result
    assert result["snapped"] == {"frames": 49, "width": 656, "height": 384}, result
    assert result["info"] == "49 frames · 6.1 s at 8 fps · latent 13×48×82", result
    # The info line is drawn, not a widget: the prompt carries exactly the node's own inputs.
    assert result["inputs"] == {"version": "V5.1", "width": 656, "height": 384, "frames": 49, "batch_size": 1}
