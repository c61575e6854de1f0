#!/usr/bin/env python3
"""Peer benchmark: the Stockpot legacy model's forward pass exported to ONNX and run by ONNX Runtime.

Usage: peer-onnxruntime.py MODEL_DIR ROWS.bin FIELDS BATCH SECONDS [--onnx OUT.onnx]

MODEL_DIR holds model.json + weights.safetensors (docs/model-format.md; INT8 tables are dequantised into the
graph). ROWS.bin is the embedding row index of every field of every candidate, int32 little-endian, FIELDS per
candidate, encoded by Stockpot from the raw requests (ONNX Runtime has no encoder for raw values). The graph is
the whole model per candidate: one Gather per field, Concat, Gemm+Relu per hidden layer, Gemm for the heads,
Sigmoid. It runs on one thread (intra- and inter-op) over consecutive batches of BATCH candidates for at least
SECONDS, and prints one JSON line: candidates/s, and the probabilities of the first batch for comparison.

Needs numpy, safetensors, onnx and onnxruntime (pip install numpy safetensors onnx onnxruntime).
"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


def load(model_dir):
    spec = json.load(open(f"{model_dir}/model.json"))
    assert spec["format"] == "stockpot.legacy/1", spec["format"]
    if spec.get("denseInputs"):
        raise SystemExit("models with dense inputs (correctors) are not exported")
    t = load_file(f"{model_dir}/weights.safetensors")
    tables = []
    for f in spec["fields"]:
        name = f["name"]
        if spec["dtype"] == "f32":
            tables.append(t[f"embedding.{name}"].astype(np.float32))
        else:  # int8-rowwise
            q = t[f"embedding.{name}.q"].astype(np.float32)
            tables.append((q * t[f"embedding.{name}.scale"][:, None] + t[f"embedding.{name}.offset"][:, None]).astype(np.float32))
    layers = [(t[f"mlp.{i}.weight"], t[f"mlp.{i}.bias"]) for i in range(len(spec["hidden"]))]
    hw = np.concatenate([t[f"head.{h}.weight"] for h in spec["heads"]], axis=0)
    hb = np.concatenate([t[f"head.{h}.bias"] for h in spec["heads"]], axis=0)
    return spec, tables, layers, (hw, hb)


def graph(spec, tables, layers, heads):
    inits, nodes = [], []
    for j, table in enumerate(tables):
        inits.append(numpy_helper.from_array(table, f"table{j}"))
        inits.append(numpy_helper.from_array(np.array(j, dtype=np.int64), f"col{j}"))
        nodes.append(helper.make_node("Gather", ["rows", f"col{j}"], [f"idx{j}"], axis=1))
        nodes.append(helper.make_node("Gather", [f"table{j}", f"idx{j}"], [f"emb{j}"], axis=0))
    nodes.append(helper.make_node("Concat", [f"emb{j}" for j in range(len(tables))], ["h0"], axis=1))
    x = "h0"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"], transB=1))
        nodes.append(helper.make_node("Relu", [f"z{i}"], [f"a{i}"]))
        x = f"a{i}"
    inits += [numpy_helper.from_array(heads[0], "hw"), numpy_helper.from_array(heads[1], "hb")]
    nodes.append(helper.make_node("Gemm", [x, "hw", "hb"], ["logits"], transB=1))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["probs"]))
    g = helper.make_graph(
        nodes, "stockpot_legacy",
        [helper.make_tensor_value_info("rows", TensorProto.INT64, ["n", len(tables)])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", len(spec["heads"])])],
        initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def main():
    args = sys.argv[1:]
    out_path = None
    if "--onnx" in args:
        i = args.index("--onnx")
        out_path = args[i + 1]
        del args[i:i + 2]
    model_dir, rows_path, fields, batch, seconds = args[0], args[1], int(args[2]), int(args[3]), float(args[4])
    spec, tables, layers, heads = load(model_dir)
    if len(spec["fields"]) != fields:
        raise SystemExit(f"rows have {fields} fields, the model {len(spec['fields'])}")
    rows = np.fromfile(rows_path, dtype="<i4").astype(np.int64).reshape(-1, fields)
    batches = [rows[s:s + batch] for s in range(0, len(rows) - batch + 1, batch)]
    if not batches:
        raise SystemExit(f"fewer than {batch} rows")
    model = graph(spec, tables, layers, heads)
    if out_path:
        onnx.save(model, out_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    first = session.run(["probs"], {"rows": batches[0]})[0]
    for b in batches[:3]:  # warm-up
        session.run(["probs"], {"rows": b})
    done, start = 0, time.perf_counter()
    while True:
        for b in batches:
            session.run(["probs"], {"rows": b})
            done += len(b)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    print(json.dumps({
        "peer": f"onnxruntime {ort.__version__}",
        "candidates_per_s": done / elapsed,
        "batch": batch,
        "first_batch": first.reshape(-1).tolist(),
    }), flush=True)


if __name__ == "__main__":
    main()
