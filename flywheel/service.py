"""The serving endpoint (`--step serve`): the run's promoted student in ONNX Runtime, then the LLM through
the label step's own teacher client, ledger, QC and budget, then a person, as an ASGI app (Starlette on
uvicorn), plus a review page where that person answers.

The student takes each upload's raw pixels: the exported graph resizes, sharpens and normalises them as
prep and training did (flywheel.export.Preprocess). An escalated upload is prepared as prep prepares
training images (flywheel.data.upscale, the same JPEG encoding) and stored once under
OUT/production/<sha256>.jpg, so the teacher, the review page and the flywheel can read it (the student
route writes nothing). Every escalation is appended (and flushed) to
escalations.jsonl with split "production" before its answer is returned, so kill -9 loses no logged
record; a human-routed one also gets a row in human_review.csv (written whole to a temp name, then
renamed), which is the review queue.
"""
import asyncio
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flywheel.cascade import NONE_OF_THESE

log = logging.getLogger(__name__)


SHA_LOCKS = 64  # lock stripes for escalations in flight (more than the threadpool's 40 workers)
MIN_VAL_IMAGES = 50  # fewer validation images fit the temperature and tau on too little to trust
SWAP_CHECK_S = 2.0  # how often serving looks for a newly exported student (seconds)
STATS_EVERY_S = 60.0  # how often serving appends its production counts (and once more when it stops)
NOT_ASKED = "not_asked"  # llm_status of an upload the LLM was never asked (unlike everything, or no teacher for it)


class BadImage(ValueError):
    pass


class Look(NamedTuple):
    """The student's look at one upload; done: it answers alone (out is the response)."""
    served: "Served"  # the student that looked: the rest of the request uses it too
    data: bytes
    img: object  # PIL.Image, RGB
    probs: np.ndarray  # [C] calibrated
    out: dict
    unlike: str | None  # why it is unlike training (flywheel.ood), or None
    done: bool


def student_warnings(calibration_warning, n_val, tau):
    """What an operator must know before trusting this student's confidences (startup log and /health).

    >>> student_warnings(None, 120, 0.9)
    []
    >>> student_warnings("temperature at its search bound", 20, 1.5)[1:]
    ['only 20 validation images fitted the temperature and tau (fewer than 50)', 'tau 1.5 is above 1: every upload escalates']
    """
    out = [f"calibration: {calibration_warning}"] if calibration_warning else []
    if n_val < MIN_VAL_IMAGES:
        out.append(f"only {n_val} validation images fitted the temperature and tau (fewer than {MIN_VAL_IMAGES})")
    if tau > 1.0:
        out.append(f"tau {tau:g} is above 1: every upload escalates")
    return out


class Served(NamedTuple):
    """One student as served. The Service holds exactly one and replaces it whole (one reference assignment),
    so a request that took it finishes on it, whatever a live swap does meanwhile."""
    session: object       # onnxruntime.InferenceSession on the exported graph (raw uint8 pixels in)
    classes: list
    tau: float
    turn: int
    student_id: str
    img_size: int
    sharpen: bool
    ood: object           # flywheel.ood.OODModel, or None (an export from before it existed)
    warnings: list        # student_warnings
    reference: object     # flywheel.monitor.Reference: validation, for drift
    stamp: object         # export.json's fingerprint when loaded: a new one means a new export to load


def load_served(P, threads, tau=None, escalation_budget=None, target_precision=0.95, sharpen=True) -> Served:
    """The promoted turn's exported student, its tau (fitted on its validation split as the cascade step
    fits it), OOD model and drift reference."""
    from flywheel.calibrate import softmax
    from flywheel.export import serving_session
    from flywheel.monitor import reference_of
    from flywheel.ood import OODModel
    from flywheel.routing import fit_tau, student_id_of
    from flywheel.run import file_fingerprint, promoted
    from flywheel.student import load_student
    stamp = file_fingerprint(P.need(P.export, "export"))
    turn = promoted(P).turn
    best = load_student(P.need(P.turn(turn).best, "train"))
    session = serving_session(P, turn, threads)
    th = fit_tau(best, tau, escalation_budget, target_precision)
    ood = OODModel.load(P.ood) if P.ood.exists() else None
    if ood is None:
        log.warning("serve: no %s (exported before it existed): only degenerate sizes are caught as unlike training; "
                    "rerun --step export", P.ood)
    warns = student_warnings(best.get("calibration_warning"), len(best["val_labels"]), th.tau)
    for w in warns:
        log.warning("serve: turn %d's student comes with a warning (also in /health): %s", turn, w)
    ref = reference_of(softmax(best["val_logits"], best["temperature"]), 1.0 - ood.val_quantile if ood else 0.0)
    log.info("serve: turn %d's student, tau %.4f (%s)", turn, th.tau, th.rule)
    return Served(session, list(best["classes"]), float(th.tau), turn, student_id_of(best),
                  best["model_args"]["img_size"], sharpen, ood, warns, ref, stamp)


class Service:
    """What one request needs, shared by every request (ORT sessions and the ledger are thread-safe).

    Two kinds of work, kept apart so escalations never slow the student (issue 26): the student's look
    (decode, ONNX, OOD) runs in the web server's request threads; an escalation (JPEG, ledger, QC, LLM calls)
    runs in a pool of its own, max_escalations threads, and when every one is busy the upload is answered at
    once with the student's guess for a person to check, never queued out of sight."""

    def __init__(self, out, served: Served, teacher, ledger, qc, budget, esc, human_fields, max_upload_bytes,
                 teacher_acc, contest_below, max_escalations=16, reload=None):
        from flywheel.monitor import Monitor
        self.out, self.served = Path(out), served
        self.teacher, self.ledger, self.qc, self.budget, self.esc = teacher, ledger, qc, budget, esc
        self.human_fields, self.max_upload_bytes = human_fields, max_upload_bytes
        self.teacher_acc, self.contest_below = float(teacher_acc), float(contest_below)  # the cascade step's rule
        self.human_path = self.out / "human_review.csv"
        self.stop = getattr(teacher, "stop", None) or threading.Event()
        # one escalation per image at a time (nothing paid twice), from a fixed set of locks picked by sha256,
        # so a server that sees a million distinct uploads does not keep a million locks
        self._sha_locks = [threading.Lock() for _ in range(SHA_LOCKS)]
        self.esc_slots = int(max_escalations)
        self._slots = threading.BoundedSemaphore(self.esc_slots)
        self._in_flight, self._count_lock = 0, threading.Lock()  # for /health: the semaphore keeps its count private
        self.esc_pool = ThreadPoolExecutor(self.esc_slots, thread_name_prefix="escalate")
        self.monitor = Monitor(served.classes, served.reference, served.turn)
        self.monitor.watch_budget(budget)
        self.reload = reload  # () -> Served: the promoted, exported student now (live swap), or None
        self.server_id = uuid.uuid4().hex[:12]  # production_stats.jsonl: each line is one server's running total
        self.reload_error = None

    @property
    def classes(self):
        return self.served.classes

    def maybe_swap(self) -> bool:
        """Load the newly exported student if export.json changed since ours; requests in flight finish on the
        old one (they hold it). A failed load keeps the old student and says why in /health."""
        from flywheel.run import file_fingerprint
        if self.reload is None:
            return False
        try:
            if file_fingerprint(self.out / "artifacts" / "export.json") == self.served.stamp:
                return False
            new = self.reload()
        except Exception as e:  # noqa: BLE001 - a half-finished export, a bad file: keep serving the old student
            self.reload_error = f"{type(e).__name__}: {e}"
            log.warning("serve: kept turn %d's student; the new export did not load: %s", self.served.turn, e)
            return False
        if new.stamp == self.served.stamp:
            return False
        old, self.served, self.reload_error = self.served, new, None  # the swap: one reference
        self.monitor.swap(new.classes, new.reference, new.turn)
        log.info("serve: now serving turn %d's student (was turn %d), without a restart", new.turn, old.turn)
        return True

    def watch(self, every_s):
        """A daemon thread that checks for a new export every every_s seconds, and appends the production counts
        to production_stats.jsonl every STATS_EVERY_S (the report's production section)."""
        def loop():
            last = time.monotonic()
            while not self.stop.wait(every_s):
                self.maybe_swap()
                if time.monotonic() - last >= STATS_EVERY_S:
                    self.write_stats()
                    last = time.monotonic()
        threading.Thread(target=loop, daemon=True, name="student-swap").start()

    def write_stats(self):
        """One line: this server's cumulative counts by hour, class, size and source, and route."""
        from flywheel.io import JsonlAppender
        counts = self.monitor.snapshot()
        if counts:
            from flywheel.run import Paths
            f = JsonlAppender(Paths(self.out).production_stats, load=False)
            try:
                f.append({"server": self.server_id, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "turn": self.served.turn, "counts": counts})
            finally:
                f.close()

    # ------------------------------------------------------------------ one request
    def prepare(self, data: bytes):
        """Upload bytes (any format and size Pillow reads) -> the decoded image, RGB."""
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            # Pillow's own text names the in-memory buffer (<_io.BytesIO object at 0x...>): not for a client
            why = "truncated or corrupt" if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) else \
                "too large to decode safely" if isinstance(e, Image.DecompressionBombError) else "not a known image format"
            raise BadImage(f"the upload is not an image this server can read ({why}); send a PNG, JPEG, WebP, BMP, "
                           f"GIF or TIFF file in the multipart field 'file'") from None

    @staticmethod
    def prepped_jpeg(img, m: Served) -> bytes:
        """The image as prep writes training images (upscale, sharpen, JPEG): what the LLM and a person see."""
        from flywheel.data import jpeg_bytes, upscale
        return jpeg_bytes(upscale(img, m.img_size, m.sharpen))

    def store(self, jpg: bytes):
        """An escalated upload -> (path relative to the run, sha256), written once."""
        from flywheel.io import atomic_write_bytes
        sha = hashlib.sha256(jpg).hexdigest()
        rel = f"production/{sha}.jpg"
        if not (self.out / rel).exists():
            atomic_write_bytes(self.out / rel, jpg)
        return rel, sha

    @staticmethod
    def student(img, m: Served):
        """(calibrated class probabilities [C], the student's features [D] or None for an older export). The
        exported graph takes the raw pixels, uint8 [1, H, W, 3], and does the resize, sharpening and
        normalisation itself; it divides by T."""
        from flywheel.calibrate import softmax
        out = m.session.run(None, {"image": np.asarray(img)[None]})
        return softmax(out[0])[0], (out[1][0] if len(out) > 1 else None)

    def first_look(self, data: bytes) -> "Look":
        """The student's part of a request (decode, ONNX, the OOD check): cheap, in the request threads."""
        from flywheel.cascade import decide
        m = self.served  # this request's student, start to finish, whatever a live swap does meanwhile
        rid = uuid.uuid4().hex[:16]
        img = self.prepare(data)
        probs, feats = self.student(img, m)
        d = decide(probs, m.classes, m.tau)
        out = {"label": d.label, "confidence": round(float(probs.max()), 6), "route": "student",
               "probs": {c: round(float(p), 6) for c, p in zip(m.classes, probs)}, "needs_review": False,
               "request_id": rid, "turn": m.turn}
        unlike = m.ood.reason(img, feats) if m.ood is not None else None
        self.monitor.observe_student(probs, d.label, unlike is not None)
        return Look(m, data, img, probs, out, unlike, done=d.route == "student" and unlike is None)

    def classify(self, data: bytes) -> dict:
        """One upload, start to finish, in the calling thread (the app splits it: first_look, then settle)."""
        look = self.first_look(data)
        return look.out if look.done else self.settle(look)

    def try_reserve(self) -> bool:
        """A place among the --max_escalations in flight, or False at once (never a silent queue)."""
        if not self._slots.acquire(blocking=False):
            return False
        with self._count_lock:
            self._in_flight += 1
        return True

    @property
    def escalations_in_flight(self) -> int:
        return self._in_flight

    def settle_reserved(self, look):
        try:
            return self.settle(look)
        finally:
            with self._count_lock:
                self._in_flight -= 1
            self._slots.release()

    def settle(self, look, at_capacity=False) -> dict:
        """An upload the student does not answer alone: the LLM through the label step's QC (unless it is unlike
        training, or every escalation slot is taken), then a person. Runs in the escalation pool."""
        from flywheel.cascade import decide, escalation_record
        m, img, probs, out, unlike = look.served, look.img, look.probs, look.out, look.unlike
        rel, sha = self.store(self.prepped_jpeg(img, m))
        upload_sha = hashlib.sha256(look.data).hexdigest()  # lets the flywheel refuse a test image sent as-is
        if unlike is not None or at_capacity:  # unlike: the student's confidence means nothing here, and the
            # LLM's answer would be one of ours; at capacity: a person, rather than a queue the client cannot see
            status, label, llm_conf, answers = NOT_ASKED, None, None, []
            error = unlike or (f"{self.esc_slots} escalations already in flight (--max_escalations): the "
                               f"student's guess, for a person to check")
        else:
            status, label, llm_conf, answers, error = self.escalate({"path": rel, "file": str(self.out / rel), "sha256": sha})
        p_right = llm_conf if self.qc.second_pass == "model" and status == "accepted" else None  # label model P(right)
        d = decide(probs, m.classes, m.tau, status, label, p_right or self.teacher_acc, self.contest_below)
        if unlike is not None or at_capacity:
            d = d._replace(route="human")  # however confident the student is
        rec = {**escalation_record(m.student_id, m.turn, "production", rel, sha, probs, m.classes, m.tau,
                                   d.route, status, label, answers, llm_posterior=d.llm_posterior, llm_p_right=p_right),
               "request_id": out["request_id"], "upload_sha256": upload_sha, "error": error,
               "image_wh": list(img.size)}
        self.esc.append(rec)  # flushed before the answer leaves: kill -9 loses no logged escalation
        if d.route == "human":
            self.enqueue_for_review(rec, m.turn)
        # for a person: the best guess so far (a contested LLM label: the top class of the combined evidence)
        return {**out, "label": d.label, "confidence": round(float(llm_conf if d.route == "llm" else probs.max()), 6),
                "route": d.route, "needs_review": d.route == "human",
                **({"reason": error} if d.route == "human" and error else {})}

    def escalate(self, it):
        """The label step's QC on one image. -> (status, label, confidence, pass records, error or None)."""
        from flywheel.labeling import ask_item, ledger_verdict
        from flywheel.teacher import FatalTeacherError
        error = None
        if not self.teacher.can_answer(it["path"]):
            return NOT_ASKED, None, None, [], f"{self.teacher.source} teacher cannot answer uploads: a person answers"
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

    def enqueue_for_review(self, rec, turn):
        from flywheel.cascade import merge_human_rows, review_row
        merge_human_rows(self.human_path, self.human_fields, [review_row(rec, turn)], keep_queued=True)  # a cascade may write it too

    def pending(self):
        return [r for r in self._rows() if not (r.get("label_final") or "").strip()]

    def answer(self, path, label):
        """A person's label for one queued image, written atomically. -> the number still pending."""
        from flywheel.io import FileLock, write_csv
        if label not in self.classes + [NONE_OF_THESE, ""]:  # "": undo
            raise ValueError(f"label {label!r} is not one of {self.classes}, {NONE_OF_THESE!r} or '' (undo)")
        with FileLock(self.human_path):  # the cascade step of a turn beside us rewrites it too
            rows = self._rows()
            hit = [r for r in rows if r["path"] == path]
            if not hit:
                raise KeyError(path)
            for r in hit:
                r["label_final"], r["source"] = label, ("human" if label else "")
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
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def error(status, message):
        return JSONResponse({"error": message}, status_code=status)

    async def health(request):
        m = svc.served
        return JSONResponse({"status": "ok", "turn": m.turn, "student": f"turn_{m.turn}", "student_id": m.student_id,
                             "tau": m.tau, "classes": m.classes, "warnings": m.warnings,
                             "ood_threshold": None if m.ood is None else m.ood.threshold,
                             "escalations_in_flight": svc.escalations_in_flight, "max_escalations": svc.esc_slots,
                             "reload_error": svc.reload_error, "drift": svc.monitor.drift()})

    async def metrics(request):
        return Response(svc.monitor.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

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
            look = await run_in_threadpool(svc.first_look, data)
        except BadImage as e:
            return error(400, str(e))
        if look.done:
            out = look.out
        elif svc.try_reserve():  # the escalation pool's own threads: student requests never wait behind it
            out = await asyncio.get_running_loop().run_in_executor(svc.esc_pool, svc.settle_reserved, look)
        else:  # every escalation slot busy: the student's guess now, for a person, rather than a hidden queue
            out = await run_in_threadpool(svc.settle, look, True)
        seconds = time.perf_counter() - t0
        src = form.get("source")
        svc.monitor.observe_request(out["route"], seconds, out["label"], look.img.size,
                                    str(src)[:64] if isinstance(src, str) else None)
        out["latency_ms"] = round(1000 * seconds, 3)
        return JSONResponse(out)

    async def review_page(request):
        return HTMLResponse(REVIEW_HTML.replace("__CLASSES__", json.dumps(svc.classes)).replace("__NONE__", NONE_OF_THESE))

    async def review_items(request):
        rows = svc._rows()
        return JSONResponse({"pending": svc.pending(), "total": len(rows),
                             "done": [r for r in rows if (r.get("label_final") or "").strip()]})

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
        Route("/health", health), Route("/metrics", metrics), Route("/v1/classify", classify, methods=["POST"]),
        Route("/review", review_page), Route("/review/items", review_items), Route("/review/image", review_image),
        Route("/review/answer", review_answer, methods=["POST"])])


# One pending image at a time, big; a button per class (the student's guess highlighted), keys 1..9 for the
# first nine, a filter box for any number of classes (type, then Enter), "none of these", skip and undo, and
# a progress count. No build step, no external assets (the server may have no internet either).
REVIEW_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>cifar_distill review</title>
<style>
 body{font-family:system-ui,sans-serif;margin:2em;max-width:820px}
 img{width:320px;height:320px;image-rendering:pixelated;border:1px solid #999}
 button{font-size:1.05em;margin:.25em;padding:.45em .9em}
 button.guess{outline:3px solid #e69f00;font-weight:bold}
 button[hidden]{display:none}
 .meta{color:#444;margin:.5em 0}
 #progress{font-weight:bold}
</style></head>
<body>
<h1>Review queue</h1>
<div id="progress">loading…</div>
<div id="status"></div>
<div id="card" hidden>
  <img id="img" alt="image to label">
  <div class="meta">student's guess: <b id="student"></b> (highlighted) · LLM: <b id="llm"></b> · <span id="where"></span></div>
  <div class="meta" id="reason"></div>
  <input id="filter" placeholder="type a class name, Enter picks the first match (/ to focus)" size="48">
  <div id="buttons"></div>
  <button id="none">none of these (x)</button> <button id="skip">skip (s)</button> <button id="undo" disabled>undo (u)</button>
  <p class="meta">Keys: <span id="keys"></span></p>
</div>
<script>
const CLASSES = __CLASSES__, NONE = "__NONE__";
let queue = [], current = null, done = 0, total = 0, answered = [];
const $ = id => document.getElementById(id);
$("keys").textContent = CLASSES.slice(0, 9).map((c, i) => `${i + 1} = ${c}`).join(", ")
  + (CLASSES.length > 9 ? `; the other ${CLASSES.length - 9}: type in the box` : "") + "; x none of these, s skip, u undo";
CLASSES.forEach((c, i) => {
  const b = document.createElement("button");
  b.textContent = i < 9 ? `${i + 1} ${c}` : c; b.dataset.label = c; b.id = "label-" + c;
  b.onclick = () => answer(c);
  $("buttons").appendChild(b);
});
$("none").onclick = () => answer(NONE);
$("skip").onclick = () => skip();
$("undo").onclick = () => undo();
function visible() { return CLASSES.filter(c => !$("label-" + c).hidden); }
$("filter").oninput = () => {
  const q = $("filter").value.trim().toLowerCase();
  CLASSES.forEach(c => { $("label-" + c).hidden = q !== "" && !c.toLowerCase().includes(q); });
};
$("filter").onkeydown = e => {
  if (e.key === "Enter" && visible().length) { answer(visible()[0]); }
  if (e.key === "Escape") { $("filter").value = ""; $("filter").oninput(); $("filter").blur(); }
  e.stopPropagation();
};
async function load() {
  const r = await (await fetch("review/items")).json();
  queue = r.pending; total = r.total; done = r.done.length;
  show();
}
function progress() {
  $("progress").textContent = `${done} of ${total} reviewed · ${queue.length + (current ? 1 : 0)} waiting`;
}
function show() {
  current = queue.shift() || null;
  $("card").hidden = !current;
  $("filter").value = ""; $("filter").oninput();
  progress();
  if (!current) { $("status").textContent = "Nothing waiting for review."; return; }
  $("img").src = "review/image?path=" + encodeURIComponent(current.path);
  $("student").textContent = `${current.student_label} (${current.student_conf})`;
  CLASSES.forEach(c => $("label-" + c).classList.toggle("guess", c === current.student_label));
  $("llm").textContent = current.llm_answers || "not asked";
  $("where").textContent = current.path;
}
async function post(path, label) {
  const r = await fetch("review/answer", {method: "POST", headers: {"content-type": "application/json"},
                                         body: JSON.stringify({path, label})});
  if (!r.ok) { $("status").textContent = "error: " + (await r.json()).error; return false; }
  return true;
}
async function answer(label) {
  if (!current || !(await post(current.path, label))) return;
  answered.push(current); done += 1;
  $("undo").disabled = false;
  $("status").textContent = `saved ${label} for ${current.path}`;
  $("status").dataset.saved = current.path;
  show();
}
function skip() {
  if (!current) return;
  queue.push(current); current = null;
  $("status").textContent = "skipped: it comes back at the end";
  show();
}
async function undo() {
  const last = answered.pop();
  if (!last || !(await post(last.path, ""))) return;
  done -= 1;
  if (current) queue.unshift(current);
  queue.unshift(last); current = null;
  $("undo").disabled = !answered.length;
  $("status").textContent = `undone: ${last.path} waits again`;
  $("status").dataset.undone = last.path;
  show();
}
document.addEventListener("keydown", e => {
  if (e.key === "/") { e.preventDefault(); $("filter").focus(); return; }
  if (e.key === "x") return answer(NONE);
  if (e.key === "s") return skip();
  if (e.key === "u") return undo();
  const i = parseInt(e.key, 10) - 1;
  if (i >= 0 && i < Math.min(9, CLASSES.length)) answer(CLASSES[i]);
});
load();
</script></body></html>
"""
