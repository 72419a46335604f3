"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and bench/ (no network).

It answers each image with the label `truth[sha256(image bytes)]` (or, for a `wrong_rate` share of
(image, pass) pairs chosen by hash, another one), counts requests per (image, pass) and can be scripted to fail: `server.script` is a queue of
actions consumed one per request, e.g. {"status": 429, "headers": {"Retry-After": "1"}}.
"""
import base64
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackTeacher:
    def __init__(self, truth=None, classes=None, latency_s=0.0, max_concurrency=None, wrong_rate=0.0,
                 style="plain", confidence=0.93, wrong_confidence=None, cost=0.0001, report_cost=True, reject_response_format=False,
                 seed=0):
        self.truth, self.classes = dict(truth or {}), list(classes or [])
        self.latency_s, self.max_concurrency, self.wrong_rate = latency_s, max_concurrency, wrong_rate
        self.style, self.confidence, self.cost, self.report_cost = style, confidence, cost, report_cost
        self.wrong_confidence = confidence if wrong_confidence is None else wrong_confidence
        self.reject_response_format = reject_response_format
        self.script = []                 # actions consumed one per request
        self.requests = Counter()        # (sha256, pass) -> requests received
        self.completed = Counter()       # (sha256, pass) -> 200 answers sent
        self.auth_headers, self.bodies = [], []
        self.rejected_429 = 0
        self.answers = self.wrong_answers = 0  # 200 answers sent, and how many carried a wrong label
        self._inflight, self._lock, self.seed = 0, threading.Lock(), seed
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                # headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms per call
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ behaviour
    @staticmethod
    def image_sha(body):
        for m in body.get("messages", []):
            if isinstance(m.get("content"), list):
                for part in m["content"]:
                    if part.get("type") == "image_url":
                        data = part["image_url"]["url"].split(",", 1)[1]
                        return hashlib.sha256(base64.b64decode(data)).hexdigest()
        return None

    def _send(self, h, status, obj=None, headers=None, raw=None):
        data = raw if raw is not None else json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def handle(self, h, body):
        sha = self.image_sha(body)
        pass_no = 1 if float(body.get("temperature", 0)) == 0 else 2
        with self._lock:
            self.requests[(sha, pass_no)] += 1
            self.auth_headers.append(h.headers.get("authorization"))
            self.bodies.append({k: v for k, v in body.items() if k != "messages"})
            action = self.script.pop(0) if self.script else None
            over = self.max_concurrency is not None and self._inflight >= self.max_concurrency
            if over:
                self.rejected_429 += 1
            else:
                self._inflight += 1
        if over:
            return self._send(h, 429, {"error": {"message": "rate limited", "code": 429}}, {"Retry-After": "0.05"})
        try:
            if action and action.get("delay"):
                time.sleep(action["delay"])
            if action and "status" in action:
                return self._send(h, action["status"], action.get("body", {"error": {"message": "scripted"}}),
                                  action.get("headers"))
            if action and "raw" in action:
                return self._send(h, 200, raw=action["raw"].encode())
            if self.reject_response_format and "response_format" in body:
                return self._send(h, 400, {"error": {"message": "response_format is not supported"}})
            if self.latency_s:
                time.sleep(self.latency_s)
            label = self.truth.get(sha, self.classes[0] if self.classes else "apple")
            conf = self.confidence
            # wrong answers depend on (seed, image, pass) only, not on the order threads arrive in, so a
            # run labels the same way every time
            u = self._unit("wrong", sha, pass_no)
            wrong = bool(self.wrong_rate) and u < self.wrong_rate
            if wrong:
                others = [c for c in self.classes if c != label]
                label = others[int(self._unit("which", sha, pass_no) * len(others))]
                conf = self.wrong_confidence
            with self._lock:
                self.answers += 1
                self.wrong_answers += bool(wrong)
            text = self.render(label, (action or {}).get("style", self.style), conf)
            usage = {"prompt_tokens": 400, "completion_tokens": 20, "total_tokens": 420}
            if self.report_cost:
                usage["cost"] = self.cost
            with self._lock:
                self.completed[(sha, pass_no)] += 1
            self._send(h, 200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": text}}],
                                "usage": usage})
        finally:
            with self._lock:
                self._inflight -= 1

    def _unit(self, *parts):
        h = hashlib.sha256("|".join(map(str, (self.seed,) + parts)).encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def render(self, label, style, c=None):
        c = self.confidence if c is None else c
        j = json.dumps({"label": label, "confidence": c, "why": "looks like it"})
        return {"plain": j,
                "fenced": f"```json\n{j}\n```",
                "prose": f"Sure. Here is my answer: {j} Hope that helps!",
                "variant": json.dumps({"label": label.replace("_", " ").title() + "s", "confidence": c}),
                "string_conf": json.dumps({"label": label, "confidence": f"{int(c * 100)}%"}),
                "outside": json.dumps({"label": "banana", "confidence": c}),
                "nojson": "I think it is an apple."}[style]
