"""The serving endpoint (`--step serve`): the run's promoted student in ONNX Runtime, then the LLM through
the label step's own teacher client, ledger, QC and budget, then a person, as an ASGI app (Starlette on
uvicorn), plus a review page where that person answers.

The student takes each upload's raw pixels: the exported graph resizes, sharpens and normalises them as
prep and training did (flywheel.serve.Preprocess). An escalated upload is prepared as prep prepares
training images (flywheel.data.upscale, the same JPEG encoding) and stored once under
OUT/production/<sha256>.jpg, so the teacher, the review page and the flywheel can read it (the student
route writes nothing). Every escalation is appended (and flushed) to
escalations.jsonl with split "production" before its answer is returned, so kill -9 loses no logged
record; a human-routed one also gets a row in human_review.csv (written whole to a temp name, then
renamed), which is the review queue.
"""
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


SHA_LOCKS = 64  # lock stripes for escalations in flight (more than the threadpool's 40 workers)


class BadImage(ValueError):
    pass


class Service:
    """What one request needs, shared by every request (ORT sessions and the ledger are thread-safe)."""

    def __init__(self, out, session, classes, tau, img_size, sharpen, teacher, ledger, qc, budget, esc,
                 student_id, turn, human_fields, max_upload_bytes, teacher_acc=0.85, contest_below=0.0):
        self.out, self.session, self.classes, self.tau = Path(out), session, list(classes), float(tau)
        self.img_size, self.sharpen, self.teacher, self.ledger, self.qc = img_size, sharpen, teacher, ledger, qc
        self.budget, self.esc, self.student_id, self.turn = budget, esc, student_id, turn
        self.human_fields, self.max_upload_bytes = human_fields, max_upload_bytes
        self.teacher_acc, self.contest_below = float(teacher_acc), float(contest_below)  # the cascade step's rule
        self.human_path = self.out / "human_review.csv"
        self.stop = getattr(teacher, "stop", None) or threading.Event()
        self._human_lock = threading.Lock()
        # one escalation per image at a time (nothing paid twice), from a fixed set of locks picked by sha256,
        # so a server that sees a million distinct uploads does not keep a million locks
        self._sha_locks = [threading.Lock() for _ in range(SHA_LOCKS)]

    # ------------------------------------------------------------------ one request
    def prepare(self, data: bytes):
        """Upload bytes (any format and size Pillow reads) -> the decoded image, RGB."""
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadImage(f"not an image Pillow can read ({type(e).__name__}: {e})") from None

    def prepped_jpeg(self, img) -> bytes:
        """The image as prep writes training images (upscale, sharpen, JPEG): what the LLM and a person see."""
        from flywheel.data import jpeg_bytes, upscale
        return jpeg_bytes(upscale(img, self.img_size, self.sharpen))

    def store(self, jpg: bytes):
        """An escalated upload -> (path relative to the run, sha256), written once."""
        from flywheel.io import atomic_write_bytes
        sha = hashlib.sha256(jpg).hexdigest()
        rel = f"production/{sha}.jpg"
        if not (self.out / rel).exists():
            atomic_write_bytes(self.out / rel, jpg)
        return rel, sha

    def student(self, img):
        """Calibrated class probabilities [C]. The exported graph takes the raw pixels, uint8 [1, H, W, 3], and
        does the resize, sharpening and normalisation itself; it divides by T."""
        from flywheel.calibrate import softmax
        logits = self.session.run(None, {"image": np.asarray(img)[None]})[0]
        return softmax(logits)[0]

    def classify(self, data: bytes) -> dict:
        from flywheel.cascade import decide, escalation_record
        rid = uuid.uuid4().hex[:16]
        img = self.prepare(data)
        probs = self.student(img)
        d = decide(probs, self.classes, self.tau)
        out = {"label": d.label, "confidence": round(float(probs.max()), 6), "route": "student",
               "probs": {c: round(float(p), 6) for c, p in zip(self.classes, probs)}, "needs_review": False,
               "request_id": rid}
        if d.route == "student":
            return out
        rel, sha = self.store(self.prepped_jpeg(img))
        upload_sha = hashlib.sha256(data).hexdigest()  # lets the flywheel refuse a test image sent as-is
        status, label, llm_conf, answers, error = self.escalate({"path": rel, "file": str(self.out / rel), "sha256": sha})
        d = decide(probs, self.classes, self.tau, status, label, self.teacher_acc, self.contest_below)
        rec = {**escalation_record(self.student_id, self.turn, "production", rel, sha, probs, self.classes, self.tau,
                                   d.route, status, label, answers, llm_posterior=d.llm_posterior),
               "request_id": rid, "upload_sha256": upload_sha, "error": error}
        self.esc.append(rec)  # flushed before the answer leaves: kill -9 loses no logged escalation
        if d.route == "human":
            self.enqueue_for_review(rec)
        # for a person: the best guess so far (a contested LLM label: the top class of the combined evidence)
        return {**out, "label": d.label, "confidence": round(float(llm_conf if d.route == "llm" else probs.max()), 6),
                "route": d.route, "needs_review": d.route == "human"}

    def escalate(self, it):
        """The label step's QC on one image. -> (status, label, confidence, pass records, error or None)."""
        from flywheel.labeling import ask_item, ledger_verdict
        from flywheel.teacher import FatalTeacherError
        error = None
        with self._sha_locks[int(it["sha256"][:8], 16) % SHA_LOCKS]:
            try:
                ask_item(it, self.teacher, self.ledger, self.qc, self.budget, "serve", self.stop)
            except FatalTeacherError as e:  # 401/402/403 or a dead endpoint: the student's guess goes to a person
                error = str(e)
                log.error("teacher unavailable, request routed to review: %s", e)
            st, lab, c, recs = ledger_verdict(it, self.teacher, self.ledger, self.qc)
        if st == "failed" and error is None:
            error = ("budget stop: --max_usd reached" if self.budget.stopped
                     else "no LLM answer (the reason is in labels.jsonl); asked again when this image comes back")
        return st, lab, c, recs, error

    # ------------------------------------------------------------------ the review queue
    def _rows(self):
        from flywheel.io import read_csv
        return read_csv(self.human_path) if self.human_path.exists() else []

    def enqueue_for_review(self, rec):
        from flywheel.cascade import review_row
        from flywheel.io import write_csv
        with self._human_lock:
            rows = self._rows()
            if any(r["path"] == rec["path"] for r in rows):
                return
            rows.append(review_row(rec, self.turn))
            write_csv(self.human_path, self.human_fields, rows)

    def pending(self):
        return [r for r in self._rows() if not (r.get("label_final") or "").strip()]

    def answer(self, path, label):
        """A person's label for one queued image, written atomically. -> the number still pending."""
        from flywheel.io import write_csv
        if label not in self.classes:
            raise ValueError(f"label {label!r} is not one of {self.classes}")
        with self._human_lock:
            rows = self._rows()
            hit = [r for r in rows if r["path"] == path]
            if not hit:
                raise KeyError(path)
            for r in hit:
                r["label_final"], r["source"] = label, "human"
            write_csv(self.human_path, self.human_fields, rows)
            return sum(1 for r in rows if not (r.get("label_final") or "").strip())

    def image_file(self, path):
        """The file behind a queued path, only inside the run folder."""
        f = (self.out / path).resolve()
        if self.out.resolve() not in f.parents or not f.is_file():
            raise KeyError(path)
        return f


def build_app(svc: Service):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route

    def error(status, message):
        return JSONResponse({"error": message}, status_code=status)

    async def health(request):
        return JSONResponse({"status": "ok", "student": f"turn_{svc.turn}", "student_id": svc.student_id,
                             "tau": svc.tau, "classes": svc.classes})

    async def classify(request: Request):
        too_big = f"upload over --max_upload_mb ({svc.max_upload_bytes / 2**20:g} MB)"
        if int(request.headers.get("content-length") or 0) > svc.max_upload_bytes + 64 * 1024:
            return error(413, too_big)
        body = bytearray()
        async for chunk in request.stream():  # a body without content-length is counted as it arrives
            body += chunk
            if len(body) > svc.max_upload_bytes + 64 * 1024:
                return error(413, too_big)
        request._body = bytes(body)  # starlette's form parser reads the cached body
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - malformed multipart
            return error(400, f"expected multipart/form-data with a field 'file' ({type(e).__name__})")
        f = form.get("file")
        if f is None or not hasattr(f, "read"):
            return error(400, "expected multipart/form-data with a field 'file' holding an image")
        data = await f.read()
        if len(data) > svc.max_upload_bytes:
            return error(413, too_big)
        t0 = time.perf_counter()
        try:
            out = await run_in_threadpool(svc.classify, data)
        except BadImage as e:
            return error(400, str(e))
        out["latency_ms"] = round(1000 * (time.perf_counter() - t0), 3)
        return JSONResponse(out)

    async def review_page(request):
        return HTMLResponse(REVIEW_HTML.replace("__CLASSES__", json.dumps(svc.classes)))

    async def review_items(request):
        return JSONResponse({"pending": svc.pending()})

    async def review_image(request):
        try:
            return FileResponse(svc.image_file(request.query_params.get("path", "")))
        except KeyError:
            return error(404, "no such queued image")

    async def review_answer(request):
        try:
            body = await request.json()
            left = await run_in_threadpool(svc.answer, str(body["path"]), str(body["label"]))
        except KeyError:
            return error(404, "that image is not in the review queue")
        except (ValueError, TypeError) as e:
            return error(400, str(e))
        return JSONResponse({"ok": True, "pending": left})

    return Starlette(routes=[
        Route("/health", health), Route("/v1/classify", classify, methods=["POST"]),
        Route("/review", review_page), Route("/review/items", review_items), Route("/review/image", review_image),
        Route("/review/answer", review_answer, methods=["POST"])])


# One pending image at a time, big; a button per class, and keys 1..9 for them; the answer is POSTed and
# the next image shows. No build step, no external assets (the server may have no internet either).
REVIEW_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>cifar_distill review</title>
<style>
 body{font-family:system-ui,sans-serif;margin:2em;max-width:760px}
 img{width:320px;height:320px;image-rendering:pixelated;border:1px solid #999}
 button{font-size:1.1em;margin:.25em;padding:.5em 1em}
 .meta{color:#444;margin:.5em 0}
</style></head>
<body>
<h1>Review queue</h1>
<div id="status">loading…</div>
<div id="card" hidden>
  <img id="img" alt="image to label">
  <div class="meta">student: <b id="student"></b> · LLM: <b id="llm"></b> · <span id="where"></span></div>
  <div id="buttons"></div>
  <p class="meta">Keys: <span id="keys"></span></p>
</div>
<script>
const CLASSES = __CLASSES__;
let queue = [], current = null;
const $ = id => document.getElementById(id);
$("keys").textContent = CLASSES.map((c, i) => `${i + 1} = ${c}`).join(", ");
CLASSES.forEach((c, i) => {
  const b = document.createElement("button");
  b.textContent = `${i + 1} ${c}`; b.dataset.label = c; b.id = "label-" + c;
  b.onclick = () => answer(c);
  $("buttons").appendChild(b);
});
async function load() {
  queue = (await (await fetch("review/items")).json()).pending;
  show();
}
function show() {
  current = queue.shift() || null;
  $("card").hidden = !current;
  $("status").textContent = current ? `${queue.length + 1} waiting` : "Nothing waiting for review.";
  if (!current) return;
  $("img").src = "review/image?path=" + encodeURIComponent(current.path);
  $("student").textContent = `${current.student_label} (${current.student_conf})`;
  $("llm").textContent = current.llm_answers || current.llm_status || "none";
  $("where").textContent = current.path;
}
async function answer(label) {
  if (!current) return;
  const r = await fetch("review/answer", {method: "POST", headers: {"content-type": "application/json"},
                                         body: JSON.stringify({path: current.path, label})});
  if (!r.ok) { $("status").textContent = "error: " + (await r.json()).error; return; }
  $("status").dataset.saved = current.path;
  show();
}
document.addEventListener("keydown", e => {
  const i = parseInt(e.key, 10) - 1;
  if (i >= 0 && i < CLASSES.length) answer(CLASSES[i]);
});
load();
</script></body></html>
"""
