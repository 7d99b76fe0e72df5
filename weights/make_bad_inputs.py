#!/usr/bin/env python3
"""Build tests/bad_inputs/images/: a corpus of awkward, broken and hostile image files (and a few
good ones in unusual encodings) that tests/image_input.rs feeds to marrow's image loader.

    python3 weights/make_bad_inputs.py [--out tests/bad_inputs/images]

The pictures are crops of tests/fixtures/jpeg/q95_420_255x191.jpg (itself a crop of a real
TXL-PBC field; see that folder's README), so run weights/make_jpeg_fixture.py first. Needs Pillow
and numpy. Deterministic.

Writes expected.json: for every file that should decode, PIL's view of its pixels (SHA-256 of
the RGB bytes: np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))), or, for the
16-bit files, where PIL is inconsistent (it keeps the high byte of 16-bit RGB and clips 16-bit
grey to 255), the hash of the 16-bit samples rounded as marrow does, (x + 128) // 257, computed
here with numpy from the samples written. Which files must fail, and how, is the test's table.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "tests", "fixtures", "jpeg", "q95_420_255x191.jpg")


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pil_rgb(p: str) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(w: int, h: int, depth: int, colour: int, idat: bytes) -> bytes:
    """A PNG from its parts: IHDR as given, one IDAT holding `idat` verbatim, IEND."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [h, w] or RGB [h, w, 3]); Pillow cannot write 16-bit RGB."""
    h, w = a.shape[:2]
    colour = 0 if a.ndim == 2 else 2
    rows = a.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    return png_raw(w, h, 16, colour, zlib.compress(raw, 9))


def tiff_rgb16(a: np.ndarray) -> bytes:
    """A minimal uncompressed little-endian 16-bit RGB TIFF (one strip)."""
    h, w, _ = a.shape
    data = a.astype("<u2").tobytes()
    n_tags = 10
    ifd_at = 8
    bits_at = ifd_at + 2 + 12 * n_tags + 4
    data_at = bits_at + 6
    tags = [
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, data_at), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]
    out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", n_tags)
    for tag, typ, count, value in tags:
        v = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + v
    out += struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16)
    assert len(out) == data_at
    return out + data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "bad_inputs", "images"))
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        if f != "README.md":
            os.remove(os.path.join(out, f))
    src = Image.open(SOURCE).convert("RGB")
    rng = np.random.default_rng(7)

    def part(x: int, y: int, w: int, h: int) -> Image.Image:
        return src.crop((x, y, x + w, y + h))

    def write(name: str, data: bytes) -> str:
        p = os.path.join(out, name)
        with open(p, "wb") as fh:
            fh.write(data)
        return p

    def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    good: dict[str, dict] = {}

    def expect_pil(name: str, note: str) -> None:
        a = pil_rgb(os.path.join(out, name))
        good[name] = {"width": a.shape[1], "height": a.shape[0], "sha256": sha(a), "note": note}

    def expect_rounded(name: str, a16: np.ndarray, note: str) -> None:
        a8 = ((a16.astype(np.uint32) + 128) // 257).astype(np.uint8)
        if a8.ndim == 2:
            a8 = np.repeat(a8[:, :, None], 3, axis=2)
        good[name] = {"width": a8.shape[1], "height": a8.shape[0], "sha256": sha(a8), "note": note}

    # --- files that must decode ---------------------------------------------------------------
    pal = part(10, 20, 64, 48).quantize(16)
    pal.info["transparency"] = 0
    write("palette_trns.png", encoded(pal, "PNG", transparency=0))
    expect_pil("palette_trns.png", "16-colour palette PNG with a transparent entry: palette colours, alpha dropped")
    la = part(40, 30, 40, 36).convert("LA")
    write("grey_alpha.png", encoded(la, "PNG"))
    expect_pil("grey_alpha.png", "grey + alpha PNG: grey replicated, alpha dropped")
    rgba = part(80, 50, 40, 33).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 33)))
    write("rgba.png", encoded(rgba, "PNG"))
    expect_pil("rgba.png", "RGBA PNG with varying alpha: alpha dropped, not composited")
    write("png_named.jpg", encoded(part(0, 0, 45, 40), "PNG"))
    expect_pil("png_named.jpg", "a PNG named .jpg: the content decides")
    write("rgb24.bmp", encoded(part(120, 100, 37, 33), "BMP"))
    expect_pil("rgb24.bmp", "24-bit BMP, odd width (padded rows)")
    write("cmyk.jpg", encoded(part(60, 60, 50, 42).convert("CMYK"), "JPEG", quality=90))
    expect_pil("cmyk.jpg", "CMYK JPEG: converted as PIL converts it")
    frames = [part(0, 0, 48, 40), part(100, 100, 48, 40)]
    write("animated.png", encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0))
    expect_pil("animated.png", "APNG, 2 frames: the first frame, as Image.open shows")
    write("two_pages.tif", encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:]))
    expect_pil("two_pages.tif", "2-page TIFF: the first page, as Image.open shows")
    write("orient6.tif", encoded(part(150, 20, 52, 36), "TIFF", tiffinfo={274: 6}))
    expect_pil("orient6.tif", "TIFF with Orientation 6: rotated, as ImageOps.exif_transpose does")
    base = np.asarray(part(30, 90, 44, 34), dtype=np.uint16)
    rgb16 = base * 256 + rng.integers(0, 256, base.shape, dtype=np.uint16)
    write("rgb16.tif", tiff_rgb16(rgb16))
    expect_rounded("rgb16.tif", rgb16, "16-bit RGB TIFF: (x + 128) // 257 (PIL keeps the high byte)")
    write("rgb16.png", png16(rgb16))
    expect_rounded("rgb16.png", rgb16, "16-bit RGB PNG: (x + 128) // 257 (PIL keeps the high byte)")
    grey16 = rgb16[:, :, 1]
    write("grey16.png", png16(grey16))
    expect_rounded("grey16.png", grey16, "16-bit grey PNG: (x + 128) // 257 (PIL clips to 255)")

    # --- files that must be refused -------------------------------------------------------------
    jpeg = encoded(part(0, 0, 96, 80), "JPEG", quality=90)
    write("truncated.jpg", jpeg[: len(jpeg) * 6 // 10])
    sof = jpeg.index(b"\xff\xc0")
    scan = jpeg.rindex(b"\xff\xda")
    corrupt = bytearray(jpeg)
    corrupt[scan + 40 : scan + 48] = b"\xff\x12\x00\xff\x00\xff\xfe\x00"
    write("corrupt_scan.jpg", bytes(corrupt))
    deep = bytearray(jpeg)
    deep[sof + 4] = 12  # sample precision: libjpeg's error_exit ("Unsupported JPEG data precision 12")
    write("precision12.jpg", bytes(deep))
    png = encoded(part(0, 0, 96, 80), "PNG")
    write("truncated.png", png[: len(png) * 6 // 10])
    write("empty.png", b"")
    write("notes.png", b"Sample 17, smear B: 112 neutrophils, 9 lymphocytes.\n")
    tiny = zlib.compress(b"\x00" * 64)
    write("bomb_100000x100000.png", png_raw(100_000, 100_000, 8, 2, tiny))
    write("bomb_16384x16384.png", png_raw(16_384, 16_384, 8, 2, tiny))
    bomb = bytearray(jpeg)
    bomb[sof + 5 : sof + 9] = struct.pack(">HH", 16_000, 16_000)  # height, width
    write("bomb_16000x16000.jpg", bytes(bomb))
    write("1x1.png", encoded(part(0, 0, 1, 1), "PNG"))
    write("10x5.png", encoded(part(0, 0, 10, 5), "PNG"))
    wide = zlib.compress(b"".join(b"\x00" + b"\x00" * 300_000 for _ in range(10)), 9)
    write("wide_100000x10.png", png_raw(100_000, 10, 8, 2, wide))
    write("animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0))
    bmp = bytearray(encoded(part(0, 0, 37, 33), "BMP"))
    bmp[18:26] = struct.pack("<ii", 2_000_000_000, -2_000_000_000)
    write("absurd_header.bmp", bytes(bmp[:200]))
    ifd = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0x7FFF) + bytes(rng.integers(0, 256, 300, dtype=np.uint8))
    write("garbage_ifd.tif", ifd)

    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump(good, fh, indent=1, sort_keys=True)
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{len(os.listdir(out)) - 1} files ({len(good)} that decode), {total} bytes in {out}")


if __name__ == "__main__":
    main()
