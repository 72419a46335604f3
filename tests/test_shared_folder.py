"""Two processes on one run folder (a server beside a flywheel turn): each ledger key is paid once, even when
both want it at the same moment (a claim per key); one --max_usd covers both; appends never interleave."""
import subprocess
import sys

from fakes import solid_jpeg_items
from flywheel.io import read_jsonl
from loopback import LoopbackTeacher
from test_serve import ROOT

PRICE = 0.001  # USD per answer, as the loopback reports it


def workers(tmp_path, srv, jobs, max_usd):
    """jobs: [(n, offset)] -> each run as its own process at the same time; -> their stdout."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ledger_worker.py"), str(tmp_path / "labels.jsonl"),
                               srv.url, str(tmp_path / f"img{i}"), str(n), str(off), str(max_usd)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, (n, off) in enumerate(jobs)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0] for o in outs]


def test_two_processes_wanting_the_same_answers_pay_each_once(tmp_path):
    items, truth = solid_jpeg_items(tmp_path / "truth", 24)
    with LoopbackTeacher(truth, ["apple", "pear"], latency_s=0.05, cost=PRICE) as srv:
        workers(tmp_path, srv, [(24, 0), (24, 0)], max_usd=1.0)  # the same 24 images, both passes, at once
        assert max(srv.requests.values()) == 1 and len(srv.requests) == 48  # every (image, pass) asked exactly once
    recs, bad, _ = read_jsonl(tmp_path / "labels.jsonl")
    assert bad == 0 and len(recs) == 48 and len({r["key"] for r in recs}) == 48  # whole lines, no key twice


def test_one_budget_covers_both_processes(tmp_path):
    _, truth = solid_jpeg_items(tmp_path / "truth", 80)
    cap_calls, workers_each = 30, 4
    with LoopbackTeacher(truth, ["apple", "pear"], latency_s=0.02, cost=PRICE) as srv:
        out = workers(tmp_path, srv, [(40, 0), (40, 40)], max_usd=cap_calls * PRICE)  # different images
        spent = srv.answers * PRICE
    assert all("stopped True" in o for o in out)  # both hit the one cap
    # each process sees the other's paid calls before reserving; only calls in flight can overshoot
    assert cap_calls * PRICE - 1e-9 <= spent + 2 * workers_each * PRICE and spent <= (cap_calls + 2 * workers_each) * PRICE
    assert sum(int(o.split()[1]) for o in out) == srv.answers
