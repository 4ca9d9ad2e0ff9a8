"""The real ComfyUI frontend in headless Chromium, driven by Python Playwright (no browser download: the
system Chromium, Debian's /usr/bin/chromium or CHROMIUM_PATH). Used by the `page` fixture and by
build_workflows.py."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

# The flags keep Chromium off the network this machine does not have (refused connections otherwise).
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

APP = "(window.comfyAPI?.app?.app ?? window.app)"


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM_PATH")
    if path:
        return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def open_frontend(sync_api, url: str, viewport: tuple[int, int] = (1280, 800)) -> Iterator:
    """A page with the frontend loaded and its extensions set up; it records page errors, console errors and
    failed responses in ``page_errors``, ``console_errors`` and ``bad_responses``."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            pg.page_errors = []  # uncaught exceptions / unhandled rejections: "message\nstack"
            pg.console_errors = []
            pg.bad_responses = []
            pg.on("pageerror", lambda exc: pg.page_errors.append(f"{exc.message}\n{exc.stack}"))
            pg.on("console", lambda msg: msg.type == "error" and pg.console_errors.append(msg.text))
            pg.on("response", lambda r: r.status >= 400 and pg.bad_responses.append(f"{r.status} {r.url}"))
            pg.goto(url, wait_until="load", timeout=60_000)
            pg.wait_for_function(
                f"() => {{ const a = {APP}; return !!(a && a.graph && a.extensions && a.extensions.length > 0); }}",
                timeout=90_000,
            )
            # Node classes are registered after the extensions, from /object_info.
            pg.wait_for_function("() => !!window.LiteGraph?.registered_node_types?.KSampler", timeout=90_000)
            yield pg
        finally:
            browser.close()
