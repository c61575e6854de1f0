#!/usr/bin/env python3
"""Peer benchmark: the Stockpot legacy model trained by PyTorch, on the same samples, from the same weights.

Usage: peer-pytorch-train.py MODEL_DIR ROWS.bin LABELS.bin BATCH THREADS

MODEL_DIR holds model.json + weights.safetensors (docs/model-format.md, F32), the starting point. ROWS.bin is
every sample's embedding row per field (int32 little-endian, fields per sample, in training order), LABELS.bin
its labels (float32, one per head). The model is the same: one embedding table per field (sparse gradients),
concatenated, ReLU MLP, one logit per head, binary cross-entropy summed over heads and averaged over the batch;
the optimiser is Stockpot's default, Adagrad (accumulator from 0, eps 1e-8) with learning rate 0.01 for the
dense layers and 0.05 for the embeddings. One pass in file order over batches of BATCH (the last one partial)
on THREADS threads; prints one JSON line with samples/s (the first 3 batches, warm-up, are not timed) and the
mean batch loss over every batch, as Stockpot's trainer reports it.

Needs numpy, safetensors and torch (pip install numpy safetensors torch).
"""
import json
import sys
import time

import numpy as np
import torch
from safetensors.numpy import load_file


def main():
    model_dir, rows_path, labels_path, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    spec = json.load(open(f"{model_dir}/model.json"))
    if spec["dtype"] != "f32" or spec.get("denseInputs"):
        raise SystemExit("the peer trains F32 legacy models only")
    t = load_file(f"{model_dir}/weights.safetensors")
    fields = spec["fields"]
    heads = spec["heads"]
    tables = torch.nn.ModuleList()
    for f in fields:
        w = torch.from_numpy(t[f"embedding.{f['name']}"].copy())
        e = torch.nn.Embedding(w.shape[0], w.shape[1], sparse=True)
        e.weight.data.copy_(w)
        tables.append(e)
    layers = []
    for i in range(len(spec["hidden"])):
        w, b = t[f"mlp.{i}.weight"], t[f"mlp.{i}.bias"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(torch.from_numpy(w.copy()))
        lin.bias.data.copy_(torch.from_numpy(b.copy()))
        layers += [lin, torch.nn.ReLU()]
    hw = np.concatenate([t[f"head.{h}.weight"] for h in heads], axis=0)
    hb = np.concatenate([t[f"head.{h}.bias"] for h in heads], axis=0)
    head = torch.nn.Linear(hw.shape[1], hw.shape[0])
    head.weight.data.copy_(torch.from_numpy(hw))
    head.bias.data.copy_(torch.from_numpy(hb))
    mlp = torch.nn.Sequential(*layers, head)

    rows = torch.from_numpy(np.fromfile(rows_path, dtype="<i4").astype(np.int64).reshape(-1, len(fields)))
    labels = torch.from_numpy(np.fromfile(labels_path, dtype="<f4").reshape(-1, len(heads)))
    if len(rows) != len(labels):
        raise SystemExit(f"{len(rows)} samples of rows, {len(labels)} of labels")
    sparse = torch.optim.Adagrad(tables.parameters(), lr=0.05, eps=1e-8, initial_accumulator_value=0)
    dense = torch.optim.Adagrad(mlp.parameters(), lr=0.01, eps=1e-8, initial_accumulator_value=0)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")

    def step(s):
        r, y = rows[s:s + batch], labels[s:s + batch]
        x = torch.cat([tables[j](r[:, j]) for j in range(len(fields))], dim=1)
        loss = loss_fn(mlp(x), y).sum(dim=1).mean()
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        sparse.step()
        dense.step()
        return loss.item()

    starts = list(range(0, len(rows), batch))
    if len(starts) < 4:
        raise SystemExit(f"need more than {3 * batch} samples")
    total = sum(step(s) for s in starts[:3])
    done, begin = 0, time.perf_counter()
    for s in starts[3:]:
        total += step(s)
        done += min(batch, len(rows) - s)
    elapsed = time.perf_counter() - begin
    print(json.dumps({
        "peer": f"pytorch {torch.__version__}",
        "threads": threads,
        "samples_per_s": done / elapsed,
        "mean_loss": total / len(starts),
    }), flush=True)


if __name__ == "__main__":
    main()
