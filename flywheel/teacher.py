"""The teacher: an OpenAI-compatible chat-completions client for a vision LLM, and the offline oracle.

Retry policy (after openai-python's _base_client): retry timeouts, connection errors, 408, 409, 429
and 5xx with exponential backoff and jitter, honouring Retry-After up to a cap (a 429 waits the larger of
Retry-After and the backoff, and has a 4x larger retry budget, so sustained rate limiting slows the run
instead of failing images); 401/402/403 stop the
run at once (retrying cannot fix a bad key or an empty wallet); any other 4xx is reported with its
body. Every retry decision is logged at debug level. The API key is never logged or stored.

Shortcut taken: one image per request (no batching of images into one prompt), so that each answer
maps to exactly one ledger record and one price.
"""
import base64
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

from flywheel.io import stable_unit

log = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
DEFAULT_TIMEOUT_S = 60.0
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a Retry-After above this is capped: we would rather fail than hang
RETRYABLE_STATUS = {408, 409, 429}
RATE_LIMIT_RETRY_FACTOR = 4  # 429s get 4x --max_retries: sustained rate limiting is normal, not a failure
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
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- prompt + parsing

def build_prompt(class_order) -> str:
    return USER_PROMPT.format(class_list="\n".join(f"- {c}" for c in class_order))


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
    """The first JSON object in `text`: bare, in a ``` fence, or surrounded by prose."""
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S | re.I)
    candidates = [fence.group(1)] if fence else []
    candidates.append(text)
    for cand in candidates:
        start = cand.find("{")
        while start != -1:
            depth, in_str, esc = 0, False, False
            for i in range(start, len(cand)):
                ch = cand[i]
                if in_str:
                    esc = (ch == "\\") and not esc
                    if ch == '"' and not esc:
                        in_str = False
                    continue
                if ch == '"':
                    in_str = True
                elif ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        try:
                            obj = json.loads(cand[start:i + 1])
                            if isinstance(obj, dict):
                                return obj
                        except json.JSONDecodeError:
                            pass
                        break
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

def retry_delay(attempt: int, retry_after: str = None, rng=random) -> float:
    """Seconds to wait before retry `attempt` (0-based): Retry-After when given (capped), else
    exponential backoff with up to 25% jitter downwards.

    >>> retry_delay(0, "3")
    3.0
    >>> 0.375 <= retry_delay(0) <= 0.5 and 3.0 <= retry_delay(3) <= 4.0
    True
    """
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass  # an HTTP date: fall back to backoff
    base = min(INITIAL_RETRY_DELAY_S * 2 ** attempt, MAX_RETRY_DELAY_S)
    return base * (1 - 0.25 * rng.random())


def price_usage(prompt_tokens, completion_tokens, usd_per_mtok_in, usd_per_mtok_out) -> float:
    """Estimated USD from token counts, used only when the server reports no cost.

    >>> round(price_usage(1000, 100, 0.30, 2.50), 6)
    0.00055
    """
    return (prompt_tokens * usd_per_mtok_in + completion_tokens * usd_per_mtok_out) / 1e6


class LLMTeacher:
    """Thread-safe OpenAI-compatible vision classifier. `classify` never raises except FatalTeacherError."""

    source = "llm"

    def __init__(self, base_url, model, api_key, classes, timeout=DEFAULT_TIMEOUT_S, max_retries=5,
                 usd_per_mtok_in=0.30, usd_per_mtok_out=2.50, sleep=time.sleep):
        self.base_url = base_url.rstrip("/")
        self.host = urlparse(self.base_url).netloc
        self.model, self.classes, self.max_retries = model, list(classes), max_retries
        self.prices = (usd_per_mtok_in, usd_per_mtok_out)
        self.use_response_format = True  # flipped off for the run when a provider rejects it
        self._lock = threading.Lock()
        self._sleep = sleep
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            headers={"Authorization": f"Bearer {api_key}",
                     "HTTP-Referer": "https://github.com/cifar-distill", "X-Title": "cifar_distill"},
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    def close(self):
        self._client.close()

    def _payload(self, image_jpeg: bytes, class_order, temperature):
        url = "data:image/jpeg;base64," + base64.b64encode(image_jpeg).decode()
        body = {"model": self.model, "temperature": temperature, "max_tokens": 300,
                "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                             {"role": "user", "content": [{"type": "text", "text": build_prompt(class_order)},
                                                          {"type": "image_url", "image_url": {"url": url}}]}],
                "usage": {"include": True}}  # OpenRouter: report usage.cost in the response
        if self.use_response_format:
            body["response_format"] = {"type": "json_object"}
        return body

    def ask(self, path, image_file, key, pass_no, class_order, temperature) -> Answer:
        """One call for one image; `path` and `key` are unused here (the oracle needs them)."""
        with open(image_file, "rb") as f:
            return self.classify(f.read(), class_order, temperature)

    def classify(self, image_jpeg: bytes, class_order, temperature: float) -> Answer:
        t0 = time.monotonic()
        attempt, n429, rf_retried = 0, 0, False
        last_error = ""
        while True:
            body = self._payload(image_jpeg, class_order, temperature)
            status, retry_after = None, None
            try:
                r = self._client.post(f"{self.base_url}/chat/completions", json=body)
                status = r.status_code
                retry_after = r.headers.get("retry-after")
            except httpx.TimeoutException as e:
                last_error = f"timeout: {type(e).__name__}"
            except httpx.TransportError as e:
                last_error = f"connection error: {type(e).__name__}: {e}"
            if status is not None:
                if status in FATAL_STATUS:
                    raise FatalTeacherError(f"{FATAL_STATUS[status]} from {self.host} for model {self.model}: "
                                            f"{_short(r.text)}. Nothing more will be requested; fix it and rerun "
                                            f"(answers already paid for are kept in the ledger).")
                if status == 400 and "response_format" in body and not rf_retried:
                    # providers that do not accept response_format answer 400; ask once without, and
                    # remember for the rest of the run
                    log.info("%s rejected response_format (400: %s); retrying without it for this run",
                             self.host, _short(r.text))
                    with self._lock:
                        self.use_response_format = False
                    rf_retried = True
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
                        raise FatalTeacherError(f"{FATAL_STATUS[code]} (error body in a 200 response from "
                                                f"{self.host}): {_short(r.text)}")
                    last_error = f"200 with no choices: {_short(r.text)}"
                    retryable = True  # upstream provider hiccup reported in-band
                elif status in RETRYABLE_STATUS or status >= 500:
                    last_error = f"HTTP {status}: {_short(r.text)}"
                    retryable = True
                else:
                    return Answer("error", error=f"HTTP {status}: {_short(r.text, 500)}", http_status=status,
                                  latency_s=time.monotonic() - t0)
            else:
                retryable = True
            if status == 429:
                if n429 >= self.max_retries * RATE_LIMIT_RETRY_FACTOR:
                    return Answer("error", error=last_error, http_status=status, latency_s=time.monotonic() - t0)
                delay = max(retry_delay(min(n429, 10), retry_after), retry_delay(min(n429, 10)))
                log.debug("rate limited: retry %d/%d in %.2fs (Retry-After %s)", n429 + 1,
                          self.max_retries * RATE_LIMIT_RETRY_FACTOR, delay, retry_after)
                n429 += 1
                self._sleep(delay)
                continue
            if not retryable or attempt >= self.max_retries:
                return Answer("error", error=last_error, http_status=status, latency_s=time.monotonic() - t0)
            delay = retry_delay(attempt, retry_after)
            log.debug("retry %d/%d in %.2fs after %s", attempt + 1, self.max_retries, delay, last_error)
            self._sleep(delay)
            attempt += 1

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
        a = Answer("ok", raw=text, prompt_tokens=pt, completion_tokens=ct, cost_usd=float(cost),
                   cost_estimated=estimated, latency_s=latency, http_status=200)
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


class OracleTeacher:
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

    def close(self):
        pass

    def ask(self, path, image_file, key, pass_no, class_order, temperature) -> Answer:
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
