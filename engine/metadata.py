"""Product metadata (SKU, title, price, URL, ...) is free-form JSON that anyone may send to the service or import.
One check decides what may be stored, so that every later answer (search JSON, the CLI, the pages) can print it:
finite numbers only (NaN or Infinity would break every JSON answer that includes the item), bounded nesting (a
deep value would overflow the stack of whoever reads it) and a bounded size.
"""
from __future__ import annotations

import json
import math

from engine.errors import InputError

MAX_METADATA_BYTES = 64 << 10  # serialized as UTF-8 JSON
MAX_METADATA_DEPTH = 32  # the object itself is level 1


def check_product_metadata(value: object, where: str = "metadata") -> dict | None:
    """`value` itself when it is a JSON object (or None) that may be stored; else InputError in one line."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(value).__name__}")
    _check_values(value, where)
    size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise InputError(f"{where}: {size} bytes as JSON, over the {MAX_METADATA_BYTES >> 10} KiB limit")
    return value


def parse_product_metadata(text: str | None, where: str = "metadata") -> dict | None:
    """Metadata from JSON text (None or empty: none); NaN and Infinity literals are refused while parsing."""
    if text is None or text == "":
        return None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise InputError(f"{where}: over the {MAX_METADATA_BYTES >> 10} KiB limit")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not JSON ({error})") from None
    except ValueError as error:  # a refused constant, or an integer of more digits than Python converts
        raise InputError(f"{where}: {error}") from None
    except RecursionError:
        raise InputError(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels") from None
    return check_product_metadata(value, where)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number; JSON numbers must be finite")


def _check_values(value: dict, where: str) -> None:
    """Every value inside `value`, without recursion (the depth is what is being checked)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_METADATA_DEPTH:
                raise InputError(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels")
            if isinstance(node, dict):
                if not all(isinstance(key, str) for key in node):
                    raise InputError(f"{where}: object keys must be strings")
                children = node.values()
            else:
                children = node
            pending.extend((child, depth + 1) for child in children)
        elif isinstance(node, float) and not math.isfinite(node):
            raise InputError(f"{where}: {node} is not a finite number; numbers must be finite")
        elif node is not None and not isinstance(node, (str, int, float)):  # bool is an int
            raise InputError(f"{where}: a {type(node).__name__} is not a JSON value")
