"""--step serve as a real process on a free port, against the loopback teacher: the student, LLM and
human routes under concurrent requests, garbage and oversized uploads, a teacher that answers 401, kill -9
losing no logged escalation, the review page in a real headless browser, and the next flywheel turn
training on what serving logged."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fakes import COLOURS, KEY
from flywheel.io import read_csv, read_json, read_jsonl
from loopback import LoopbackTeacher

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(rgb, size=(37, 53), seed=0):
    """A raw PNG of another size than training's, in a colour: what a client would upload."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb, float) + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def blend(a, b, w):
    return tuple((1 - w) * np.array(COLOURS[a], float) + w * np.array(COLOURS[b], float))


class Server:
    def __init__(self, run, teacher_url, *extra, preexec_fn=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OPENROUTER_API_KEY": KEY}
        self.log = open(run / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cifar_distill.py"), "--step", "serve", "--out_dir", str(run),
             "--port", str(self.port), "--llm_base_url", teacher_url, "--max_workers", "4", *map(str, extra)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
            assert self.proc.poll() is None, (run / "serve.log").read_text()
        raise AssertionError("server did not start: " + (run / "serve.log").read_text())

    def classify(self, data, name="x.png"):
        return httpx.post(self.url + "/v1/classify", files={"file": (name, data, "image/png")}, timeout=30)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def served_with_ood(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    return run


@pytest.fixture
def served(served_with_ood):
    """Without the out-of-distribution check: these tests build their routes from the student's own
    confidences, and the tiny run's thumbnails are no guide to uploads of another size."""
    (served_with_ood / "artifacts" / "ood.npz").unlink()
    return served_with_ood


def student_confidences(run, uploads):
    """The exported student's calibrated confidence for each upload, as the server computes it."""
    from flywheel.calibrate import softmax
    from flywheel.export import ort_session
    s = ort_session(run / "artifacts" / "mobilenet.onnx")
    return [float(softmax(s.run(None, {"image": np.asarray(Image.open(io.BytesIO(u)).convert("RGB"))[None]})[0]).max())
            for u in uploads]


def tau_between(confs, below=1):
    """A threshold with at least `below` uploads under it and one over it, built from the student's own
    outputs: the midpoint of the widest such gap between its distinct confidences (so float noise on
    another machine moves no upload across it)."""
    c = sorted(set(confs))
    gaps = [k for k in range(len(c) - 1) if sum(x <= c[k] for x in confs) >= below]
    assert gaps, f"the student's confidences {c} leave no gap with {below} upload(s) under it"
    i = max(gaps, key=lambda k: c[k + 1] - c[k])
    return (c[i] + c[i + 1]) / 2


def test_routes_under_concurrency_errors_and_kill9(served):
    run = served
    # pure class colours (the student's easy cases), 50/50 blends (hard ones), and grey and black
    uploads = [png(COLOURS[c], seed=i) for i, c in enumerate(CLASSES * 2)]
    uploads += [png(blend(a, b, 0.5), seed=i) for i, (a, b) in
                enumerate([("apple", "orange"), ("pear", "mushroom"), ("orange", "sweet_pepper")] * 2)]
    uploads += [png((128, 128, 128), seed=3), png((0, 0, 0), seed=4)]
    confs = student_confidences(run, uploads)
    tau = tau_between(confs, below=3)
    under = [u for u, c in zip(uploads, confs) if c < tau]
    disagree, unauthorised = under[-2:]  # two escalations kept back for the human route
    concurrent = [(u, c) for u, c in zip(uploads, confs) if u not in (disagree, unauthorised)]
    with LoopbackTeacher(classes=CLASSES, cost=0.001) as teacher:
        # --contest_below 0: an accepted LLM label stands, so the LLM route is the teacher's answer
        srv = Server(run, teacher.url, "--tau", tau, "--contest_below", 0, "--second_pass", "always")  # both passes
        try:
            h = httpx.get(srv.url + "/health").json()
            assert h["status"] == "ok" and h["student"] == "turn_0" and h["tau"] == tau

            with ThreadPoolExecutor(16) as ex:  # 16 clients at once
                res = list(ex.map(srv.classify, [u for u, _ in concurrent]))
            assert all(r.status_code == 200 for r in res), [r.text for r in res]
            out = [r.json() for r in res]
            for o, (_, c) in zip(out, concurrent):
                assert set(o) >= {"label", "confidence", "route", "probs", "needs_review", "request_id"}
                assert abs(sum(o["probs"].values()) - 1) < 1e-4 and o["label"] in CLASSES
                if c >= tau:
                    assert o["route"] == "student" and not o["needs_review"], (o, c, tau)
                else:  # the loopback teacher answers apple, twice, for an image it does not know
                    assert o["route"] == "llm" and o["label"] == "apple" and not o["needs_review"], (o, c, tau)
            assert {o["route"] for o in out} == {"student", "llm"}

            # the human route: the two passes disagree
            teacher.script = [{"label": "pear"}, {"label": "sweet_pepper"}]
            o = srv.classify(disagree).json()
            assert o["route"] == "human" and o["needs_review"] and o["label"] in ("pear", "sweet_pepper"), o

            # garbage, oversized and empty input: JSON errors, and the server keeps serving
            r = srv.classify(b"\x00not an image at all")
            assert r.status_code == 400 and "not an image" in r.json()["error"]
            assert "BytesIO" not in r.text and " at 0x" not in r.text  # no Python object's repr
            r = httpx.post(srv.url + "/v1/classify", data={"nofile": "x"})
            assert r.status_code == 400
            r = srv.classify(os.urandom(11 * 2**20))
            assert r.status_code == 413 and "max_upload_mb" in r.json()["error"]
            assert httpx.get(srv.url + "/health").status_code == 200

            # 401 from the teacher: the student's guess, flagged for review; the key appears nowhere
            teacher.script = [{"status": 401, "body": {"error": {"message": f"bad key {KEY}"}}}] * 4
            r = srv.classify(unauthorised)
            o = r.json()
            assert r.status_code == 200 and KEY not in r.text
            assert o["route"] == "human" and o["needs_review"] and o["reason"], o
            escalated = [x for x in out if x["route"] != "student"]

            # a person answers one queued image through the API the review page uses
            queued = httpx.get(srv.url + "/review/items").json()["pending"]
            assert len(queued) == 2
            r = httpx.post(srv.url + "/review/answer", json={"path": queued[0]["path"], "label": "mushroom"})
            assert r.status_code == 200
            assert httpx.post(srv.url + "/review/answer", json={"path": queued[0]["path"], "label": "banana"}).status_code == 400

            # kill -9 right after answers: every escalation answered is already on disk
            srv.stop(signal.SIGKILL)
        finally:
            if srv.proc.poll() is None:
                srv.stop()
    recs = read_jsonl(run / "escalations.jsonl")[0]
    logged = {r["request_id"] for r in recs if r["split"] == "production"}
    assert {o["request_id"] for o in escalated} <= logged
    assert KEY not in (run / "serve.log").read_text() and KEY not in (run / "escalations.jsonl").read_text()
    human = [r for r in read_csv(run / "human_review.csv") if r["split"] == "production"]
    assert {r["path"] for r in human} == {r["path"] for r in recs if r["split"] == "production" and r["route"] == "human"}
    # the uploads are stored as prep stores images: training's size, so the flywheel can use them
    with Image.open(run / recs[-1]["path"]) as im:
        assert im.size == (32, 32)


def _chromium():
    for b in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(b):
            return shutil.which(b)
    return None


def test_unlike_training_goes_to_a_person_and_warnings_show(served_with_ood):
    """A degenerate size and an image far from every training image (in the student's features) go to a person,
    unasked, with the reason; a training image does not. The threshold is set on purpose between the two
    distances."""
    from flywheel.export import ort_session
    from flywheel.ood import OODModel
    run = served_with_ood
    sess = ort_session(run / "artifacts" / "mobilenet.onnx")

    def distance(data):  # as the server measures it: the exported graph's features output
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return ood.distance(img, sess.run(["features"], {"image": np.asarray(img)[None]})[0][0])

    train_jpg = next(r["path"] for r in read_csv(run / "artifacts" / "train_rows.csv") if r["split"] == "train")
    seen = (run / train_jpg).read_bytes()
    far = np.indices((48, 48)).sum(0) % 2 * 255  # a one-pixel black and white checkerboard
    buf = io.BytesIO()
    Image.fromarray(np.stack([far] * 3, -1).astype(np.uint8)).save(buf, format="PNG")
    ood = OODModel.load(run / "artifacts" / "ood.npz")
    assert ood.kind == "features"
    d = [distance(b) for b in (seen, buf.getvalue())]
    assert d[0] < d[1], d
    ood._replace(threshold=(d[0] + d[1]) / 2).save(run / "artifacts" / "ood.npz")
    with LoopbackTeacher(classes=CLASSES) as teacher:
        srv = Server(run, teacher.url, "--tau", 1e-6)  # the student takes everything it is allowed to
        try:
            h = httpx.get(srv.url + "/health").json()
            assert any("validation images" in w for w in h["warnings"]), h  # the tiny run validates on a few
            assert h["ood_threshold"] == pytest.approx((d[0] + d[1]) / 2)
            o = srv.classify(seen, "seen.jpg").json()
            assert o["route"] == "student" and not o["needs_review"], o
            o = srv.classify(buf.getvalue()).json()
            assert o["route"] == "human" and o["needs_review"] and "unlike every training image" in o["reason"], o
            o = srv.classify(png((200, 30, 30), size=(1, 1))).json()
            assert o["route"] == "human" and o["needs_review"] and "degenerate size 1x1" in o["reason"], o
            assert not teacher.requests  # never asked the LLM about either
        finally:
            srv.stop()
    assert "warning" in (run / "serve.log").read_text() and "validation images" in (run / "serve.log").read_text()
    rows = [r for r in read_csv(run / "human_review.csv") if r["split"] == "production"]
    assert len(rows) == 2 and {r["llm_answers"] for r in rows} == {"not asked"}


def test_drift_alarms_on_inverted_uploads_not_on_the_test_split_and_metrics_show_it(served_with_ood):
    """/health's drift stays quiet on the test split and alarms once inverted copies arrive; /metrics shows the
    routes, latencies, confidences, LLM calls, OOD count, drift and turn. The OOD threshold is set on purpose at
    the test split's largest distance, so the test split alone is never unlike training; the student is retrained
    with 45% of its labels for validation, because drift is judged against validation and nine images say little."""
    from conftest import TRAIN_FLAGS
    from fakes import run_cli
    from flywheel.export import ort_session
    from flywheel.monitor import MIN_DRIFT_N
    from flywheel.ood import OODModel
    run = served_with_ood
    for step in (["train", *TRAIN_FLAGS, "--val_frac", 0.45], ["export"]):
        run_cli("--step", *step, "--out_dir", run, "--teacher", "oracle")
    files = [run / r["path"] for r in read_csv(run / "manifest.csv") if r["split"] == "test"]
    inverted = []
    for f in files:
        buf = io.BytesIO()
        Image.fromarray(255 - np.asarray(Image.open(f).convert("RGB"))).save(buf, format="PNG")
        inverted.append(buf.getvalue())
    sess, ood = ort_session(run / "artifacts" / "mobilenet.onnx"), OODModel.load(run / "artifacts" / "ood.npz")

    def look(data):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return img, sess.run(["features"], {"image": np.asarray(img)[None]})[0][0]
    seen = [look(f.read_bytes()) for f in files]
    chain = [ood._replace(also=None), ood.also]  # features, then pixels: each threshold at the test split's largest
    chain = [m._replace(threshold=max(m.distance(*x) for x in seen)) for m in chain]
    ood = chain[0]._replace(also=chain[1])
    assert sum(ood.reason(*look(b)) is not None for b in inverted) >= len(inverted) / 5  # many inverted are unlike
    ood.save(run / "artifacts" / "ood.npz")
    with LoopbackTeacher(classes=CLASSES) as teacher:
        srv = Server(run, teacher.url, "--teacher", "oracle")  # the oracle answers no upload: no LLM involved
        try:
            for f in files:
                assert srv.classify(f.read_bytes(), f.name).status_code == 200
            quiet = httpx.get(srv.url + "/health").json()["drift"]
            for b in inverted * 2:  # the window is the last 500: most of it shifted now
                assert srv.classify(b).status_code == 200
            loud = httpx.get(srv.url + "/health").json()["drift"]
            metrics = httpx.get(srv.url + "/metrics").text
        finally:
            srv.stop()
    assert quiet["window"] == len(files) >= MIN_DRIFT_N and not quiet["alarm"] and quiet["ood_rate"] == 0, quiet
    assert loud["alarm"] and any("out-of-distribution" in w for w in loud["why"]), loud
    assert 'cifar_distill_requests_total{route="human"}' in metrics and "cifar_distill_latency_seconds_bucket" in metrics
    from flywheel.report import production_lines
    from flywheel.run import Paths
    prod = "\n".join(production_lines(Paths(run)))  # the report's section, from what the server wrote as it stopped
    assert "| 32-95px | 240 |" in prod and "| unnamed | 240 |" in prod and "answered class" in prod, prod
    for name in ("cifar_distill_student_confidence_count 240.0", "cifar_distill_llm_calls 0.0", "cifar_distill_turn 0.0",
                 "cifar_distill_drift_alarm 1.0", 'cifar_distill_drift_psi{figure="class"}', "cifar_distill_ood_total"):
        assert name in metrics, name


def test_offline_teacher_never_asked_says_not_asked(served):
    """With the SIMULATED oracle, an escalated upload goes to a person and the queue says "not asked", not
    "failed"."""
    run = served
    srv = Server(run, "http://127.0.0.1:9", "--teacher", "oracle", "--tau", 1.0)  # everything escalates
    try:
        o = srv.classify(png(COLOURS["pear"])).json()
        assert o["route"] == "human" and o["needs_review"] and "oracle" in o["reason"], o
        item = httpx.get(srv.url + "/review/items").json()["pending"][-1]
        assert item["llm_answers"] == "not asked" and item["llm_status"] == "not_asked"
    finally:
        srv.stop()


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_review_page_in_a_headless_browser(served):
    """Three uploads routed to a person (tau 1: everything escalates; the teacher answers 401). In a real
    browser: the progress count, the student's guess highlighted, skip, "none of these", undo, the
    typing filter (any number of classes), a click and a key press."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    run = served
    with LoopbackTeacher(classes=CLASSES) as teacher:
        srv = Server(run, teacher.url, "--tau", 1.0)
        try:
            teacher.script = [{"status": 401}] * 40
            for s_, w in ((1, 0.5), (2, 0.45), (3, 0.4)):
                assert srv.classify(png(blend("orange", "apple", w), seed=s_)).json()["route"] == "human"
            pending = [p for p in httpx.get(srv.url + "/review/items").json()["pending"] if p["split"] == "production"]
            assert len(pending) == 3
            opts = webdriver.ChromeOptions()
            opts.binary_location = _chromium()
            for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
                opts.add_argument(a)
            driver = webdriver.Chrome(service=ChromeService(shutil.which("chromedriver")), options=opts)
            try:
                driver.get(srv.url + "/review")
                wait = WebDriverWait(driver, 20)
                el = lambda i: driver.find_element(By.ID, i)  # noqa: E731
                body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731
                wait.until(lambda d: not el("card").get_attribute("hidden"))
                items = httpx.get(srv.url + "/review/items").json()  # the cascade's queue is there too, answered
                n, done0, total = len(items["pending"]), len(items["done"]), items["total"]
                assert el("progress").text == f"{done0} of {total} reviewed · {n} waiting"
                first = el("where").text
                guess = next(p["student_label"] for p in httpx.get(srv.url + "/review/items").json()["pending"]
                             if p["path"] == first)
                assert "guess" in el("label-" + guess).get_attribute("class")
                assert sum("guess" in el("label-" + c).get_attribute("class") for c in CLASSES) == 1
                el("skip").click()                                       # skip: it comes back at the end
                wait.until(lambda d: el("where").text != first)
                second = el("where").text
                body().send_keys("x")                                    # none of these
                wait.until(lambda d: el("status").get_attribute("data-saved") == second)
                assert el("progress").text.startswith(f"{done0 + 1} of ")
                body().send_keys("u")                                    # undo: the second waits again
                wait.until(lambda d: el("status").get_attribute("data-undone") == second)
                assert el("where").text == second and el("progress").text.startswith(f"{done0} of ")
                el("filter").send_keys("pep")                            # typing picks among any number of classes
                assert [c for c in CLASSES if el("label-" + c).is_displayed()] == ["sweet_pepper"]
                el("filter").send_keys(Keys.ENTER)
                wait.until(lambda d: el("status").get_attribute("data-saved") == second)
                third = el("where").text
                el("label-pear").click()                                 # one click
                wait.until(lambda d: el("status").get_attribute("data-saved") == third)
                rest = n - 2
                for _ in range(rest):                                    # one key press each, the skipped one last
                    cur = el("where").text
                    body().send_keys("1")
                    wait.until(lambda d, cur=cur: el("status").get_attribute("data-saved") == cur)
                wait.until(lambda d: el("progress").text == f"{done0 + n} of {total} reviewed · 0 waiting")
            finally:
                driver.quit()
        finally:
            srv.stop()
    rows = {r["path"]: r for r in read_csv(run / "human_review.csv")}
    assert rows[second]["label_final"] == "sweet_pepper" and rows[second]["source"] == "human"
    assert rows[third]["label_final"] == "pear"
    assert rows[first]["label_final"] == "apple"  # skipped, then answered last with key 1


def test_a_turn_beside_the_server_trains_on_what_it_logged_and_ships_live(served, monkeypatch):
    """Escalations the LLM settled and a person's answer from the review queue become turn 1's labels, while the
    server keeps answering on the same folder: a turn and an export run beside it (no request fails, no answer is
    paid twice, one budget), and the server then serves turn 1 without a restart."""
    import threading
    from conftest import TRAIN_FLAGS
    from fakes import run_cli
    run, max_usd, price = served, 5.0, 0.001  # a budget that cannot bind here (test_shared_folder.py makes it bind)
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    with LoopbackTeacher(classes=CLASSES, latency_s=0.02, cost=price) as teacher:
        srv = Server(run, teacher.url, "--max_usd", max_usd, "--max_escalations", 4)
        try:
            for i, (a, b) in enumerate([("apple", "orange"), ("pear", "mushroom"), ("orange", "sweet_pepper")] * 2):
                srv.classify(png(blend(a, b, 0.5), seed=i))
            teacher.script = [{"status": 401}] * 4
            srv.classify(png(blend("apple", "pear", 0.5), seed=50))
            teacher.script = []  # the first 401 stops asking for that request; the rest are not needed
            queued = httpx.get(srv.url + "/review/items").json()["pending"]
            prod = [q for q in queued if q["split"] == "production"]
            if prod:
                httpx.post(srv.url + "/review/answer", json={"path": prod[0]["path"], "label": "mushroom"})
            recs = [r for r in read_jsonl(run / "escalations.jsonl")[0] if r["split"] == "production"]
            settled = {r["path"] for r in recs if r["route"] == "llm"} | ({prod[0]["path"]} if prod else set())
            assert settled, "serving logged nothing the flywheel could use"
            assert httpx.get(srv.url + "/health").json()["turn"] == 0
            # turn 1 must win promotion whatever training yields on 9 validation images: turn 0's recorded validation
            # accuracy is lowered on purpose (the server has it loaded already; only promotion reads it again)
            from flywheel.student import load_checkpoint, save_checkpoint
            ck = load_checkpoint(run / "artifacts" / "best.pt")
            save_checkpoint(run / "artifacts" / "best.pt", {**ck, "best_val_acc": -1.0})
            # clients keep uploading while the turn relabels (the same LLM, ledger and budget), trains and exports
            stop, answers = threading.Event(), []

            def client(c):
                for i in range(10**6):
                    if stop.is_set():
                        return
                    r = srv.classify(png(blend(CLASSES[c], CLASSES[(c + i) % 5], 0.5), seed=1000 * c + i))
                    answers.append((r.status_code, r.json().get("turn")))
                    time.sleep(0.1)
            with ThreadPoolExecutor(3) as ex:
                futures = [ex.submit(client, c) for c in range(3)]
                try:
                    common = ["--out_dir", run, "--llm_base_url", teacher.url, "--max_usd", max_usd]
                    run_cli("--step", "flywheel", *common, "--turns", 1, "--relabel_n", 6, *TRAIN_FLAGS,
                            "--retrain", "continue")
                    run_cli("--step", "export", *common)
                    deadline = time.time() + 30
                    while httpx.get(srv.url + "/health").json()["turn"] != 1 and time.time() < deadline:
                        time.sleep(0.2)
                    n_before = len(answers)
                    while len(answers) < n_before + 3 and time.time() < deadline:
                        time.sleep(0.1)
                finally:
                    stop.set()
                [f.result() for f in futures]
            health = httpx.get(srv.url + "/health").json()
            metrics = httpx.get(srv.url + "/metrics").text
            assert srv.proc.poll() is None  # the same process: no restart
        finally:
            srv.stop()
    assert health["turn"] == 1 and "cifar_distill_turn 1.0" in metrics
    assert answers and all(code == 200 for code, _ in answers), answers  # no request failed, during the swap either
    assert answers[-1][1] == 1 and {t for _, t in answers} <= {0, 1}
    assert max(teacher.completed.values()) == 1  # no answer paid twice, by the server or the turn
    paid = [r for r in read_jsonl(run / "labels.jsonl")[0] if r.get("cost_usd")]
    assert sum(r["cost_usd"] for r in paid) <= max_usd and teacher.answers > 0
    fl = {r["path"]: r for r in read_csv(run / "flywheel_labels.csv")}
    assert settled <= set(fl)
    if prod:
        assert fl[prod[0]["path"]]["label"] == "mushroom" and fl[prod[0]["path"]]["source"] == "human"
    trained = {r["path"] for r in read_csv(run / "artifacts" / "turn_1" / "train_rows.csv")}
    assert settled <= trained
    turn1 = read_json(run / "artifacts" / "flywheel.json")["turns"][1]
    assert turn1["serving_labels"] == sum(p.startswith("production/") for p in fl)  # counted apart from the picks
