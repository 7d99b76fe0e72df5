#!/usr/bin/env python3
"""Build tests/fixtures/jpeg/: small JPEGs made by PIL from crops of real TXL-PBC fields, and
PIL's decoded pixels for each (SHA-256 of the RGB bytes plus a few sample values), so that
tests/image_input.rs can check marrow's JPEG decoder against PIL bit for bit.

    python3 weights/make_jpeg_fixture.py --txl-pbc DATASET_ROOT [--out tests/fixtures/jpeg]

DATASET_ROOT is a checkout of the TXL-PBC dataset (github.com/nicoaira/TXL-PBC_Dataset, MIT);
fields are taken from DATASET_ROOT/images/val, among the files that are JPEG inside (most ".png"
files there are), found by their magic bytes. Needs Pillow (built with libjpeg-turbo, as the
wheels are) and numpy. Deterministic: same dataset and Pillow/libjpeg-turbo, same bytes.

The expected pixels are what the reference tools feed torchvision:
np.asarray(Image.open(p).convert("RGB")); for the EXIF-rotated file, after
ImageOps.exif_transpose (PIL's Image.open does not apply EXIF orientation; marrow does).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

import numpy as np
from PIL import Image, ImageOps, features

JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_fields(root: str) -> list[str]:
    """One JPEG-inside val file per distinct field size (sorted names), then the rest."""
    d = os.path.join(root, "images", "val")
    files = []
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        with open(p, "rb") as fh:
            if fh.read(3) == JPEG_MAGIC:
                files.append(p)
    by_size: dict[tuple[int, int], str] = {}
    for p in files:
        by_size.setdefault(Image.open(p).size, p)
    firsts = [by_size[s] for s in sorted(by_size)]
    return firsts + [p for p in files if p not in firsts]


def crop(p: str, w: int, h: int, fx: float = 0.5, fy: float = 0.5) -> Image.Image:
    """A w×h crop of the decoded field, centred at (fx, fy) of its size."""
    im = Image.open(p).convert("RGB")
    x0 = int(round((im.width - w) * fx))
    y0 = int(round((im.height - h) * fy))
    return im.crop((x0, y0, x0 + w, y0 + h))


def expected(p: str, transpose: bool = False) -> dict:
    im = Image.open(p)
    if transpose:
        im = ImageOps.exif_transpose(im)
    a = np.ascontiguousarray(np.asarray(im.convert("RGB")))
    h, w, _ = a.shape
    points = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (w // 2, h // 2), (w // 3, (2 * h) // 3)]
    return {
        "width": w,
        "height": h,
        "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        "samples": [[x, y, *map(int, a[y, x])] for x, y in points],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--txl-pbc", required=True, help="root of a TXL-PBC dataset checkout (images/val)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "jpeg"))
    args = ap.parse_args()
    assert features.check_feature("libjpeg_turbo"), "Pillow must be built with libjpeg-turbo"
    os.makedirs(args.out, exist_ok=True)
    fields = jpeg_fields(args.txl_pbc)
    a, b, c, d = fields[:4]
    sizes = {os.path.basename(p): Image.open(p).size for p in (a, b, c, d)}
    print("fields:", sizes)

    cases = []

    def save(name: str, im: Image.Image, note: str, transpose: bool = False, **kw) -> None:
        p = os.path.join(args.out, name)
        im.save(p, "JPEG", **kw)
        cases.append({"file": name, "note": note, **expected(p, transpose)})

    # Odd sizes everywhere: the chroma planes' last column / row is where fancy upsampling has
    # its edge cases.
    save("q75_420_61x47.jpg", crop(a, 61, 47), "quality 75, 4:2:0", quality=75, subsampling="4:2:0")
    save("q95_444_73x55.jpg", crop(b, 73, 55), "quality 95, 4:4:4", quality=95, subsampling="4:4:4")
    save("q90_422_57x41.jpg", crop(c, 57, 41), "quality 90, 4:2:2", quality=90, subsampling="4:2:2")
    save("q95_420_255x191.jpg", crop(d, 255, 191, 0.3, 0.6), "quality 95, 4:2:0, a larger crop",
         quality=95, subsampling="4:2:0")
    save("grey_q85_45x39.jpg", crop(d, 45, 39, 0.7, 0.3).convert("L"), "greyscale (1 component)", quality=85)
    save("progressive_q80_420_67x53.jpg", crop(a, 67, 53, 0.2, 0.8), "progressive, quality 80, 4:2:0",
         quality=80, subsampling="4:2:0", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    save("exif6_q85_420_59x43.jpg", crop(b, 59, 43, 0.8, 0.2), "EXIF orientation 6 (stored 59×43, shown 43×59)",
         transpose=True, quality=85, subsampling="4:2:0", exif=exif.tobytes())
    save("cmyk_q90_48x40.jpg", crop(c, 48, 40, 0.1, 0.1).convert("CMYK"),
         "CMYK (Adobe-inverted, as PIL writes and reads it)", quality=90)
    save("restart_q85_420_66x50.jpg", crop(a, 66, 50, 0.9, 0.4), "restart markers every MCU row, quality 85, 4:2:0",
         quality=85, subsampling="4:2:0", restart_marker_rows=1)

    # One field as published, untouched: the smallest JPEG-inside val file (named .png, like most).
    smallest = min(fields, key=os.path.getsize)
    name = "txl-pbc_" + os.path.basename(smallest)
    shutil.copyfile(smallest, os.path.join(args.out, name))
    cases.append({"file": name, "note": "an unmodified TXL-PBC val field (JPEG inside, .png name)",
                  **expected(os.path.join(args.out, name))})

    with open(os.path.join(args.out, "expected.json"), "w") as fh:
        json.dump({"pillow": Image.__version__, "libjpeg_turbo": features.version_feature("libjpeg_turbo"),
                   "cases": cases}, fh, indent=1)
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"{len(cases)} fixtures, {total} bytes in {args.out}")


if __name__ == "__main__":
    main()
