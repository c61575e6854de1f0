#!/usr/bin/env python3
"""Independent reference implementation of the Stockpot legacy model's forward pass (docs/model-format.md).

Usage: reference-forward.py MODEL_DIR INPUT.csv OUTPUT.csv
INPUT.csv has one column per model field (header = field names) holding raw text values; OUTPUT.csv gets one
probability column per head. A model with target attention also reads the column named by its `userColumn`: the
user's history, item ids joined by commas, most recent last. Needs numpy and safetensors (pip install numpy safetensors).
"""
import bisect
import csv
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def encoder(field):
    enc = field["encoding"]
    missing = set(field.get("missing", [])) | {""}
    kind = enc["type"]
    if kind == "vocabulary":
        index = {}
        for i, v in enumerate(enc["vocabulary"]):
            index.setdefault(v, i + 1)
        return lambda raw: 0 if raw in missing else index.get(raw, 0)
    if kind == "hashed":
        n = enc["buckets"]
        return lambda raw: 0 if raw in missing else 1 + fnv1a64(raw.encode("utf-8")) % n
    if kind == "buckets":
        boundaries = enc["boundaries"]

        def bucket(raw):
            if raw in missing:
                return 0
            try:
                x = float(raw)
            except ValueError:
                return 0
            if not math.isfinite(x):
                return 0
            return 1 + bisect.bisect_right(boundaries, x)

        return bucket
    raise ValueError(f"unknown encoding {kind}")


def load(model_dir):
    spec = json.load(open(f"{model_dir}/model.json"))
    assert spec["format"] == "stockpot.legacy/1", spec["format"]
    t = load_file(f"{model_dir}/weights.safetensors")
    tables = []
    for f in spec["fields"]:
        name = f["name"]
        if spec["dtype"] == "f32":
            tables.append(t[f"embedding.{name}"])
        else:  # int8-rowwise
            q = t[f"embedding.{name}.q"].astype(np.float32)
            tables.append(q * t[f"embedding.{name}.scale"][:, None] + t[f"embedding.{name}.offset"][:, None])
    layers = [(t[f"mlp.{i}.weight"], t[f"mlp.{i}.bias"]) for i in range(len(spec["hidden"]))]
    heads = [(t[f"head.{h}.weight"], t[f"head.{h}.bias"]) for h in spec["heads"]]
    attention = None
    if spec.get("attention"):
        attention = tuple(t[f"attention.{n}"] for n in ("hidden.weight", "hidden.bias", "output.weight", "output.bias"))
    return spec, tables, layers, heads, attention


def pooled_history(spec, tables, encoders, attention, raw_rows):
    """Target attention: the user's last `length` items scored against the candidate, softmax-pooled."""
    a = spec["attention"]
    item = [f["name"] for f in spec["fields"]].index(a["item"])
    table, enc = tables[item].astype(np.float64), encoders[item]
    w1, b1, w2, b2 = (v.astype(np.float64) for v in attention)
    out = np.zeros((len(raw_rows), table.shape[1]))
    for s, r in enumerate(raw_rows):
        text = r.get(a.get("userColumn", "recent_clicks")) or ""
        ids = [i.strip(" \t") for i in text.split(",") if i.strip(" \t")][-a["length"]:]
        if not ids:
            continue
        h = table[[enc(i) for i in ids]]                       # [len, d]
        c = table[enc(r[a["item"]])]                            # [d]
        u = np.concatenate([h, np.broadcast_to(c, h.shape), h - c, h * c], axis=1)
        scores = np.maximum(u @ w1.T + b1, 0) @ w2.T + b2      # [len, 1]
        e = np.exp(scores[:, 0] - scores.max())
        out[s] = (e / e.sum()) @ h
    return out


def forward(spec, tables, layers, heads, raw_rows, attention=None):
    encoders = [encoder(f) for f in spec["fields"]]
    idx = np.array([[enc(r[f["name"]]) for f, enc in zip(spec["fields"], encoders)] for r in raw_rows], dtype=np.int64)
    x = np.concatenate([tables[j][idx[:, j]] for j in range(len(tables))], axis=1).astype(np.float64)
    if attention is not None:
        x = np.concatenate([x, pooled_history(spec, tables, encoders, attention, raw_rows)], axis=1)
    for w, b in layers:
        x = np.maximum(x @ w.T.astype(np.float64) + b, 0)
    logits = np.concatenate([x @ w.T.astype(np.float64) + b for w, b in heads], axis=1)
    return 1 / (1 + np.exp(-logits))


def main():
    model_dir, inp, out = sys.argv[1:4]
    spec, tables, layers, heads, attention = load(model_dir)
    rows = list(csv.DictReader(open(inp, newline="")))
    p = forward(spec, tables, layers, heads, rows, attention)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(spec["heads"])
        for r in p:
            w.writerow([f"{v:.9g}" for v in r])


if __name__ == "__main__":
    main()
