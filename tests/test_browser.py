"""The web page in a real browser (Debian's chromium, driven by Playwright): upload a photo, and the result grid
shows the same items as the CLI for that image, with their product fields; click a result for more like it. The
API docs page lists the operations with no network beyond the server. A screenshot is kept in test-artifacts/
(CI keeps that folder)."""
import json
import subprocess
import sys
from pathlib import Path

from engine.synthetic import make_image_folder
from tests.browser import served_page

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_upload_on_the_page_shows_the_clis_results(shop, tmp_path, cli_env):
    query = make_image_folder(tmp_path / "q", per_class=1, seed=41, start=950, classes=("checker",))[0]
    expected = subprocess.run([sys.executable, "-m", "engine.query", "--catalog", str(shop), "-k", "12", "--json",
                               str(query)], capture_output=True, text=True, env=cli_env, check=True)
    expected_ids = [str(r["id"]) for r in json.loads(expected.stdout)[0]["results"]]
    with served_page(shop, cli_env, viewport={"width": 1100, "height": 900}) as (base, page, errors):
        page.goto(base + "/")
        page.set_input_files("#file", str(query))
        page.wait_for_selector("#grid .result >> nth=11", timeout=60_000)
        shown = page.eval_on_selector_all("#grid .result", "cards => cards.map(c => c.dataset.id)")
        assert shown == expected_ids
        titles = page.eval_on_selector_all("#grid .title", "nodes => nodes.map(n => n.innerHTML)")
        assert titles and all(t.startswith("&lt;b&gt;item ") for t in titles)  # metadata shown as text
        skus = page.eval_on_selector_all("#grid .sku", "nodes => nodes.map(n => n.textContent)")
        assert len(skus) == 12 and all(s.startswith("SKU SKU-") for s in skus)
        names = page.eval_on_selector_all("#grid .name", "nodes => nodes.map(n => [n.textContent, "
                                          "n.scrollWidth <= n.parentElement.clientWidth])")
        assert all(name.endswith(".png") and inside for name, inside in names)  # ellipsis, never overflow
        links = page.evaluate("[productLink('https://shop.example/p?a=1'), productLink('javascript:alert(1)')]"
                              ".map(l => l && l.querySelector('a').href)")
        assert links == ["https://shop.example/p?a=1", None]
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)
        first = shown[0]
        page.click("#grid .result >> nth=0")  # more like this
        page.wait_for_function(f"document.getElementById('status').textContent.includes('id:{first}')")
        assert page.eval_on_selector("#grid .result", "c => c.dataset.id") == first  # itself, at distance 0
        assert not errors, errors


def test_the_api_docs_list_the_operations_offline(shop, cli_env):
    """/docs loads Swagger UI from the server itself: every request to another host is refused here."""
    with served_page(shop, cli_env) as (base, page, _):
        elsewhere = []

        def only_the_server(route):
            if route.request.url.startswith(base):
                return route.continue_()
            elsewhere.append(route.request.url)
            return route.abort()

        page.route("**/*", only_the_server)
        page.goto(base + "/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        operations = page.eval_on_selector_all(
            ".opblock", "blocks => blocks.map(b => b.querySelector('.opblock-summary-method').textContent + ' '"
            " + b.querySelector('.opblock-summary-path').textContent.trim())")
        assert {"POST /search", "GET /search", "POST /items", "DELETE /items/{item_id}"} <= set(operations)
        assert not elsewhere, elsewhere
