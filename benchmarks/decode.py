"""Decoding a photo to the model's input: ms per image and per megapixel, by format and decoder, side by side.

  python benchmarks/decode.py --size 224 --photo 1600x1200 --rounds 5 --repeat 10

A 1600x1200 photo-like image (indexing.py's scene, upscaled with sensor-like noise) as JPEG (quality 90), PNG and
WebP (quality 90), decoded to a (3, 224, 224) input by:
- `baseline`: training/images.py as committed at `--baseline` (default HEAD), loaded from git;
- `current`: training/images.py in this tree;
- `gap2`: current decoding with the final resize told `reducing_gap=2` (Pillow box-reduces first): what changing
  the resampling would save on PNG and WebP, which no Pillow decoder can scale;
- `simplejpeg`, `turbojpeg` (JPEG only, where installed): libjpeg-turbo's own bindings at the same DCT scale as
  Pillow's draft, then the same centre fit (no EXIF, pixel limit or crop: an upper bound on what they save).
Variants alternate within each round (A B C A B C ...), so the shared host's swings hit all alike; the table
gives medians, the ratio to the baseline and the mean absolute pixel difference from the baseline's input. A
last row times refusing a PNG over the pixel limit (`baseline` decoded it first).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from common import ROOT, machine
from training import images as current

FORMATS = {"JPEG": dict(quality=90), "PNG": {}, "WEBP": dict(quality=90)}
Decoder = Callable[[bytes], np.ndarray]


def committed_images(revision: str):
    """training/images.py as committed at `revision`, imported as its own module."""
    source = subprocess.run(["git", "show", f"{revision}:training/images.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="decode-baseline-")) / "images_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("images_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["images_baseline"] = module
    spec.loader.exec_module(module)
    return module


def photo(width: int, height: int) -> Image.Image:
    from engine.synthetic import draw

    rng = np.random.default_rng(0)
    scene = np.asarray(draw("dots", 128, rng).resize((width, height), Image.BICUBIC), np.int16)
    return Image.fromarray(np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8))


def encoded(image: Image.Image, form: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=form, **FORMATS[form])
    return buffer.getvalue()


def centre_fit(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(ImageOps.fit(Image.fromarray(pixels), (size, size), Image.Resampling.BILINEAR))


def gap2(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        side = min(image.size)
        box = ((image.width - side) / 2, (image.height - side) / 2, (image.width + side) / 2,
               (image.height + side) / 2)
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box,
                                                      reducing_gap=2.0))


def decoders(size: int, baseline) -> dict[str, dict[str, Decoder]]:
    """Per variant, per format it can decode: bytes -> (size, size, 3) uint8."""
    def whole(module) -> Decoder:
        return lambda data: module.load_image_bytes(data, size).permute(1, 2, 0).numpy()

    every = {form: None for form in FORMATS}
    found = {"baseline": dict.fromkeys(every, whole(baseline)), "current": dict.fromkeys(every, whole(current)),
             "gap2": dict.fromkeys(every, lambda data: gap2(data, size))}
    try:
        import simplejpeg
        found["simplejpeg"] = {"JPEG": lambda data: centre_fit(simplejpeg.decode_jpeg(
            data, "RGB", min_height=size, min_width=size), size)}
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        turbo = TurboJPEG()

        def turbo_decode(data: bytes) -> np.ndarray:
            width, height, _, _ = turbo.decode_header(data)
            scale = next(f for f in ((1, 8), (1, 4), (1, 2), (1, 1)) if min(width, height) * f[0] // f[1] >= size)
            return centre_fit(turbo.decode(data, pixel_format=TJPF_RGB, scaling_factor=scale), size)
        found["turbojpeg"] = {"JPEG": turbo_decode}
    except (ImportError, RuntimeError, OSError):  # RuntimeError: the package is there, libturbojpeg is not
        pass
    return found


def measure(files: dict[str, bytes], variants: dict[str, dict[str, Decoder]], rounds: int, repeat: int) -> dict:
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for form, data in files.items():
            for name, by_format in variants.items():
                if form in by_format:
                    by_format[form](data)  # warm
                    start = time.perf_counter()
                    for _ in range(repeat):
                        by_format[form](data)
                    samples.setdefault((form, name), []).append((time.perf_counter() - start) / repeat)
    return {key: statistics.median(values) for key, values in samples.items()}


def refusal_ms(module, size: int) -> float:
    """Seconds to refuse a 4000x3000 PNG with a limit of 10 megapixels (median of 5)."""
    data = encoded(photo(4000, 3000), "PNG")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        try:
            module.load_image_bytes(data, size, max_pixels=10_000_000)
        except module.BadImage:
            pass
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--photo", default="1600x1200", help="WIDTHxHEIGHT of the photo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="decodes per variant per round")
    parser.add_argument("--baseline", default="HEAD", help="git revision of training/images.py to compare with")
    args = parser.parse_args()
    width, height = (int(side) for side in args.photo.split("x"))
    baseline = committed_images(args.baseline)
    image = photo(width, height)
    files = {form: encoded(image, form) for form in FORMATS}
    variants = decoders(args.size, baseline)
    print(f"machine: {machine()}; {width}x{height} -> {args.size} px; variants: {', '.join(variants)}")
    medians = measure(files, variants, args.rounds, args.repeat)
    megapixels = width * height / 1e6
    rows = []
    print("\n| format | bytes | decoder | ms / image | ms / megapixel | vs baseline | mean abs diff |")
    print("|---|---|---|---|---|---|---|")
    for (form, name), seconds in medians.items():
        reference = variants["baseline"][form](files[form]).astype(np.int16)
        diff = float(np.abs(variants[name][form](files[form]).astype(np.int16) - reference).mean())
        ratio = medians[(form, "baseline")] / seconds
        rows.append(dict(format=form, decoder=name, ms=1000 * seconds, ms_per_mp=1000 * seconds / megapixels,
                         speedup=ratio, mean_abs_diff=diff))
        print(f"| {form} | {len(files[form]):,} | {name} | {1000 * seconds:.2f} | {1000 * seconds / megapixels:.2f} "
              f"| {ratio:.2f}x | {diff:.3f} |")
    refused = {name: refusal_ms(module, args.size) for name, module in (("baseline", baseline), ("current", current))}
    print(f"\nrefusing a 4000x3000 PNG over a 10-megapixel limit: baseline {refused['baseline']:.1f} ms, "
          f"current {refused['current']:.2f} ms")
    print(json.dumps(dict(rows=rows, refusal_ms=refused)))


if __name__ == "__main__":
    main()
