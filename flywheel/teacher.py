"""The teacher: an OpenAI-compatible chat-completions client for a vision LLM, and the offline oracle.

Retry policy (after openai-python's _base_client): retry timeouts, connection errors, 408, 409, 429
and 5xx with exponential backoff and jitter, honouring Retry-After up to a cap (a 429 waits the larger of
Retry-After and the backoff, and has a 4x larger retry budget, so sustained rate limiting slows the run
instead of failing images); 401/402/403 stop the
run at once (retrying cannot fix a bad key or an empty wallet); any other 4xx is reported with its
body. Every retry decision is logged at debug level. The API key is never logged or stored: every
error text passes through `redact` first (a server or h11 may echo the Authorization header).

A dead endpoint fails fast: a run of consecutive transport failures across all threads (connection
refused, DNS, TLS, connect timeouts) trips a circuit breaker that stops the step (FatalTeacherError).
A stop event (Ctrl-C) cuts retry waits short and starts no new attempt.

Shortcut taken: one image per request (no batching of images into one prompt), so that each answer
maps to exactly one ledger record and one price.
"""
import base64
import functools
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

from flywheel import quickack
from flywheel.io import Closing, stable_unit

log = logging.getLogger(__name__)

PROMPT_VERSION = "v1"  # kept in records for humans; the ledger key uses question_hash, not this
DEFAULT_TIMEOUT_S = 60.0
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a Retry-After above this is capped: we would rather fail than hang
RETRYABLE_STATUS = {408, 409, 429}
RATE_LIMIT_RETRY_FACTOR = 4  # 429s get 4x --max_retries: sustained rate limiting is normal, not a failure
MAX_RATE_LIMIT_WAIT_S = 120.0  # wall-clock cap on one call's 429 waits: no 20-minute stalls behind a storm
MAX_TOKENS = 300
# circuit breaker: this many consecutive transport failures (any thread), or at least
# BREAKER_MIN_FAILURES of them spanning BREAKER_SPAN_S seconds, stop the step. With 10 workers and a
# refused connection that is well under a second; with one worker and 10 s connect timeouts, ~30 s.
BREAKER_FAILURES = 8
BREAKER_MIN_FAILURES, BREAKER_SPAN_S = 3, 20.0
FATAL_STATUS = {401: "the API key was rejected (401 Unauthorized)",
                402: "the account has no credits left (402 Payment Required)",
                403: "the key may not use this model or endpoint (403 Forbidden)"}

SYSTEM_PROMPT = "You are a careful image annotator. You answer with strict JSON only."
USER_PROMPT = """Classify the photo into exactly one of these classes:
{class_list}

Reply with strict JSON and nothing else:
{{"label": "<one class name exactly as listed>", "confidence": <number 0-1>, "why": "<at most 12 words>"}}"""


class FatalTeacherError(RuntimeError):
    """An error no retry can fix (bad key, no credits, forbidden): the run stops at once."""


class InvalidReply(ValueError):
    """A reply with no JSON, or a label outside the classes. Counted, maybe re-asked, never accepted."""


@dataclass
class Answer:
    """One finished teacher call. status: ok | invalid | error."""
    status: str
    label: str = None
    confidence: float = None
    why: str = ""
    raw: str = ""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_estimated: bool = False
    latency_s: float = 0.0
    http_status: int = None
    label_logprob: float = None  # log-probability of the label's first token, when the endpoint returned logprobs
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- prompt + parsing

def build_prompt(class_order, task=None) -> str:
    """The user text: the built-in prompt, or the task spec's (flywheel.task) when there is one."""
    if task is not None:
        from flywheel.task import task_prompt
        return task_prompt(task, class_order)
    return USER_PROMPT.format(class_list="\n".join(f"- {c}" for c in class_order))


TOP_LOGPROBS = 5
# what a body asks for beyond the plain chat call, dropped one at a time (and remembered for the run) when the
# endpoint answers 400: structured outputs fall back to JSON mode, then to the prompt alone
RESPONSE_FORMATS = ("json_schema", "json_object", None)


def response_format(kind, class_order):
    """The response_format body for kind (json_schema: the label is an enum of the classes), or None.

    >>> response_format("json_schema", ["a", "b"])["json_schema"]["schema"]["properties"]["label"]
    {'type': 'string', 'enum': ['a', 'b']}
    >>> response_format("json_object", ["a"]), response_format(None, ["a"])
    ({'type': 'json_object'}, None)
    """
    if kind == "json_schema":
        schema = {"type": "object", "additionalProperties": False, "required": ["label", "confidence", "why"],
                  "properties": {"label": {"type": "string", "enum": list(class_order)},
                                 "confidence": {"type": "number"}, "why": {"type": "string"}}}
        return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}
    return {"type": kind} if kind else None


def label_logprob(logprobs):
    """The log-probability of the first token of the reply's label value, from OpenAI's chat logprobs
    ({"content": [{"token", "logprob", "top_logprobs"}]}); None when the reply has none or no label.
    A label split over tokens is read at its first token, where the model chose it:

    >>> toks = [('{"', 0.0), ('label', 0.0), ('":', 0.0), (' "', 0.0), ('sweet', -0.2), ('_pe', -0.01), ('pper', 0.0),
    ...         ('",', 0.0)]
    >>> label_logprob({"content": [{"token": t, "logprob": lp} for t, lp in toks]})
    -0.2
    >>> label_logprob(None), label_logprob({"content": [{"token": "hi", "logprob": -1.0}]})
    (None, None)
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    text, spans = "", []
    for t in content:
        tok = str(t.get("token") or "")
        spans.append((len(text), len(text) + len(tok), t.get("logprob")))
        text += tok
    m = re.search(r'"label"\s*:\s*"', text)
    if not m:
        return None
    for start, end, lp in spans:
        if start <= m.end() < end and lp is not None:
            return float(lp)
    return None


def question_hash(class_order, temperature, max_tokens=MAX_TOKENS, task=None) -> str:
    """A hash of everything that shapes the answer except the image and the model: the system and
    user text as rendered (so the class list and its order), the temperature and max_tokens. The
    ledger keys answers on it, so a changed prompt or class list never reuses another question's answer.

    >>> question_hash(["a", "b"], 0.0) == question_hash(["a", "b"], 0)
    True
    >>> len({question_hash(["a", "b"], 0.0), question_hash(["b", "a"], 0.0), question_hash(["a", "b"], 0.7)})
    3
    """
    return _question_hash(tuple(class_order), float(temperature), int(max_tokens), task)


@functools.lru_cache(maxsize=4096)  # QC asks it for every image and pass; the orders repeat
def _question_hash(class_order, temperature, max_tokens, task=None):
    import hashlib
    spec = {"system": SYSTEM_PROMPT, "user": build_prompt(class_order, task),
            "temperature": temperature, "max_tokens": max_tokens}
    if task is not None:  # the spec's digest covers its example images too; without a spec, keys are as before
        spec["task"] = task.digest
    spec = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def pass_class_order(classes, pass_no: int, key: str):
    """Pass 1 lists the classes as given; pass 2 a different order, fixed per image (so reruns match).

    >>> pass_class_order(["a", "b", "c"], 1, "x")
    ['a', 'b', 'c']
    >>> pass_class_order(["a", "b", "c"], 2, "x") != ["a", "b", "c"]
    True
    """
    classes = list(classes)
    if pass_no == 1 or len(classes) < 2:
        return classes
    rng = random.Random(int(stable_unit("order", key, pass_no) * 2**32))
    order = classes[:]
    while order == classes:
        rng.shuffle(order)
    return order


def _norm(s: str) -> str:
    return re.sub(r"[\s\-_]+", "_", str(s).strip().lower()).strip("_")


def normalize_label(label, classes):
    """Map a free-form label to one of `classes`, or None.

    Case, spaces, hyphens and plurals are forgiven; anything else is not.
    >>> normalize_label("Sweet Peppers", ["apple", "sweet_pepper"])
    'sweet_pepper'
    >>> normalize_label("apples", ["apple"]), normalize_label("banana", ["apple"])
    ('apple', None)
    """
    n = _norm(label)
    cands = {n}
    if n.endswith("es"):
        cands.add(n[:-2])
    if n.endswith("s"):
        cands.add(n[:-1])
    for c in classes:
        if _norm(c) in cands:
            return c
    return None


def parse_confidence(x) -> float:
    """A number, a numeric string or a percentage -> [0, 1].

    >>> parse_confidence(0.8), parse_confidence("0.8"), parse_confidence("80%"), parse_confidence(80)
    (0.8, 0.8, 0.8, 0.8)
    """
    if isinstance(x, bool) or x is None:
        raise InvalidReply(f"confidence {x!r} is not a number")
    pct = False
    if isinstance(x, str):
        s = x.strip()
        pct = s.endswith("%")
        try:
            x = float(s.rstrip("%").strip())
        except ValueError:
            raise InvalidReply(f"confidence {s!r} is not a number") from None
    x = float(x)
    if pct or 1.0 < x <= 100.0:
        x /= 100.0
    if not 0.0 <= x <= 1.0 or x != x:
        raise InvalidReply(f"confidence {x!r} is outside 0-1")
    return round(x, 6)


def extract_json(text: str) -> dict:
    r"""The first JSON object in `text`: bare, in a ``` fence, or surrounded by prose. A real JSON
    decoder (raw_decode from each `{`) reads it, so escaped quotes and braces in strings are fine.

    >>> extract_json('Sure: {"label": "pear", "why": "about 3\\" wide {ish}"} done')["why"]
    'about 3" wide {ish}'
    """
    decoder = json.JSONDecoder()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S | re.I)
    for cand in ([fence.group(1)] if fence else []) + [text]:
        start = cand.find("{")
        while start != -1:
            try:
                obj, _ = decoder.raw_decode(cand, start)
                if isinstance(obj, dict):
                    return obj
            except json.JSONDecodeError:
                pass
            start = cand.find("{", start + 1)
    raise InvalidReply("no JSON object in the reply")


def parse_reply(text: str, classes):
    """Reply text -> (label, confidence, why). Raises InvalidReply.

    >>> parse_reply('Sure! ```json\\n{"label": "Pears", "confidence": "90%", "why": "green"}\\n```', ["pear"])
    ('pear', 0.9, 'green')
    """
    obj = extract_json(text or "")
    obj = {str(k).lower(): v for k, v in obj.items()}
    if "label" not in obj:
        raise InvalidReply("JSON has no 'label'")
    label = normalize_label(obj["label"], classes)
    if label is None:
        raise InvalidReply(f"label {obj['label']!r} is not one of the classes")
    if "confidence" not in obj:
        raise InvalidReply("JSON has no 'confidence'")
    return label, parse_confidence(obj["confidence"]), str(obj.get("why", ""))[:200]


# ----------------------------------------------------------------------------- HTTP client

def retry_after_s(headers, now=None):
    """Seconds the server asked us to wait, or None: `retry-after-ms`, then `Retry-After` as seconds or
    as an HTTP date. Capped at MAX_RETRY_AFTER_S.

    >>> retry_after_s({"retry-after-ms": "1500"}), retry_after_s({"retry-after": "3"})
    (1.5, 3.0)
    >>> retry_after_s({"retry-after": "Wed, 21 Oct 2026 07:28:10 GMT"}, now=1792567680.0)
    10.0
    >>> retry_after_s({"retry-after": "soon"}) is None
    True
    """
    from email.utils import parsedate_to_datetime
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    wait = None
    try:
        if headers.get("retry-after-ms"):
            wait = float(headers["retry-after-ms"]) / 1000.0
    except ValueError:
        pass
    ra = headers.get("retry-after")
    if wait is None and ra:
        try:
            wait = float(ra)
        except ValueError:
            try:
                wait = parsedate_to_datetime(ra).timestamp() - (time.time() if now is None else now)
            except (TypeError, ValueError, IndexError):
                wait = None
    return None if wait is None else min(max(wait, 0.0), MAX_RETRY_AFTER_S)


def retry_delay(attempt: int, retry_after: float = None, rng=random) -> float:
    """Seconds to wait before retry `attempt` (0-based): the server's Retry-After when given (seconds,
    already parsed and capped by retry_after_s), else exponential backoff with up to 25% jitter downwards.

    >>> retry_delay(0, 3.0)
    3.0
    >>> 0.375 <= retry_delay(0) <= 0.5 and 3.0 <= retry_delay(3) <= 4.0
    True
    """
    if retry_after is not None:
        return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_S)
    base = min(INITIAL_RETRY_DELAY_S * 2 ** attempt, MAX_RETRY_DELAY_S)
    return base * (1 - 0.25 * rng.random())


def redact(text: str, secret: str) -> str:
    r"""`text` with the secret (the API key) replaced, for every error message and log line.

    The key may appear escaped (h11 shows a header value as a bytes repr), so those forms go too.
    >>> redact("bad header b'Bearer sk-123'", "sk-123")
    "bad header b'Bearer ***'"
    >>> redact("Illegal header value b'Bearer sk-1\\n23'", "sk-1\n23")
    "Illegal header value b'Bearer ***'"
    """
    if not secret or not text:
        return text
    for form in {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1], json.dumps(secret)[1:-1]}:
        text = text.replace(form, "***")
    return text


class CircuitBreaker:
    """Counts consecutive transport failures across threads; any HTTP response resets it.

    >>> b = CircuitBreaker(failures=3, min_failures=2, span_s=100.0)
    >>> [b.failure(now=t) for t in (0.0, 1.0)] + [b.failure(now=2.0)]
    [False, False, True]
    >>> b.success(); b.failure(now=3.0), b.failure(now=200.0)
    (False, True)
    """

    def __init__(self, failures=BREAKER_FAILURES, min_failures=BREAKER_MIN_FAILURES, span_s=BREAKER_SPAN_S):
        self.failures, self.min_failures, self.span_s = failures, min_failures, span_s
        self.n, self.since = 0, None
        self._lock = threading.Lock()

    def success(self):
        with self._lock:
            self.n, self.since = 0, None

    def failure(self, now=None) -> bool:
        """Record one failure; True when the breaker trips."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.n += 1
            self.since = now if self.since is None else self.since
            return self.n >= self.failures or (self.n >= self.min_failures and now - self.since >= self.span_s)


def price_usage(prompt_tokens, completion_tokens, usd_per_mtok_in, usd_per_mtok_out) -> float:
    """Estimated USD from token counts, used only when the server reports no cost.

    >>> round(price_usage(1000, 100, 0.30, 2.50), 6)
    0.00055
    """
    return (prompt_tokens * usd_per_mtok_in + completion_tokens * usd_per_mtok_out) / 1e6


class LLMTeacher(Closing):
    """Thread-safe OpenAI-compatible vision classifier. `classify` never raises except
    FatalTeacherError (bad key, no credits, a dead or unusable endpoint)."""

    source = "llm"

    def __init__(self, base_url, model, api_key, classes, timeout=DEFAULT_TIMEOUT_S, max_retries=5,
                 usd_per_mtok_in=0.30, usd_per_mtok_out=2.50, sleep=None, stop=None, logprobs=True, task=None):
        self.base_url = base_url.rstrip("/")
        self.host = urlparse(self.base_url).netloc
        self.model, self.classes, self.max_retries = model, list(classes), max_retries
        self.task = task  # flywheel.task.Task or None: the prompt and few-shot images come from it
        self._examples = None
        self.prices = (usd_per_mtok_in, usd_per_mtok_out)
        self.use_response_format = True  # flipped off for the run when a provider rejects every kind
        self.response_format = RESPONSE_FORMATS[0]  # downgraded for the run when a provider rejects it (400)
        self.use_logprobs = bool(logprobs)         # turned off for the run when a provider rejects it (400)
        self.stop = stop or threading.Event()  # set on Ctrl-C: retry waits end, no new attempt starts
        self.breaker = CircuitBreaker()
        self._key = api_key
        self._lock = threading.Lock()
        self._sleep = sleep or self.stop.wait  # waits end early when the stop event is set
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            headers={"Authorization": f"Bearer {api_key}",
                     "HTTP-Referer": "https://github.com/cifar-distill", "X-Title": "cifar_distill"},
            transport=quickack.transport(httpx.Limits(max_connections=64, max_keepalive_connections=64)))

    def can_answer(self, path) -> bool:
        return True

    def close(self):
        self._client.close()

    def _payload(self, image_jpeg: bytes, class_order, temperature, model=None):
        url = "data:image/jpeg;base64," + base64.b64encode(image_jpeg).decode()
        if self._examples is None:  # encoded once per run
            from flywheel.task import example_parts
            self._examples = example_parts(self.task) if self.task is not None else []
        body = {"model": model or self.model, "temperature": temperature, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                             {"role": "user", "content": [{"type": "text", "text": build_prompt(class_order, self.task)},
                                                          *self._examples,
                                                          {"type": "image_url", "image_url": {"url": url}}]}],
                "usage": {"include": True}}  # OpenRouter: report usage.cost in the response
        if self.use_response_format and (rf := response_format(self.response_format, class_order)) is not None:
            body["response_format"] = rf
        if self.use_logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def _drop_extra(self, body, text) -> bool:
        """After a 400: stop asking for what the endpoint rejected, for the rest of the run (the error text
        names it, or logprobs go first); the same question is then asked again, under the same ledger key.
        -> False when the body asked for nothing extra (the 400 is the answer)."""
        names_rf = "response_format" in text or "json_schema" in text
        with self._lock:
            if "logprobs" in body and self.use_logprobs and ("logprob" in text or not names_rf
                                                               or "response_format" not in body):
                self.use_logprobs = False
                log.info("%s rejected logprobs (400: %s); asking without them for this run", self.host, _short(text))
                return True
            if "response_format" in body:
                kind = body["response_format"]["type"]
                if self.response_format == kind:  # another thread may have moved on already
                    self.response_format = RESPONSE_FORMATS[RESPONSE_FORMATS.index(kind) + 1]
                    self.use_response_format = self.response_format is not None
                log.info("%s rejected response_format %s (400: %s); asking with %s for this run", self.host, kind,
                         _short(text), self.response_format or "the prompt alone")
                return True
        return False

    def ask(self, path, image_file, key, pass_no, class_order, temperature, model=None) -> Answer:
        """One call for one image (to `model`, default this teacher's); `path` and `key` are unused here
        (the oracle needs them)."""
        with open(image_file, "rb") as f:
            return self.classify(f.read(), class_order, temperature, model)

    def _fatal(self, msg):
        return FatalTeacherError(redact(msg, self._key))

    def _error(self, msg, status, t0):
        return Answer("error", error=redact(msg, self._key), http_status=status, latency_s=time.monotonic() - t0)

    def classify(self, image_jpeg: bytes, class_order, temperature: float, model=None) -> Answer:
        t0 = time.monotonic()
        attempt, n429, waited429, dropped = 0, 0, 0.0, 0
        last_error = ""
        while True:
            if self.stop.is_set():  # Ctrl-C: a retry is a new paid call, so none starts
                return self._error(f"stopped before a retry ({last_error or 'not sent'})", None, t0)
            body = self._payload(image_jpeg, class_order, temperature, model)
            status, retry_after = None, None
            try:
                r = self._client.post(f"{self.base_url}/chat/completions", json=body)
                status = r.status_code
                retry_after = retry_after_s(r.headers)
                self.breaker.success()
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as e:
                # the same for every call: retrying cannot help
                raise self._fatal(f"cannot send requests to {self.base_url} ({type(e).__name__}: {e}); check "
                                  f"--llm_base_url and the API key's characters") from None
            except httpx.TimeoutException as e:
                last_error = f"timeout: {type(e).__name__}"
                if isinstance(e, httpx.ConnectTimeout) and self.breaker.failure():
                    raise self._dead(last_error) from None
            except httpx.TransportError as e:
                last_error = f"connection error: {type(e).__name__}: {e}"
                if isinstance(e, (httpx.ConnectError, httpx.ProxyError)) and self.breaker.failure():
                    raise self._dead(last_error) from None
            if status is not None:
                text = redact(r.text, self._key)
                if status in FATAL_STATUS:
                    raise self._fatal(f"{FATAL_STATUS[status]} from {self.host} for model {self.model}: "
                                      f"{_short(text)}. Nothing more will be requested; fix it and rerun "
                                      f"(answers already paid for are kept in the ledger).")
                if status == 400 and dropped < len(RESPONSE_FORMATS) + 1 and self._drop_extra(body, text):
                    dropped += 1  # a provider that rejects logprobs or structured outputs: ask without them
                    continue
                if status == 200:
                    try:
                        data = r.json()
                    except ValueError:
                        data = None
                    if isinstance(data, dict) and data.get("choices"):
                        return self._answer(data, time.monotonic() - t0)
                    err = (data or {}).get("error") if isinstance(data, dict) else None
                    code = err.get("code") if isinstance(err, dict) else None
                    if code in FATAL_STATUS:
                        raise self._fatal(f"{FATAL_STATUS[code]} (error body in a 200 response from "
                                          f"{self.host}): {_short(text)}")
                    last_error = f"200 with no choices: {_short(text)}"
                    retryable = True  # upstream provider hiccup reported in-band
                elif status in RETRYABLE_STATUS or status >= 500:
                    last_error = f"HTTP {status}: {_short(text)}"
                    retryable = True
                else:
                    return self._error(f"HTTP {status}: {_short(text, 500)}", status, t0)
            else:
                retryable = True
            if status == 429:
                delay = max(retry_delay(min(n429, 10), retry_after), retry_delay(min(n429, 10)))
                if n429 >= self.max_retries * RATE_LIMIT_RETRY_FACTOR or waited429 + delay > MAX_RATE_LIMIT_WAIT_S:
                    return self._error(f"{last_error} (gave up after {n429 + 1} rate-limited tries, "
                                       f"{waited429:.0f}s waiting)", status, t0)
                log.debug("rate limited: retry %d/%d in %.2fs (Retry-After %s)", n429 + 1,
                          self.max_retries * RATE_LIMIT_RETRY_FACTOR, delay, retry_after)
                n429 += 1
                waited429 += delay
                self._sleep(delay)
                continue
            if not retryable or attempt >= self.max_retries:
                return self._error(last_error, status, t0)
            delay = retry_delay(attempt, retry_after)
            log.debug("retry %d/%d in %.2fs after %s", attempt + 1, self.max_retries, delay, last_error)
            self._sleep(delay)
            attempt += 1

    def _dead(self, last_error):
        return self._fatal(
            f"the teacher endpoint {self.base_url} is unreachable: {self.breaker.n} connection failures in a row "
            f"(last: {last_error}). Stopped instead of retrying every image; answers already paid for are kept in "
            f"the ledger. Check --llm_base_url, the network or the server, then rerun.")

    def _answer(self, data, latency) -> Answer:
        msg = data["choices"][0].get("message") or {}
        text = msg.get("content") or ""
        if isinstance(text, list):  # some servers return content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        usage = data.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost, estimated = usage.get("cost"), False
        if cost is None:
            cost, estimated = price_usage(pt, ct, *self.prices), True
        a = Answer("ok", raw=redact(text, self._key), prompt_tokens=pt, completion_tokens=ct, cost_usd=float(cost),
                   cost_estimated=estimated, latency_s=latency, http_status=200,
                   label_logprob=label_logprob(data["choices"][0].get("logprobs")))
        try:
            a.label, a.confidence, a.why = parse_reply(text, self.classes)
        except InvalidReply as e:
            a.status, a.error = "invalid", str(e)
        return a


def _short(text, n=300):
    text = (text or "").replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


# ----------------------------------------------------------------------------- oracle (SIMULATED)
def oracle_model_name(noise) -> str:
    """The oracle's model name in ledger keys: a different noise level asks again under new keys."""
    return f"oracle(noise={noise})"


class OracleTeacher(Closing):
    """SIMULATED teacher for offline runs: the manifest's ground truth with a fraction `noise` of wrong
    labels and a synthetic confidence. Deterministic per (image, pass), so reruns and resumes agree.

    Its cost is `usd_per_call` per call, marked estimated, so that cost figures of an offline run are
    illustrative rather than zero; every record it feeds says source=oracle.
    """

    source = "oracle"
    host = "oracle"

    def __init__(self, truth: dict, classes, noise=0.1, usd_per_call=0.0002, seed=0):
        self.truth, self.classes, self.noise = truth, list(classes), noise
        self.model = oracle_model_name(noise)
        self.usd_per_call, self.seed = usd_per_call, seed
        self.use_response_format = False

    def can_answer(self, path) -> bool:
        """Only images with a ground truth to simulate from (not uploads to --step serve)."""
        return path in self.truth

    def close(self):
        pass

    def ask(self, path, image_file, key, pass_no, class_order, temperature, model=None) -> Answer:
        if path not in self.truth:  # an upload to --step serve: no ground truth to simulate from
            return Answer("error", error="SIMULATED oracle: no ground truth for this image (not in the manifest); "
                                         "it goes to a person")
        true = self.truth[path]
        u = lambda tag: stable_unit(self.seed, tag, key, pass_no)  # noqa: E731
        # An image is "hard" with probability 2P and each pass errs on half the hard images, so the raw
        # error rate per pass is P, and the two passes' mistakes correlate like a real model's.
        hard_p = min(1.0, 2 * self.noise)
        hard = stable_unit(self.seed, "hard", key) < hard_p
        wrong = hard and u("wrong") < self.noise / hard_p
        if wrong:
            others = [c for c in self.classes if c != true]
            # half of second-pass mistakes repeat the first pass's wrong label
            pick = stable_unit(self.seed, "which", key) if pass_no == 1 or u("same") < 0.5 else u("which2")
            label = others[int(pick * len(others))]
            conf = 0.35 + 0.5 * u("conf")
        else:
            label = true
            conf = (0.55 if hard else 0.75) + 0.25 * u("conf")
        conf = round(min(conf, 1.0), 3)
        raw = json.dumps({"label": label, "confidence": conf, "why": "SIMULATED oracle answer"})
        return Answer("ok", label=label, confidence=conf, why="SIMULATED oracle answer", raw=raw,
                      cost_usd=self.usd_per_call, cost_estimated=True, latency_s=0.0)
