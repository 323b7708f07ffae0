"""A self-contained HTML page of queries and their results (thumbnails embedded as data URIs)."""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from typing import TYPE_CHECKING

from engine.record import item_image
from training.images import IMAGE_FORMATS, MAX_PIXELS

if TYPE_CHECKING:
    from engine.duplicates import DuplicateItem
    from engine.search import Result

THUMBNAIL = 96


def thumbnail_uri(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.seek(0)
            image.draft("RGB", (THUMBNAIL * 2, THUMBNAIL * 2))  # a JPEG decodes at a reduced scale
            if image.width * image.height > MAX_PIXELS:  # as the search refuses it: no thumbnail
                return None
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL * 2, THUMBNAIL * 2))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def product_html(metadata: dict | None) -> str:
    """The product fields a shop has (title or name, price, SKU, its page as a link), each on its own line, as
    escaped HTML. Only an http(s) URL becomes a link: metadata is data anyone can import."""
    metadata = metadata or {}
    lines = [html.escape(str(value)) for value in (metadata.get("title", metadata.get("name")),
                                                     metadata.get("price")) if value is not None]
    if metadata.get("sku") is not None:
        lines.append(f"SKU {html.escape(str(metadata['sku']))}")
    url = metadata.get("url")
    if isinstance(url, str) and urlsplit(url).scheme.lower() in ("http", "https") and urlsplit(url).hostname:
        lines.append(f'<a href="{html.escape(url)}" rel="noopener noreferrer">'
                     f"{html.escape(urlsplit(url).hostname)}</a>")
    return "".join(f"<br>{line}" for line in lines)


def _figure(path: str | os.PathLike | None, caption: str, kind: str = "") -> str:
    uri = thumbnail_uri(path)
    image = f'<img src="{uri}" alt="">' if uri else '<div class="missing">no image</div>'
    title = ' title="another label than the query\'s"' if kind == "other" else ""
    return f'<figure class="{kind}"{title}>{image}<figcaption>{caption}</figcaption></figure>'


MARK = " Red outline: a result of another label than the query's."
LEGEND = ("<b>ham</b>: Hamming distance between the binary codes (the coarse stage); <b>L2</b>: Euclidean "
          "distance between the features (the re-ranking stage; &ndash; without it). Results are ranked by L2 "
          "within the Hamming pool.")


def write_html(file: str | os.PathLike, queries: list[str], results: list[list[Result]], title: str,
               image_roots: list[str], query_labels: list[str | None] | None = None) -> None:
    """Results show their images only from files inside the catalog's image folders (`image_roots`). Where a
    query's label is known, results of another label are marked."""
    rows = []
    for query, hits, query_label in zip(queries, results, query_labels or [None] * len(queries)):
        said = f"<br>label {html.escape(query_label)}" if query_label is not None else ""
        cells = [_figure(query if Path(query).exists() else None,
                         f"<b>query</b><br>{html.escape(Path(query).name)}{said}")]
        for r in hits:
            distance = f"{r.distance:.3f}" if r.distance is not None else "&ndash;"
            label = html.escape(str(r.label)) if r.label is not None else ""
            other = query_label is not None and r.label is not None and str(r.label) != query_label
            cells.append(_figure(item_image(r.path, image_roots),
                                 f"#{r.rank} {label}{product_html(r.metadata)}<br>ham {r.hamming} &middot; L2 "
                                 f"{distance}", "other" if other else ""))
        rows.append(f'<section><h2>{html.escape(query)}</h2><div class="row">{"".join(cells)}</div></section>')
    Path(file).write_text(_page(title, LEGEND + (MARK if query_labels else ""), rows))


def write_groups_html(file: str | os.PathLike, groups: list[list[DuplicateItem]], title: str,
                      image_roots: list[str]) -> None:
    """A page of duplicate groups (`engine.duplicates`), one row each; images only from `image_roots`."""
    rows = []
    for number, group in enumerate(groups, 1):
        cells = [_figure(item_image(item.path, image_roots),
                         f"{html.escape(str(item.label or ''))}{product_html(item.metadata)}<br>id {item.id}")
                 for item in group]
        rows.append(f'<section><h2>group {number}: {len(group)} items</h2><div class="row">{"".join(cells)}</div>'
                    "</section>")
    legend = ("Groups of near-identical items: each item's code lies within the Hamming radius of another's in its "
              "group, and their features within the maximum distance." if groups else "No duplicates found.")
    Path(file).write_text(_page(title, legend, rows))


def _page(title: str, legend: str, sections: list[str]) -> str:
    """The self-contained page around rows of figures; `legend`: HTML."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }}
h1 {{ font-size: 1.3rem; }} h2 {{ font-size: .9rem; font-weight: normal; color: #555; overflow-wrap: anywhere; }}
.row {{ display: flex; flex-wrap: wrap; gap: .6rem; }}
figure {{ margin: 0; width: {THUMBNAIL}px; font-size: .72rem; text-align: center; }}
figcaption {{ overflow-wrap: anywhere; }}
figure:first-child {{ outline: 3px solid #2a7; }}
figure.other img, figure.other .missing {{ outline: 3px solid #d33; }}
figure.other figcaption {{ color: #b00; }}
.legend {{ font-size: .8rem; color: #555; }}
img, .missing {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; object-fit: contain; background: #eee;
  image-rendering: pixelated; display: block; }}
</style></head><body><h1>{html.escape(title)}</h1><p class="legend">{legend}</p>
{"".join(sections)}</body></html>
"""
