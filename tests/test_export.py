"""Export: ONNX and TorchScript take raw uint8 pixels, match PyTorch on real test images with the temperature
folded in, and classify a raw small image like the student classifies prep's JPEG of it."""
import json

import numpy as np
import pytest
import onnxruntime as ort
import torch

from flywheel.io import read_csv, read_json
from flywheel.calibrate import softmax
from flywheel.export import load_images, onnx_metadata


def test_export_matches_torch_and_folds_temperature(exported_run):
    e = read_json(exported_run / "artifacts" / "export.json")
    for k in ("onnx", "torchscript"):
        assert e[k]["max_abs_diff"] < e["tolerance"] and e[k]["agreement"] == 1.0
    assert e["raw_input"]["size_wh"] == [53, 37] and e["raw_input"]["n_images"] > 0
    meta = onnx_metadata(exported_run / "artifacts" / "mobilenet.onnx")
    assert float(meta["temperature"]) == e["temperature"] and json.loads(meta["classes"]) == e["classes"]
    # softmax of the ONNX output on the decoded test JPEGs (the run's size: only normalised) equals the
    # calibrated probabilities eval wrote, on any batch size
    preds = read_csv(exported_run / "artifacts" / "test_predictions.csv")[:7]
    x = load_images([exported_run / p["path"] for p in preds])
    assert x.dtype == np.uint8 and x.shape[-1] == 3
    sess = ort.InferenceSession(str(exported_run / "artifacts" / "mobilenet.onnx"), providers=["CPUExecutionProvider"])
    p = softmax(sess.run(None, {"image": x})[0])
    ts = torch.jit.load(str(exported_run / "artifacts" / "mobilenet.ts"))
    assert np.abs(softmax(ts(torch.from_numpy(x[:1])).numpy()) - p[:1]).max() < 1e-3
    want = np.array([json.loads(r["probs"]) for r in preds])
    assert np.abs(p - want).max() < 1e-3


@pytest.mark.parametrize("wh", [(37, 53), (53, 37), (8, 8), (400, 90)])
def test_graph_takes_any_size_and_matches_prep(exported_run, wh):
    """A raw image of any size classifies like prep's JPEG of it fed to the student: the graph's resize and
    sharpening are prep's, so only the JPEG round trip separates them."""
    import io

    from PIL import Image

    from flywheel.data import jpeg_bytes, upscale
    from flywheel.export import CalibratedStudent, Preprocess
    from flywheel.student import load_student, model_from_checkpoint, normalize
    meta = onnx_metadata(exported_run / "artifacts" / "mobilenet.onnx")
    size, sharpen = int(meta["img_size"]), json.loads(meta["sharpen"])
    raws = []
    for r in read_csv(exported_run / "artifacts" / "test_predictions.csv")[:8]:
        with Image.open(exported_run / r["path"]) as im:
            raws.append(im.convert("RGB").resize(wh, Image.BICUBIC))
    # the graph's preprocessing against prep's PIL pipeline before the JPEG: within a grey level on average
    pp = Preprocess(size, sharpen)
    for raw in raws:
        ours = pp(torch.from_numpy(np.array(raw))[None])
        pil = normalize(torch.from_numpy(np.array(upscale(raw, size, sharpen))).permute(2, 0, 1)[None].contiguous())
        grey = (ours - pil).abs() * 0.226 * 255  # back to grey levels (ImageNet's std is about 0.226)
        assert float(grey.mean()) < 1.0, float(grey.mean())
    sess = ort.InferenceSession(str(exported_run / "artifacts" / "mobilenet.onnx"), providers=["CPUExecutionProvider"])
    p_graph = softmax(sess.run(None, {"image": np.stack([np.asarray(r) for r in raws])})[0])
    best = load_student(exported_run / "artifacts" / "best.pt")
    student = CalibratedStudent(model_from_checkpoint(best), best["temperature"]).eval()
    jpgs = [np.asarray(Image.open(io.BytesIO(jpeg_bytes(upscale(r, size, sharpen)))).convert("RGB")) for r in raws]
    with torch.no_grad():
        p_prep = softmax(student(normalize(torch.from_numpy(np.stack(jpgs)).permute(0, 3, 1, 2))).numpy())
    # only the JPEG round trip separates them; this tiny 32px student is jumpy, so the bound is on the mean
    d = np.abs(p_graph - p_prep)
    assert d.mean() < 0.03 and (p_graph.argmax(1) == p_prep.argmax(1)).mean() >= 0.75, (d.mean(), d.max())


def test_folded_normalisation_equals_normalising_first():
    """The exported student takes centred pixels and carries 1/(255*std) in its first convolution: on
    MobileNetV3-Small (random weights) the logits equal the unfolded model's on normalised images, borders
    and all (a saturated image makes a wrong padding value show at the edges)."""
    from flywheel.student import Centre, build_model, fold_normalisation, normalize
    torch.manual_seed(0)
    model = build_model(5, "none").eval()
    x = torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8)
    x[2] = 255  # all white: the first convolution's zero padding is far from any pixel here
    with torch.no_grad():
        want = model(normalize(x))
        got = fold_normalisation(model)(Centre()(x))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    assert model.features[0][0].weight.abs().max() > 0.01  # the original is left as it was (a copy is folded)


@pytest.mark.parametrize("model", [
    torch.nn.Sequential(torch.nn.Linear(3, 2)),                                        # no convolution
    torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)),                                      # not over colour
    torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, groups=3)),                            # depthwise
    torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")),   # pads with pixels
])
def test_fold_refuses_models_it_cannot_fold_exactly(model):
    from flywheel.student import fold_normalisation
    with pytest.raises(ValueError, match="cannot fold"):
        fold_normalisation(model)
