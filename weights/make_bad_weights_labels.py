#!/usr/bin/env python3
"""Write the bad-weights and bad-labels corpus under tests/bad_inputs/{weights,labels}/ (small,
deterministic files) and its manifest `expected.json`: for each file, a substring its error
message must contain. `tests/bad_input_corpus.rs` feeds every file to marrow and requires an
error naming the file and the problem, and no panic.

    python3 weights/make_bad_weights_labels.py
"""
from __future__ import annotations

import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "bad_inputs")
SEEDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                      "seeded_model.safetensors")


def st(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def seeded_meta() -> dict:
    b = open(SEEDED, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n])["__metadata__"]


def with_config(**changes) -> bytes:
    meta = dict(seeded_meta())
    cfg = json.loads(meta["marrow.config"])
    cfg.update(changes)
    meta["marrow.config"] = json.dumps(cfg, separators=(",", ":"))
    return st({"__metadata__": meta})


def main():
    wdir, ldir = os.path.join(ROOT, "weights"), os.path.join(ROOT, "labels")
    os.makedirs(wdir, exist_ok=True)
    os.makedirs(ldir, exist_ok=True)
    f32 = lambda vals: struct.pack(f"<{len(vals)}f", *vals)  # noqa: E731
    weights = {
        "empty.safetensors": (b"", "too short"),
        "five_bytes.safetensors": (b"\x01\x02\x03\x04\x05", "too short"),
        "header_len_huge.safetensors": (struct.pack("<Q", 2**63) + b"{}", "header"),
        "header_not_json.safetensors": (struct.pack("<Q", 16) + b"{{{{{{{{{{{{{{{{", "header"),
        "header_truncated.safetensors": (struct.pack("<Q", 200) + b'{"a":{"dtype":"F32"', "header"),
        "offsets_past_end.safetensors": (
            st({"backbone.body.conv1.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "",
        ),
        "overlapping_tensors.safetensors": (
            st({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
            "",
        ),
        "int_weights.safetensors": (
            st({"backbone.body.conv1.weight": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "I32",
        ),
        "nan_weights.safetensors": (
            st({"backbone.body.bn1.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
               f32([1.0, float("nan")])),
            "backbone.body.bn1.weight",
        ),
        "not_a_detector.safetensors": (
            st({"classifier.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32([1.0, 2.0])),
            "not a Faster R-CNN",
        ),
        "config_unknown_field.safetensors": (with_config(bogus=1), "bogus"),
        "config_min_size_0.safetensors": (with_config(transform={"min_size": 0}), "min_size"),
        "config_from_the_future.safetensors": (with_config(format_version=99), "format_version"),
        "config_lineage_unknown_class.safetensors": (with_config(lineage={"megakaryocyte": "myeloid"}), "lineage"),
        "config_too_few_class_names.safetensors": (with_config(class_names=["__background__", "WBC"]), "class"),
        "config_not_json.safetensors": (st({"__metadata__": {"marrow.config": "{not json"}}), "marrow.config"),
    }
    labels = {
        "yolo_four_fields.txt": (b"0 0.5 0.5 0.1\n", "line 1"),
        "yolo_nan.txt": (b"1 0.5 0.5 0.1 0.1\n1 nan 0.5 0.1 0.1\n", "line 2"),
        "yolo_negative_size.txt": (b"1 0.5 0.5 -0.1 0.1\n", "line 1"),
        "yolo_centre_outside.txt": (b"0 1.5 0.5 0.1 0.1\n", "line 1"),
        "yolo_unknown_class.txt": (b"7 0.5 0.5 0.1 0.1\n", "7"),
        "yolo_negative_class.txt": (b"-1 0.5 0.5 0.1 0.1\n", "line 1"),
        "yolo_not_utf8.txt": (b"0 0.5 \xff\xfe 0.1 0.1\n", "UTF-8"),
        "yolo_prose.txt": (b"these are the cells I saw\n", "line 1"),
        "coco_not_json.json": (b"{\"images\": [", "not COCO JSON"),
        "coco_unknown_image.json": (json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "WBC"}]}).encode(), "image"),
        "coco_short_bbox.json": (json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5]}],
            "categories": [{"id": 1, "name": "WBC"}]}).encode(), "bbox"),
        "coco_unknown_category.json": (json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "megakaryocyte"}]}).encode(), "megakaryocyte"),
        "coco_negative_width.json": (json.dumps({
            "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, -5, 5]}],
            "categories": [{"id": 1, "name": "WBC"}]}).encode(), "bbox"),
    }
    manifest = {"weights": {}, "labels": {}}
    for name, (data, needle) in weights.items():
        with open(os.path.join(wdir, name), "wb") as f:
            f.write(data)
        manifest["weights"][name] = needle
    for name, (data, needle) in labels.items():
        with open(os.path.join(ldir, name), "wb") as f:
            f.write(data)
        manifest["labels"][name] = needle
    with open(os.path.join(ROOT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{len(weights)} weights files, {len(labels)} label files")


if __name__ == "__main__":
    main()
