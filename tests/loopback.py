"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and bench/ (no network).

It answers each image with the label `truth[sha256(image bytes)]` (or, for a `wrong_rate` share of
(image, pass) pairs chosen by hash, another one), counts requests per (image, pass) and can be scripted to fail: `server.script` is a queue of
actions consumed one per request, e.g. {"status": 429, "headers": {"Retry-After": "1"}} or {"label": "pear"}.
"""
import base64
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


LOOKALIKES = {"apple": "orange", "orange": "apple", "pear": "apple", "sweet_pepper": "orange", "mushroom": "pear"}


class TeacherProfile:
    """SIMULATED vision-LLM behaviour (for label-quality benches and tests), modelled on what real
    teachers do rather than on what makes QC look good:

    - per-image difficulty h in [0, 1): at temperature 0 a model is wrong exactly on its hardest
      (1 - accuracy) share of images, so errors gather on hard images and repeat across calls;
    - with `ambiguity` ({sha256: a in [0, 1]}, measured from the image's pixels by the bench: how far
      it is blended toward its look-alike class), difficulty is (1 - coupling) x a private draw +
      coupling x a, mapped back to a uniform rank: a `coupling` share of what makes an image hard is
      visible in the image, so a student that learns from pixels is fooled by the same images and
      cannot catch those errors (confident learning is not handed the answer); the rest is the
      teacher's own quirk, which a student can contradict;
    - a wrong answer names the class's look-alike (LOOKALIKES) 70% of the time, fixed per image, so two
      wrong answers often agree with each other;
    - at temperature > 0 each call jitters the difficulty (sd `temp_jitter`), so only images near the
      boundary flip: a second sample catches some errors, not all;
    - a second model (any other model name) has its own difficulty, equal to the first model's on an
      `overlap` share of images and independent on the rest: its errors partly overlap;
    - stated confidence: "informative" falls gently with difficulty plus noise (sd 0.06), so wrong
      answers are lower on average but overlap right ones (AUROC ~0.75, never a fixed low value);
      "flat" says 0.95 or 0.99 whatever the image, like the real Gemini logs;
    - faults: a share `fault_rate` of requests gets 429, 500, prose around the JSON, a ``` fence or a
      label variant ("Sweet Peppers").
    """

    def __init__(self, classes, accuracy=0.83, conf_mode="informative", overlap=0.5, temp_jitter=0.12,
                 second_accuracy=None, fault_rate=0.05, seed=0, ambiguity=None, coupling=0.5, logprobs=False):
        self.classes, self.accuracy, self.conf_mode = list(classes), accuracy, conf_mode
        self.ambiguity, self.coupling = dict(ambiguity or {}), float(coupling)
        self.overlap, self.temp_jitter, self.fault_rate, self.seed = overlap, temp_jitter, fault_rate, seed
        self.second_accuracy = accuracy if second_accuracy is None else second_accuracy
        self.logprobs = logprobs  # the endpoint returns the label token's log-probability when asked
        self.primary = None  # the first model name seen is the primary

    def logprob(self, sha, model, temperature, n_call):
        """The label token's log-probability (None: this endpoint returns none): the model's margin over its
        own decision boundary (accuracy - difficulty) plus noise, so it separates right from wrong well but
        not perfectly (AUROC ~0.9, like token probabilities in the calibration literature)."""
        import math
        if not self.logprobs:
            return None
        acc = self.accuracy if model == self.primary else self.second_accuracy
        z = 8.0 * (acc - self.difficulty(sha, model)) + 1.5 + 1.0 * self._normal("lp", sha, model, temperature, n_call)
        return round(-math.log1p(math.exp(-z)), 4)

    def _u(self, *parts):
        h = hashlib.sha256("|".join(map(str, (self.seed,) + parts)).encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def _normal(self, *parts):
        import math
        u1, u2 = max(self._u("n1", *parts), 1e-12), self._u("n2", *parts)
        return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)

    def difficulty(self, sha, model):
        h = self._u("hard", sha)
        if model != self.primary and self._u("share", sha) >= self.overlap:
            h = self._u("hard", model, sha)
        if sha in self.ambiguity:
            c = self.coupling
            h = sum_uniform_cdf((1 - c) * h + c * self.ambiguity[sha], 1 - c, c)
        return h

    def answer(self, sha, truth, model, temperature, n_call):
        """-> (label, confidence, style, fault) for one request."""
        if self.primary is None:
            self.primary = model
        acc = self.accuracy if model == self.primary else self.second_accuracy
        h = self.difficulty(sha, model)
        if temperature > 0:
            h += self.temp_jitter * self._normal("jit", sha, model, temperature, n_call)
        wrong = h > acc
        label = truth
        if wrong:
            others = [c for c in self.classes if c != truth]
            look = LOOKALIKES.get(truth)
            if look in others and self._u("look", sha) < 0.7:
                label = look
            else:
                label = others[int(self._u("other", sha, model) * len(others))]
        if self.conf_mode == "flat":
            conf = 0.99 if self._u("flat", sha, model, n_call) < 0.15 else 0.95
        else:
            # a weak, noisy signal: AUROC for "right" ~0.75 (bench/label_quality.py prints it), like the
            # better verbalised confidences in the literature, never a separable one
            conf = min(0.99, max(0.3, 0.95 - 0.15 * self.difficulty(sha, model) + 0.06 * self._normal("conf", sha, model, n_call)))
        u = self._u("fault", sha, model, temperature, n_call)
        fault = None
        if u < self.fault_rate:
            fault = ["429", "500", "prose", "fenced", "variant"][int(u / self.fault_rate * 5)]
        return label, round(conf, 3), fault


def sum_uniform_cdf(x, a, b):
    """P(A + B <= x) for independent A ~ U(0, a), B ~ U(0, b) (a or b may be 0): maps a mixed difficulty
    back to a uniform rank, so "wrong above `accuracy`" keeps the raw accuracy whatever the coupling.

    >>> sum_uniform_cdf(0.5, 0.5, 0.5), sum_uniform_cdf(0.25, 0.5, 0.5), sum_uniform_cdf(0.3, 1.0, 0.0)
    (0.5, 0.125, 0.3)
    """
    a, b = max(a, b), min(a, b)
    if b <= 1e-12:
        return min(max(x / a, 0.0), 1.0)
    if x <= 0:
        return 0.0
    if x <= b:
        return x * x / (2 * a * b)
    if x <= a:
        return (x - b / 2) / a
    if x <= a + b:
        return 1 - (a + b - x) ** 2 / (2 * a * b)
    return 1.0


class Faults:
    """What a busy provider does now and then (SIMULATED): a 429 with Retry-After, a 503, a request that hangs
    for hang_s before it answers. draw() -> None, (429 or 503, retry-after seconds) or ("hang", seconds)."""

    def __init__(self, rate_429=0.05, rate_503=0.02, rate_hang=0.005, retry_after_s=1, hang_s=5.0, seed=0):
        self.rates = [(429, rate_429, retry_after_s), (503, rate_503, retry_after_s), ("hang", rate_hang, hang_s)]
        self._rng, self._lock = random.Random(seed), threading.Lock()

    def draw(self):
        with self._lock:
            u = self._rng.random()
        for kind, rate, arg in self.rates:
            if u < rate:
                return kind, arg
            u -= rate
        return None


class LoopbackTeacher:
    def __init__(self, truth=None, classes=None, latency_s=0.0, max_concurrency=None, wrong_rate=0.0,
                 style="plain", confidence=0.93, wrong_confidence=None, cost=0.0001, report_cost=True, reject_response_format=False,
                 seed=0, profile=None, reject_logprobs=False, logprob=None, nodelay=True, faults=None):
        self.truth, self.classes = dict(truth or {}), list(classes or [])
        self.latency_s, self.max_concurrency, self.wrong_rate = latency_s, max_concurrency, wrong_rate
        self.style, self.confidence, self.cost, self.report_cost = style, confidence, cost, report_cost
        self.wrong_confidence = confidence if wrong_confidence is None else wrong_confidence
        self.reject_response_format = reject_response_format
        self.reject_logprobs = reject_logprobs  # answer 400 to a body that asks for logprobs
        self.logprob = logprob           # the label token's log-probability when asked (None: the request is ignored)
        self.script = []                 # actions consumed one per request
        self.requests = Counter()        # (sha256, pass) -> requests received
        self.completed = Counter()       # (sha256, pass) -> 200 answers sent
        self.auth_headers, self.bodies = [], []
        self.rejected_429 = 0
        self.answers = self.wrong_answers = 0  # 200 answers sent, and how many carried a wrong label
        self._inflight, self._lock, self.seed = 0, threading.Lock(), seed
        self.profile = profile           # a TeacherProfile: realistic, SIMULATED answers (benches)
        self.first_answers = {}          # (sha, model) -> label of the first T=0 answer (the raw teacher)
        self.faults = faults             # Faults: 429 with Retry-After, 503 and hangs at random (benches)
        self.fault_counts = Counter()
        self.keep_messages, self.messages = False, []  # whole request bodies, when a test reads the prompt
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                # headers and body go out in two writes; without this, Nagle + delayed ACK add ~40 ms per call
                # unless the client acknowledges at once (flywheel/quickack.py); nodelay=False is such a provider
                if nodelay:
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
            if self.keep_messages:
                self.messages.append(body)
            action = self.script.pop(0) if self.script else None
            over = self.max_concurrency is not None and self._inflight >= self.max_concurrency
            if over:
                self.rejected_429 += 1
            else:
                self._inflight += 1
        if over:
            return self._send(h, 429, {"error": {"message": "rate limited", "code": 429}}, {"Retry-After": "0.05"})
        try:
            fault = self.faults.draw() if self.faults is not None and not action else None
            if fault:
                with self._lock:
                    self.fault_counts[fault[0]] += 1
                if fault[0] == "hang":
                    time.sleep(fault[1])
                else:
                    return self._send(h, fault[0], {"error": {"message": "simulated fault"}}, {"Retry-After": str(fault[1])})
            if action and action.get("delay"):
                time.sleep(action["delay"])
            if action and "status" in action:
                return self._send(h, action["status"], action.get("body", {"error": {"message": "scripted"}}),
                                  action.get("headers"))
            if action and "raw" in action:
                return self._send(h, 200, raw=action["raw"].encode())
            if self.reject_response_format and "response_format" in body:
                return self._send(h, 400, {"error": {"message": "response_format is not supported"}})
            if self.reject_logprobs and "logprobs" in body:
                return self._send(h, 400, {"error": {"message": "logprobs is not supported for this model"}})
            if self.latency_s:
                time.sleep(self.latency_s)
            label = self.truth.get(sha, self.classes[0] if self.classes else "apple")
            conf = self.confidence
            if isinstance(label, tuple):  # (label, stated confidence) for this image
                label, conf = label
            if self.profile is not None:
                return self._profiled(h, body, sha, label, action)
            # wrong answers depend on (seed, image, pass) only, not on the order threads arrive in, so a
            # run labels the same way every time
            u = self._unit("wrong", sha, pass_no)
            wrong = bool(self.wrong_rate) and u < self.wrong_rate
            if wrong:
                others = [c for c in self.classes if c != label]
                label = others[int(self._unit("which", sha, pass_no) * len(others))]
                conf = self.wrong_confidence
            if action and "label" in action:  # a scripted answer: {"label": "pear"}
                label = action["label"]
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
                                "choices": [self.choice(text, label, body, self.logprob)], "usage": usage})
        finally:
            with self._lock:
                self._inflight -= 1

    def _profiled(self, h, body, sha, truth, action):
        model, temp = body.get("model"), float(body.get("temperature", 0))
        with self._lock:
            n_call = self.completed[(sha, model, temp)]
            self.completed[(sha, model, temp)] += 1
        label, conf, fault = self.profile.answer(sha, truth, model, temp, n_call)
        lp = self.profile.logprob(sha, model, temp, n_call)
        if fault == "429":
            return self._send(h, 429, {"error": {"message": "rate limited", "code": 429}}, {"Retry-After": "0.01"})
        if fault == "500":
            return self._send(h, 500, {"error": {"message": "upstream error"}})
        with self._lock:
            self.answers += 1
            self.wrong_answers += label != truth
            if temp == 0:
                self.first_answers.setdefault((sha, model), label)
        style = {"prose": "prose", "fenced": "fenced", "variant": "variant"}.get(fault, "plain")
        usage = {"prompt_tokens": 400, "completion_tokens": 20, "total_tokens": 420, "cost": self.cost}
        self._send(h, 200, {"id": "x", "object": "chat.completion", "model": model,
                            "choices": [self.choice(self.render(label, style, conf), label, body, lp)], "usage": usage})

    @staticmethod
    def choice(text, label, body, lp):
        """One choice; with logprobs asked for and lp set, OpenAI's logprobs.content for the text, the label's
        first token (its first half: a label split over two tokens) carrying lp, every other token 0.0."""
        out = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if not body.get("logprobs") or lp is None:
            return out
        at = text.find(f'"{label}"')
        if at < 0:  # a reply that does not spell the label as listed: no token to read
            return out
        at, half = at + 1, max(1, len(label) // 2)
        toks = [(text[:at], 0.0), (label[:half], float(lp)), (label[half:], -0.001), (text[at + len(label):], 0.0)]
        out["logprobs"] = {"content": [{"token": t, "logprob": v, "top_logprobs": []} for t, v in toks if t]}
        return out

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
