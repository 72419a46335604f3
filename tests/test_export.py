"""Export: ONNX and TorchScript match PyTorch on real test images, with the temperature folded in."""
import json

import numpy as np
import onnxruntime as ort
import torch

from flywheel.io import read_csv, read_json
from flywheel.serve import onnx_metadata, preprocess_files, softmax_np


def test_export_matches_torch_and_folds_temperature(exported_run):
    e = read_json(exported_run / "artifacts" / "export.json")
    for k in ("onnx", "torchscript"):
        assert e[k]["max_abs_diff"] < 1e-4 and e[k]["agreement"] == 1.0
    meta = onnx_metadata(exported_run / "artifacts" / "mobilenet.onnx")
    assert float(meta["temperature"]) == e["temperature"] and json.loads(meta["classes"]) == e["classes"]
    # softmax of the ONNX output equals the calibrated probabilities eval wrote, on any batch size
    preds = read_csv(exported_run / "artifacts" / "test_predictions.csv")[:7]
    x = preprocess_files([exported_run / p["path"] for p in preds])
    sess = ort.InferenceSession(str(exported_run / "artifacts" / "mobilenet.onnx"), providers=["CPUExecutionProvider"])
    p = softmax_np(sess.run(None, {"input": x})[0])
    want = np.array([json.loads(r["probs"]) for r in preds])
    assert np.abs(p - want).max() < 1e-3
    ts = torch.jit.load(str(exported_run / "artifacts" / "mobilenet.ts"))
    assert np.abs(softmax_np(ts(torch.from_numpy(x[:1])).numpy()) - want[:1]).max() < 1e-3
