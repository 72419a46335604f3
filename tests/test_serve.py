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
    def __init__(self, run, teacher_url, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OPENROUTER_API_KEY": KEY}
        self.log = open(run / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cifar_distill.py"), "--step", "serve", "--out_dir", str(run),
             "--port", str(self.port), "--llm_base_url", teacher_url, "--max_workers", "4", *map(str, extra)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
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
def served(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    return run


def test_routes_under_concurrency_errors_and_kill9(served):
    run = served
    with LoopbackTeacher(classes=CLASSES, cost=0.001) as teacher:
        srv = Server(run, teacher.url)
        try:
            h = httpx.get(srv.url + "/health").json()
            assert h["status"] == "ok" and h["student"] == "turn_0" and 0 < h["tau"] <= 1

            # 16 clients at once: pure class colours (the student's easy cases) and 50/50 blends (hard ones)
            uploads = [png(COLOURS[c], seed=i) for i, c in enumerate(CLASSES * 2)]
            uploads += [png(blend(a, b, 0.5), seed=i) for i, (a, b) in
                        enumerate([("apple", "orange"), ("pear", "mushroom"), ("orange", "sweet_pepper")] * 2)]
            with ThreadPoolExecutor(16) as ex:
                res = list(ex.map(srv.classify, uploads))
            assert all(r.status_code == 200 for r in res), [r.text for r in res]
            out = [r.json() for r in res]
            for o in out:
                assert set(o) >= {"label", "confidence", "route", "probs", "needs_review", "request_id"}
                assert abs(sum(o["probs"].values()) - 1) < 1e-4 and o["label"] in CLASSES
            routes = {o["route"] for o in out}
            assert "student" in routes and "llm" in routes, [(o["route"], o["confidence"]) for o in out]
            for o in out:
                if o["route"] == "student":
                    assert o["confidence"] >= h["tau"] and not o["needs_review"]
                if o["route"] == "llm":
                    assert o["label"] == "apple"  # the loopback teacher's answer for an unknown image

            # the human route: the two passes disagree
            hard = png(blend("pear", "apple", 0.5), seed=99)
            teacher.script = [{"label": "pear"}, {"label": "sweet_pepper"}]
            o = srv.classify(hard).json()
            if o["route"] != "student":
                assert o["route"] == "human" and o["needs_review"] and o["label"] in ("pear", "sweet_pepper")

            # garbage, oversized and empty input: JSON errors, and the server keeps serving
            r = srv.classify(b"\x00not an image at all")
            assert r.status_code == 400 and "error" in r.json()
            r = httpx.post(srv.url + "/v1/classify", data={"nofile": "x"})
            assert r.status_code == 400
            r = srv.classify(os.urandom(11 * 2**20))
            assert r.status_code == 413 and "max_upload_mb" in r.json()["error"]
            assert httpx.get(srv.url + "/health").status_code == 200

            # 401 from the teacher: the student's guess, flagged for review; the key appears nowhere
            teacher.script = [{"status": 401, "body": {"error": {"message": f"bad key {KEY}"}}}] * 4
            r = srv.classify(png(blend("apple", "pear", 0.5), seed=7))
            o = r.json()
            assert r.status_code == 200 and KEY not in r.text
            if o["route"] != "student":
                assert o["route"] == "human" and o["needs_review"]
            escalated = [x for x in out if x["route"] != "student"]
            assert escalated

            # a person answers one queued image through the API the review page uses
            queued = httpx.get(srv.url + "/review/items").json()["pending"]
            if queued:
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


@pytest.mark.skipif(_chromium() is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_review_page_in_a_headless_browser(served):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    run = served
    with LoopbackTeacher(classes=CLASSES) as teacher:
        srv = Server(run, teacher.url)
        try:
            # two images routed to a person: a teacher that answers 401
            teacher.script = [{"status": 401}] * 20
            sent = [srv.classify(png(blend("orange", "apple", w), seed=s)).json() for s, w in ((1, 0.5), (2, 0.45))]
            pending = httpx.get(srv.url + "/review/items").json()["pending"]
            assert pending, f"nothing was routed to a person: {sent}"
            opts = webdriver.ChromeOptions()
            opts.binary_location = _chromium()
            for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
                opts.add_argument(a)
            driver = webdriver.Chrome(service=ChromeService(shutil.which("chromedriver")), options=opts)
            try:
                driver.get(srv.url + "/review")
                wait = WebDriverWait(driver, 20)
                wait.until(lambda d: not d.find_element(By.ID, "card").get_attribute("hidden"))
                first = driver.find_element(By.ID, "where").text
                driver.find_element(By.ID, "label-pear").click()          # one click
                wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-saved") == first)
                if len(pending) > 1:
                    second = driver.find_element(By.ID, "where").text
                    driver.find_element(By.TAG_NAME, "body").send_keys("5")  # one key press: sweet_pepper
                    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-saved") == second)
            finally:
                driver.quit()
        finally:
            srv.stop()
    rows = {r["path"]: r for r in read_csv(run / "human_review.csv")}
    assert rows[first]["label_final"] == "pear" and rows[first]["source"] == "human"
    if len(pending) > 1:
        assert rows[second]["label_final"] == "sweet_pepper"


def test_next_flywheel_turn_trains_on_what_serving_logged(served):
    """Escalations the LLM settled and a person's answer from the review queue become turn 1's labels."""
    from conftest import TRAIN_FLAGS
    from fakes import run_cli
    run = served
    with LoopbackTeacher(classes=CLASSES) as teacher:
        srv = Server(run, teacher.url)
        try:
            for i, (a, b) in enumerate([("apple", "orange"), ("pear", "mushroom"), ("orange", "sweet_pepper")] * 2):
                srv.classify(png(blend(a, b, 0.5), seed=i))
            teacher.script = [{"status": 401}] * 4
            srv.classify(png(blend("apple", "pear", 0.5), seed=50))
            queued = httpx.get(srv.url + "/review/items").json()["pending"]
            prod = [q for q in queued if q["split"] == "production"]
            if prod:
                httpx.post(srv.url + "/review/answer", json={"path": prod[0]["path"], "label": "mushroom"})
        finally:
            srv.stop()
    recs = [r for r in read_jsonl(run / "escalations.jsonl")[0] if r["split"] == "production"]
    settled = {r["path"] for r in recs if r["route"] == "llm"} | ({prod[0]["path"]} if prod else set())
    assert settled, "serving logged nothing the flywheel could use"
    run_cli("--step", "flywheel", "--out_dir", run, "--teacher", "oracle", "--turns", 1, "--relabel_n", 10,
            *TRAIN_FLAGS, "--retrain", "continue")
    fl = {r["path"]: r for r in read_csv(run / "flywheel_labels.csv")}
    assert settled <= set(fl)
    if prod:
        assert fl[prod[0]["path"]]["label"] == "mushroom" and fl[prod[0]["path"]]["source"] == "human"
    trained = {r["path"] for r in read_csv(run / "artifacts" / "turn_1" / "train_rows.csv")}
    assert settled <= trained
    turn1 = read_json(run / "artifacts" / "flywheel.json")["turns"][1]
    assert turn1["serving_labels"] == sum(p.startswith("production/") for p in fl)  # counted apart from the picks
