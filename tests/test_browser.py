"""The web page in a real browser (Debian's chromium, driven by Playwright): upload a photo, and the result grid
shows the same items as the CLI for that image; click a result for more like it. A screenshot is kept in
test-artifacts/ (CI keeps that folder)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.synthetic import make_image_folder
from engine.serve import running_server

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def test_upload_on_the_page_shows_the_clis_results(shop, tmp_path, cli_env):
    query = make_image_folder(tmp_path / "q", per_class=1, seed=41, start=950, classes=("checker",))[0]
    expected = subprocess.run([sys.executable, "-m", "engine.query", "--catalog", str(shop), "-k", "12", "--json",
                               str(query)], capture_output=True, text=True, env=cli_env, check=True)
    expected_ids = [str(r["id"]) for r in json.loads(expected.stdout)[0]["results"]]
    with running_server(shop, cli_env, "--read-only") as (base, _), playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "/")
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#grid .result >> nth=11", timeout=60_000)
            shown = page.eval_on_selector_all("#grid .result", "cards => cards.map(c => c.dataset.id)")
            assert shown == expected_ids
            titles = page.eval_on_selector_all("#grid .title", "nodes => nodes.map(n => n.innerHTML)")
            assert titles and all(t.startswith("&lt;b&gt;item ") for t in titles)  # metadata shown as text
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)
            first = shown[0]
            page.click("#grid .result >> nth=0")  # more like this
            page.wait_for_function(f"document.getElementById('status').textContent.includes('id:{first}')")
            assert page.eval_on_selector("#grid .result", "c => c.dataset.id") == first  # itself, at distance 0
            assert not errors, errors
        finally:
            browser.close()
