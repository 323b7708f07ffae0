"""A page of a real `engine.serve` in Debian's chromium, driven by Playwright, for the tests that need a browser."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

import pytest

from tests.server_harness import running_server


@contextlib.contextmanager
def served_page(catalog: str | os.PathLike, env: dict | None, **page_options) -> Iterator[tuple[str, object, list]]:
    """(base URL, a fresh page, the page's errors so far: uncaught exceptions and console errors) on a read-only
    server of `catalog`; skips the test where Playwright or chromium is missing (.ci/run installs chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with running_server(catalog, env, "--read-only") as (base, _), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(**page_options)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            yield base, page, errors
        finally:
            browser.close()
