"""A self-contained HTML page of queries and their results (thumbnails embedded as data URIs)."""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from typing import TYPE_CHECKING

from engine.record import item_image

if TYPE_CHECKING:
    from engine.search import Result

THUMBNAIL = 96
PRODUCT_FIELDS = ("title", "price")  # product metadata shown under a result, where an item has them


def thumbnail_uri(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL * 2, THUMBNAIL * 2))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


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
            product = "".join(f"<br>{html.escape(str(r.metadata[k]))}" for k in PRODUCT_FIELDS
                              if r.metadata and r.metadata.get(k) is not None)
            cells.append(_figure(item_image(r.path, image_roots),
                                 f"#{r.rank} {label}{product}<br>ham {r.hamming} &middot; L2 {distance}",
                                 "other" if other else ""))
        rows.append(f'<section><h2>{html.escape(query)}</h2><div class="row">{"".join(cells)}</div></section>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }}
h1 {{ font-size: 1.3rem; }} h2 {{ font-size: .9rem; font-weight: normal; color: #555; }}
.row {{ display: flex; flex-wrap: wrap; gap: .6rem; }}
figure {{ margin: 0; width: {THUMBNAIL}px; font-size: .72rem; text-align: center; }}
figure:first-child {{ outline: 3px solid #2a7; }}
figure.other img, figure.other .missing {{ outline: 3px solid #d33; }}
figure.other figcaption {{ color: #b00; }}
.legend {{ font-size: .8rem; color: #555; }}
img, .missing {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; object-fit: contain; background: #eee;
  image-rendering: pixelated; display: block; }}
</style></head><body><h1>{html.escape(title)}</h1><p class="legend">{LEGEND}{MARK if query_labels else ""}</p>
{"".join(rows)}</body></html>
"""
    Path(file).write_text(page)
