"""Teacher client against a real loopback OpenAI-compatible server: parsing, retries, fatal errors,
response_format fallback; plus the pure parsing helpers and the oracle."""
import hashlib
import io
import time

import pytest
from PIL import Image

from flywheel import teacher as T
from loopback import LoopbackTeacher

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]
JPEG = (lambda b: (Image.new("RGB", (8, 8), (200, 10, 10)).save(b, format="JPEG"), b.getvalue())[1])(io.BytesIO())
SHA = hashlib.sha256(JPEG).hexdigest()


def client(srv, **kw):
    kw.setdefault("timeout", 5.0)
    return T.LLMTeacher(srv.url, "test/model", "sk-test-SECRET", CLASSES, **kw)


@pytest.fixture
def srv():
    with LoopbackTeacher(truth={SHA: "sweet_pepper"}, classes=CLASSES) as s:
        yield s


@pytest.mark.parametrize("style", ["plain", "fenced", "prose", "variant", "string_conf"])
def test_reply_styles_parse(srv, style):
    srv.style = style
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert (a.status, a.label, a.confidence) == ("ok", "sweet_pepper", 0.93)
    assert a.cost_usd == pytest.approx(0.0001) and not a.cost_estimated
    assert (a.prompt_tokens, a.completion_tokens) == (400, 20)


@pytest.mark.parametrize("style", ["outside", "nojson"])
def test_invalid_replies_are_never_accepted(srv, style):
    srv.style = style
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.status == "invalid" and a.label is None and a.error


def test_happy_path_request_shape(srv):
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok"
    assert srv.auth_headers == ["Bearer sk-test-SECRET"]
    rf = srv.bodies[0]["response_format"]  # structured outputs: the label is an enum of the classes
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["properties"]["label"]["enum"] == CLASSES
    assert srv.bodies[0]["logprobs"] is True and srv.bodies[0]["top_logprobs"] == T.TOP_LOGPROBS
    assert a.label_logprob is None  # this endpoint ignores the request: nothing to read, and that is fine
    assert srv.requests[(SHA, 1)] == 1


def test_429_retry_after_then_success(srv):
    srv.script = [{"status": 429, "headers": {"Retry-After": "1"}}]
    t0 = time.monotonic()
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok" and time.monotonic() - t0 >= 0.95
    assert srv.requests[(SHA, 1)] == 2


def test_503_then_success(srv):
    srv.script = [{"status": 503}, {"status": 502}]
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok" and srv.requests[(SHA, 1)] == 3


def test_retries_are_bounded(srv):
    srv.script = [{"status": 500}] * 5
    a = client(srv, max_retries=2).classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and "500" in a.error and srv.requests[(SHA, 1)] == 3


@pytest.mark.parametrize("status,cause", [(401, "rejected"), (402, "no credits"), (403, "Forbidden")])
def test_auth_and_credit_errors_stop_at_once(srv, status, cause):
    srv.script = [{"status": status}]
    with pytest.raises(T.FatalTeacherError, match=cause) as e:
        client(srv).classify(JPEG, CLASSES, 0.0)
    assert srv.requests[(SHA, 1)] == 1 and "SECRET" not in str(e.value)


def test_other_4xx_reported_with_body(srv):
    srv.script = [{"status": 404, "body": {"error": {"message": "no such model xyz"}}}] * 2
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and "404" in a.error and "no such model xyz" in a.error
    assert srv.requests[(SHA, 1)] == 1  # not retried


def test_timeout_then_success(srv):
    srv.script = [{"delay": 1.0, "status": 200, "body": {"choices": []}}]
    a = client(srv, timeout=0.3).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok" and srv.requests[(SHA, 1)] == 2


def test_error_body_with_status_200_is_a_failed_call(srv):
    srv.script = [{"status": 200, "body": {"error": {"message": "upstream overloaded", "code": 502}}}] * 9
    a = client(srv, max_retries=1).classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and "upstream overloaded" in a.error and a.label is None


def test_response_format_rejected_once_then_remembered(srv):
    srv.reject_response_format = True
    c = client(srv)
    assert c.classify(JPEG, CLASSES, 0.0).status == "ok"
    assert c.use_response_format is False
    assert c.classify(JPEG, CLASSES, 0.0).status == "ok"
    # structured outputs rejected, then JSON mode rejected, then the prompt alone; the next call goes straight
    # there: the rejections are not asked again, and logprobs (not named by the error) are still asked for
    assert [(b.get("response_format") or {}).get("type") for b in srv.bodies] == ["json_schema", "json_object", None, None]
    assert all(b.get("logprobs") for b in srv.bodies)


def test_logprobs_rejected_once_then_remembered(srv):
    srv.reject_logprobs = True
    c = client(srv)
    a = c.classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok" and a.label == "sweet_pepper" and c.use_logprobs is False
    assert c.classify(JPEG, CLASSES, 0.0).status == "ok"
    assert ["logprobs" in b for b in srv.bodies] == [True, False, False]
    assert all(b["response_format"]["type"] == "json_schema" for b in srv.bodies)  # not named: kept


def test_logprobs_off_asks_for_none(srv):
    client(srv, logprobs=False).classify(JPEG, CLASSES, 0.0)
    assert "logprobs" not in srv.bodies[0]


def test_label_logprob_read_from_the_first_token_of_a_split_label(srv):
    srv.logprob = -0.3567  # sweet_pepper is sent as two tokens, "sweet_" (this) and "pepper"
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.label == "sweet_pepper" and a.label_logprob == pytest.approx(-0.3567)


def test_connection_refused_is_an_error_not_a_crash():
    c = T.LLMTeacher("http://127.0.0.1:9/v1", "m", "k", CLASSES, timeout=1.0, max_retries=1, sleep=lambda s: None)
    a = c.classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and "connection" in a.error


def test_cost_estimated_when_server_reports_none(srv):
    srv.report_cost = False
    a = client(srv, usd_per_mtok_in=1.0, usd_per_mtok_out=10.0).classify(JPEG, CLASSES, 0.0)
    assert a.cost_estimated and a.cost_usd == pytest.approx((400 * 1.0 + 20 * 10.0) / 1e6)


# ----------------------------------------------------------------------------- pure helpers

@pytest.mark.parametrize("raw,label", [("Apple", "apple"), ("APPLES", "apple"), ("sweet-pepper", "sweet_pepper"),
                                       ("Sweet Peppers", "sweet_pepper"), (" mushrooms ", "mushroom"),
                                       ("oranges", "orange"), ("pepper", None), ("banana", None), ("", None)])
def test_normalize_label(raw, label):
    assert T.normalize_label(raw, CLASSES) == label


@pytest.mark.parametrize("raw,conf", [(0.7, 0.7), ("0.7", 0.7), ("70%", 0.7), (70, 0.7), (1, 1.0), ("100 %", 1.0)])
def test_parse_confidence(raw, conf):
    assert T.parse_confidence(raw) == pytest.approx(conf)


@pytest.mark.parametrize("raw", ["high", None, True, -0.1, 250, "nan"])
def test_parse_confidence_rejects(raw):
    with pytest.raises(T.InvalidReply):
        T.parse_confidence(raw)


def test_extract_json_skips_braces_in_prose():
    assert T.extract_json('I see {two} things: {"label": "pear", "confidence": 0.5, "why": "a } brace"}')["label"] == "pear"


def test_retry_delay_caps_retry_after_and_backs_off():
    assert T.retry_delay(0, "9999") == T.MAX_RETRY_AFTER_S
    assert all(T.retry_delay(10) <= T.MAX_RETRY_DELAY_S for _ in range(50))


def test_second_pass_order_differs_and_is_stable():
    o = T.pass_class_order(CLASSES, 2, "abc")
    assert sorted(o) == sorted(CLASSES) and o != CLASSES and o == T.pass_class_order(CLASSES, 2, "abc")


def test_oracle_noise_rate_and_simulated_marking():
    truth = {f"p{i}": CLASSES[i % 5] for i in range(4000)}
    o = T.OracleTeacher(truth, CLASSES, noise=0.2, usd_per_call=0.001)
    answers = [o.ask(p, None, p, 1, CLASSES, 0.0) for p in truth]
    wrong = sum(a.label != truth[p] for a, p in zip(answers, truth)) / len(truth)
    assert 0.17 < wrong < 0.23
    assert all("SIMULATED" in a.raw and a.cost_estimated for a in answers)
    assert o.ask("p1", None, "p1", 1, CLASSES, 0.0).label == answers[1].label  # deterministic
    assert all(a.label == truth[p] for a, p in zip([T.OracleTeacher(truth, CLASSES, 0.0).ask(p, None, p, 1, CLASSES, 0) for p in list(truth)[:50]], truth))


def test_oracle_cannot_answer_an_upload_and_says_so():
    """--step serve with the offline oracle: an upload has no ground truth, so no answer and no charge."""
    a = T.OracleTeacher({"p0": "apple"}, CLASSES).ask("production/ab.jpg", None, "ab", 1, CLASSES, 0.0)
    assert a.status == "error" and "SIMULATED" in a.error and a.cost_usd == 0.0


def test_sustained_429_slows_down_instead_of_failing(srv):
    srv.script = [{"status": 429, "headers": {"Retry-After": "0"}}] * 6
    slept = []
    a = client(srv, max_retries=2, sleep=slept.append).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok" and srv.requests[(SHA, 1)] == 7  # 6 x 429 > max_retries, within the 429 budget
    # backs off even when told Retry-After: 0 (delays 0.5, 1, 2, 4, 8, 8 s, minus up to 25% jitter)
    assert all(x > 0.3 for x in slept) and slept[0] <= 0.5 and slept[-1] >= 6.0


def test_429_budget_is_bounded(srv):
    srv.script = [{"status": 429, "headers": {"Retry-After": "0"}}] * 50
    a = client(srv, max_retries=1, sleep=lambda s: None).classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and "429" in a.error and srv.requests[(SHA, 1)] == 1 + T.RATE_LIMIT_RETRY_FACTOR


# ----------------------------------------------------------------------------- issue 10 edge cases

@pytest.mark.parametrize("text,why", [('{"label": "pear", "confidence": 0.9, "why": "about 3\\" wide"}', 'about 3" wide'),
                                      ('Here: {"label": "pear", "confidence": 0.9, "why": "a {brace} \\\\ slash"} ok',
                                       "a {brace} \\ slash"),
                                      ('```json\n{"label": "pear", "confidence": 0.9, "why": "q\\"}"}\n```', 'q"}')])
def test_replies_are_read_by_a_real_json_decoder(text, why):
    assert T.parse_reply(text, CLASSES) == ("pear", 0.9, why)


def test_escaped_quote_reply_is_accepted_over_http(srv):
    srv.script = [{"raw": json_reply('{"label": "pear", "confidence": 0.9, "why": "about 3\\" wide"}')}]
    a = client(srv).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok" and a.label == "pear"


def json_reply(content):
    import json
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cost": 0.0001}})


def test_retry_after_as_http_date_and_ms_are_honoured(srv):
    from email.utils import formatdate
    srv.script = [{"status": 503, "headers": {"Retry-After": formatdate(time.time() + 3, usegmt=True)}},
                  {"status": 429, "headers": {"retry-after-ms": "1500"}}]
    slept = []
    a = client(srv, sleep=slept.append).classify(JPEG, CLASSES, 0.0)
    assert a.status == "ok"
    assert 1.0 <= slept[0] <= 3.0  # the date, about 3 s away (whole seconds), not the 0.5 s backoff
    assert slept[1] == pytest.approx(1.5)


@pytest.mark.parametrize("url,key", [("ftp://127.0.0.1:9/v1", "sk-ok"), (None, "sk-bad\nkey-SECRET")])
def test_protocol_errors_are_not_retried(srv, url, key):
    slept = []
    c = T.LLMTeacher(url or srv.url, "m", key, CLASSES, timeout=2.0, sleep=slept.append)
    with pytest.raises(T.FatalTeacherError) as e:
        c.classify(JPEG, CLASSES, 0.0)
    assert slept == [] and sum(srv.requests.values()) == 0
    assert "SECRET" not in str(e.value)


def test_429_storm_has_a_wall_clock_cap_per_call(srv):
    srv.script = [{"status": 429, "headers": {"Retry-After": "50"}}] * 30
    slept = []
    a = client(srv, max_retries=5, sleep=slept.append).classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and sum(slept) <= T.MAX_RATE_LIMIT_WAIT_S
    assert srv.requests[(SHA, 1)] <= 1 + int(T.MAX_RATE_LIMIT_WAIT_S // 50)


def test_key_echoed_by_the_server_never_reaches_an_error(srv):
    srv.script = [{"status": 401, "body": {"error": {"message": "bad key sk-test-SECRET"}}}]
    with pytest.raises(T.FatalTeacherError) as e:
        client(srv).classify(JPEG, CLASSES, 0.0)
    assert "SECRET" not in str(e.value) and "***" in str(e.value)


def test_stop_event_ends_retry_waits_and_starts_no_new_attempt(srv):
    import threading
    stop = threading.Event()
    srv.script = [{"status": 503}] * 10
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    a = client(srv, stop=stop, max_retries=5).classify(JPEG, CLASSES, 0.0)
    assert a.status == "error" and time.monotonic() - t0 < 2.0 and srv.requests[(SHA, 1)] <= 2


def test_httpx_request_lines_stay_off_the_console(tmp_path, caplog, monkeypatch):
    import logging
    from fakes import make_cifar_folder, run_cli
    make_cifar_folder(tmp_path / "data", n_train=2, n_test=1)
    run_cli("--step", "prep", "--data_root", tmp_path / "data", "--out_dir", tmp_path / "run", "--img_size", 16)
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-x")
    truth = {r["sha256"]: r["label"] for r in __import__("flywheel.io", fromlist=["x"]).read_csv(tmp_path / "run" / "manifest.csv")}
    caplog.set_level(logging.INFO)
    with LoopbackTeacher(truth, CLASSES) as s:
        run_cli("--step", "label", "--out_dir", tmp_path / "run", "--data_root", tmp_path / "data", "--llm_base_url",
                s.url, "--max_label", 4)
        assert sum(s.requests.values()) >= 4  # every image asked at least once
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
