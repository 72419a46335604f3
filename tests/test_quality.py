"""QC fitted on gold pins: Wilson bounds and AUROC against hand-computed cases, the rule's threshold on
a hand-computed gold set, the held-out model's flag cut (hand-computed, and refused when gold does not
trust it), adaptive second-call decisions, the second model's ledger keys, the label step's flags
end to end, and the rule in force written to label_summary.json and datacard.md."""
import math

import pytest

from fakes import KEY, make_cifar_folder, run_cli
from flywheel.io import read_csv, read_json, read_jsonl
from flywheel.labeling import QC
from flywheel.quality import auroc, calls_per_accepted, estimate_on_gold, fit_rule, wilson_interval
from loopback import LoopbackTeacher, TeacherProfile

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


@pytest.mark.parametrize("k,n,lo,hi", [(45, 50, 0.7864, 0.9565), (10, 10, 0.7225, 1.0), (0, 10, 0.0, 0.2775),
                                       (5, 10, 0.2366, 0.7634)])
def test_wilson_interval_hand_computed(k, n, lo, hi):
    # p = k/n, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)


@pytest.mark.parametrize("scores,pos,want", [([3, 2, 1], [1, 0, 0], 1.0), ([1, 2, 3], [1, 0, 0], 0.0),
                                             ([1, 1, 2, 0], [1, 0, 1, 0], 0.875), ([1, 1], [1, 1], None)])
def test_auroc_hand_computed(scores, pos, want):
    assert auroc(scores, pos) == want


def test_fit_rule_on_a_hand_computed_gold_set():
    # 60 gold pins: 30 at confidence 0.99 (all right), 20 at 0.9 (18 right), 10 at 0.6 (4 right); a
    # second answer agrees exactly when the first was right. Accepted labels at each threshold t:
    #   t = 0.6 : all 60 alone, 52 right                       -> Wilson lower 0.758
    #   t = 0.9 : 50 alone (48 right) + 4 agreeing pairs       -> 52/54, lower 0.875
    #   t = 0.99: 30 alone + 18 + 4 agreeing pairs, all right   -> 52/52, lower 1 / (1 + 1.96^2 / 52) = 0.931
    gold = ([{"conf1": 0.99, "right1": True}] * 30 + [{"conf1": 0.9, "right1": i < 18} for i in range(20)]
            + [{"conf1": 0.6, "right1": i < 4} for i in range(10)])
    for g in gold:
        g.update(agree=g["right1"], right_pair=g["right1"])
    r = fit_rule(gold, 0.9)
    assert r.threshold == 0.99 and r.trusted_confidence
    assert r.estimate == {"accepted": 52, "accuracy": 1.0, "ci95": [0.9312, 1.0], "yield": 0.867}
    r = fit_rule(gold, 0.85)  # 0.875 >= 0.85: the lower threshold, fewer second calls
    assert r.threshold == 0.9 and r.estimate["accepted"] == 54 and r.estimate["accuracy"] == round(52 / 54, 4)
    r = fit_rule(gold, 0.95)  # not even all-pairs (52/52 at t = inf too) reaches 0.95 at the lower bound
    assert math.isinf(r.threshold) and "every image gets a second answer" in r.why


def test_flat_confidence_is_not_trusted():
    gold = [{"conf1": 0.95 if i % 7 else 0.99, "right1": i % 6 != 0, "agree": True, "right_pair": i % 6 != 0}
            for i in range(100)]
    r = fit_rule(gold, 0.9)
    assert not r.trusted_confidence and r.auroc < 0.6 and "not trusted" in r.why and "random share" in r.why


def test_estimate_counts_singles_and_pairs():
    e = estimate_on_gold([{"conf1": 0.95, "right1": False, "agree": True, "right_pair": False},
                          {"conf1": 0.5, "right1": True, "agree": True, "right_pair": True}], 0.9)
    assert e["accepted"] == 2 and e["accuracy"] == 0.5


def _flat_gold(cl_right, cl_wrong):
    """40 right and 10 wrong first answers, all at stated confidence 0.95 (flat); the second answer
    repeats the first (a T=0 error repeats), so a second call never helps; held-out scores as given."""
    return ([{"conf1": 0.95, "right1": True, "agree": True, "right_pair": True, "cl_conf": c} for c in cl_right]
            + [{"conf1": 0.95, "right1": False, "agree": True, "right_pair": False, "cl_conf": c} for c in cl_wrong])


@pytest.mark.parametrize("cl_right,cl_wrong,cuts,want_cut,trusted", [
    # separates: flagging below 0.5 removes all 10 wrong, 40/40 accepted alone (Wilson lower 0.912 >= 0.9):
    # 50 calls / 40 labels = 1.25 per label
    ([0.9] * 40, [0.2] * 10, [0.5], 0.5, True),
    # the cut at 0.1 flags nothing (0.8 right, out of reach): 0.5 is chosen
    ([0.9] * 40, [0.2] * 10, [0.1, 0.5], 0.5, True),
    # AUROC 0.5 (the same score for all): not trusted, so no cut, whatever is offered
    ([0.6] * 40, [0.6] * 10, [0.7], None, False),
    # trusted (AUROC 1.0), but the cut also flags 8 right answers: 32/32 right has Wilson lower 0.893 < 0.9,
    # so it misses the target and is not taken
    ([0.9] * 32 + [0.4] * 8, [0.3] * 10, [0.5], None, True),
])
def test_flag_cut_hand_computed(cl_right, cl_wrong, cuts, want_cut, trusted):
    r = fit_rule(_flat_gold(cl_right, cl_wrong), 0.9, flag_cuts=cuts)
    assert r.flag_below == want_cut and r.student["trusted"] is trusted
    if want_cut is None:
        # with no flags, 40/50 = 0.8 right with a useless second pass: the target is out of reach
        assert math.isinf(r.threshold)
    else:
        assert r.estimate["accuracy"] == 1.0 and r.estimate["accepted"] == 40  # every wrong answer flagged


def test_calls_per_accepted_counts_flags_as_uncalled():
    g = [{"score": 0.9, "conf1": 0.9, "right1": 1, "agree": None, "flagged": False},
         {"score": 0.5, "conf1": 0.5, "right1": 1, "agree": True, "right_pair": 1, "flagged": False},
         {"score": 0.5, "conf1": 0.5, "right1": 0, "agree": None, "flagged": True}]
    assert calls_per_accepted(g, 0.8) == 2.0    # 3 first answers + 1 second, 2 accepted
    assert calls_per_accepted(g, 0.1) == 1.5    # no second call: 3 calls, 2 accepted


@pytest.mark.parametrize("mode,threshold,conf,gold,want", [
    ("fitted", math.inf, 0.99, False, True),     # confidence untrusted: every image gets a second answer
    ("fitted", 0.9, 0.95, False, False),         # trusted and above the threshold: one call
    ("fitted", 0.9, 0.85, False, True),          # below it: a second answer
    ("fitted", 0.9, 0.95, True, True),           # gold pins always get both
    ("always", 0.9, 0.99, False, True),
    ("adaptive", math.inf, 0.95, False, False),  # adaptive uses --adaptive_thresh 0.9, not the fitted one
])
def test_adaptive_second_call_decisions(mode, threshold, conf, gold, want):
    qc = QC(CLASSES, second_pass=mode, audit_frac=0.0)
    qc.threshold = threshold
    if gold:
        qc.always_second = {"sha"}
    assert qc.second_needed("sha", conf) is want


def test_flagged_items_get_no_second_call_except_gold():
    qc = QC(CLASSES, second_pass="fitted", audit_frac=0.0)
    qc.threshold, qc.flagged = math.inf, {"a", "g"}
    qc.always_second = {"g"}
    assert qc.second_needed("a", 0.5) is False and qc.second_needed("g", 0.5) is True
    assert qc.second_needed("b", 0.5) is True


def test_audit_fraction_asks_a_share_of_confident_items():
    qc = QC(CLASSES, second_pass="fitted", audit_frac=0.2)
    qc.threshold = 0.5
    share = sum(qc.second_needed(f"{i:064x}", 0.99) for i in range(2000)) / 2000
    assert 0.17 < share < 0.23


def test_second_model_keys_pass_2_only():
    qc = QC(CLASSES, second_model="other/model")
    c1, c2 = qc.call("sha", 1, "main/model"), qc.call("sha", 2, "main/model")
    assert c1.model == "main/model" and c2.model == "other/model"
    assert "|main/model|" in c1.key and "|other/model|" in c2.key


@pytest.fixture
def prepped(tmp_path, monkeypatch):
    make_cifar_folder(tmp_path / "data", n_train=30, n_test=1)
    run_cli("--step", "prep", "--data_root", tmp_path / "data", "--out_dir", tmp_path / "run", "--img_size", 16)
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    return tmp_path


def test_label_step_with_second_model_and_fitted_rule(prepped):
    run = prepped / "run"
    truth = {r["sha256"]: r["label"] for r in read_csv(run / "manifest.csv")}
    with LoopbackTeacher(truth, CLASSES, profile=TeacherProfile(CLASSES, conf_mode="informative", seed=1)) as srv:
        run_cli("--step", "label", "--out_dir", run, "--data_root", prepped / "data", "--llm_base_url", srv.url,
                "--llm_model", "main/model", "--second_model", "other/model", "--max_label", 120, "--gold_n", 40,
                "--min_gold_acc", 0)
        asked = sum(srv.requests.values())
        run_cli("--step", "label", "--out_dir", run, "--data_root", prepped / "data", "--llm_base_url", srv.url,
                "--llm_model", "main/model", "--second_model", "other/model", "--max_label", 120, "--gold_n", 40,
                "--min_gold_acc", 0)
        assert sum(srv.requests.values()) == asked  # both models' answers reused from the ledger
    recs = read_jsonl(run / "labels.jsonl")[0]
    assert {r["model"] for r in recs if r["pass"] == 1} == {"main/model"}
    assert {r["model"] for r in recs if r["pass"] == 2} == {"other/model"}
    s = read_json(run / "label_summary.json")
    rule = s["qc_rule"]
    assert rule["n_gold"] == 40 and rule["why"] and s["second_model"] == "other/model"
    assert s["estimated_accuracy"]["ci95"][0] <= s["estimated_accuracy"]["accuracy"] <= s["estimated_accuracy"]["ci95"][1]
    gold_shas = {r["sha256"] for r in read_csv(run / "manifest.csv")} & {r["sha256"] for r in recs}
    # pass 2 only where the rule asked for it: gold pins, below the threshold, or audited
    assert s["calls_pass2"] < s["calls_pass1"] or rule["threshold"] is None
    assert len(gold_shas) >= 40


def test_rule_in_force_reaches_the_datacard(exported_run):
    from fakes import run_cli as cli
    cli("--step", "report", "--out_dir", exported_run, "--teacher", "oracle")
    card = (exported_run / "datacard.md").read_text()
    assert "Rule in force" in card and "second answer" in card


def test_label_step_flags_what_the_held_out_model_contradicts(tmp_path, monkeypatch):
    """Every first answer comes before any non-gold second call; the labels listed in label_flags.csv
    are in review as 'flagged', got no second call, and are mostly the teacher's errors."""
    make_cifar_folder(tmp_path / "data", n_train=60, n_test=1, classes=CLASSES, mix=0.2)
    run = tmp_path / "run"
    run_cli("--step", "prep", "--data_root", tmp_path / "data", "--out_dir", run, "--img_size", 16)
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    truth = {r["sha256"]: r["label"] for r in read_csv(run / "manifest.csv")}
    profile = TeacherProfile(CLASSES, conf_mode="flat", accuracy=0.8, fault_rate=0.0, seed=3)
    with LoopbackTeacher(truth, CLASSES, profile=profile) as srv:
        run_cli("--step", "label", "--out_dir", run, "--data_root", tmp_path / "data", "--llm_base_url", srv.url,
                "--max_label", 300, "--gold_n", 80, "--min_gold_acc", 0, "--max_workers", 4, "--second_pass", "fitted")
    s = read_json(run / "label_summary.json")
    student = s["qc_rule"]["student"]
    assert student["auroc"] > 0.6 and student["trusted"]
    flags = read_csv(run / "label_flags.csv")
    assert flags and s["flagged"] == len(flags) and student["flag_below"] is not None
    assert all(float(f["p_label"]) < student["flag_below"] for f in flags)
    review = {r["path"]: r for r in read_csv(run / "review_labels.csv")}
    assert all(review[f["path"]]["status"] == "flagged" for f in flags)
    manifest = {r["path"]: r for r in read_csv(run / "manifest.csv")}
    wrong = sum(f["llm_label"] != manifest[f["path"]]["label"] for f in flags)
    assert wrong / len(flags) > 0.5  # the flags find teacher errors, not random labels
    recs = read_jsonl(run / "labels.jsonl")[0]
    flagged = {f["sha256"] for f in flags}
    assert not [r for r in recs if r["pass"] == 2 and r["sha256"] in flagged]
    purposes = [(r["purpose"], r["pass"]) for r in recs]
    last_first = max(i for i, (pu, pa) in enumerate(purposes) if pu == "label" and pa == 1)
    first_second = min((i for i, (pu, pa) in enumerate(purposes) if pu == "label" and pa == 2), default=len(recs))
    assert last_first < first_second


def _first_answers(n, classes, first):
    """items, a ledger and a QC naming scheme in which item i's first answer is classes[first[i]]."""
    from types import SimpleNamespace
    items = [{"path": f"p{i}", "file": f"f{i}", "sha256": f"s{i}"} for i in range(n)]
    answers = {f"s{i}": {"label": classes[first[i]]} for i in range(n)}
    return items, SimpleNamespace(ok=lambda key: answers.get(key)), SimpleNamespace(call=lambda sha, p, model: SimpleNamespace(key=sha))


def test_held_out_model_is_the_candidate_gold_says_separates_best(monkeypatch):
    """Each candidate in turn is made the informative one (its probabilities follow each image's true class, the
    others' are noise): gold picks it whichever it is, and each way of reading the images is computed once."""
    import numpy as np
    from types import SimpleNamespace
    from flywheel import quality as Q
    rng = np.random.default_rng(0)
    n, classes = 200, ["a", "b"]
    truth = rng.integers(0, 2, n)
    first = np.where(rng.random(n) < 0.2, 1 - truth, truth)  # the teacher's first answers: 20% wrong
    items, ledger, qc = _first_answers(n, classes, first)
    informative = np.eye(2)[truth] * 0.8 + 0.1
    gold = {f"p{i}": classes[truth[i]] for i in range(60)}
    for good in Q.REPRESENTATIONS:
        read = []
        monkeypatch.setattr(Q, "represent", lambda reading, files: read.append(reading) or reading)
        def judged_by(judge):
            return lambda x, y, k, seed: informative if Q.HELD_OUT[good] == (x, judge) else rng.dirichlet([1, 1], n)
        monkeypatch.setattr(Q, "out_of_fold_probs", judged_by("logistic"))
        monkeypatch.setattr(Q, "neighbour_probs", judged_by("neighbours"))
        j = Q.held_out_scores(classes, 0, items, SimpleNamespace(model="m"), ledger, qc, gold)
        assert j.representation == good and set(j.auroc) == set(Q.REPRESENTATIONS)
        assert j.auroc[good] > 0.9 > max(v for k, v in j.auroc.items() if k != good)
        assert sorted(read) == sorted(set(r for r, _ in Q.HELD_OUT.values()))


def test_without_gold_the_held_out_model_is_the_embeddings_neighbours_and_falls_back_to_pixels(monkeypatch):
    """No gold to compare candidates by: only the first available of NO_GOLD_ORDER is computed."""
    import numpy as np
    from types import SimpleNamespace
    from flywheel import quality as Q
    rng = np.random.default_rng(0)
    n, classes = 100, ["a", "b"]
    items, ledger, qc = _first_answers(n, classes, rng.integers(0, 2, n))
    for available, expect, reads in ((("pixels", "embeddings"), "neighbours", ["embeddings"]),
                                     (("pixels",), "pixels", ["embeddings", "pixels"])):
        asked = []
        monkeypatch.setattr(Q, "represent", lambda rep, files: asked.append(rep) or (rng.normal(0, 1, (n, 4)) if rep in available else None))
        j = Q.held_out_scores(classes, 0, items, SimpleNamespace(model="m"), ledger, qc, gold={})
        assert j.representation == expect and list(j.auroc) == [expect] and j.auroc[expect] is None
        assert asked == reads  # the embeddings are read once, and found missing once


def test_neighbours_see_through_errors_a_linear_model_learns():
    """A teacher that calls every image with the 4th feature set "c", whatever it shows: a logistic regression
    trained on its answers learns that rule and vouches for the errors; the images' nearest neighbours (by cosine,
    on the raw features, where the 4th is small next to the class clusters) mostly carry right answers."""
    import numpy as np
    from flywheel import quality as Q
    rng = np.random.default_rng(0)
    n = 600
    truth = rng.integers(0, 3, n)
    quirk = rng.random(n) < 0.25  # a quarter of the images carry the feature the teacher misreads
    x = np.c_[np.eye(3)[truth] * 3 + rng.normal(0, 0.3, (n, 3)), quirk * 0.2]  # [n, 4]
    first = np.where(quirk, 2, truth)
    right = first == truth
    p_nn = Q.neighbour_probs(x, first, 3)[np.arange(n), first]
    p_lr = Q.out_of_fold_probs(x, first, 3)[np.arange(n), first]
    assert Q.auroc(p_nn.tolist(), right.tolist()) > 0.9 > Q.auroc(p_lr.tolist(), right.tolist()) + 0.1


def test_neighbours_never_vote_on_their_own_label_and_sample_their_references():
    """Every item has an exact copy, so its nearest neighbour is the copy, never itself; above max_ref the
    references are a sample, and an item in it still does not vote on itself."""
    import numpy as np
    from flywheel import quality as Q
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (40, 8))
    x = np.r_[base, base]  # item i and i + 40 are the same image
    y = np.r_[np.zeros(40, int), np.ones(40, int)]  # ... with different labels
    p = Q.neighbour_probs(x, y, 2, neighbours=1)
    assert np.allclose(p[:40], [0.25, 0.75]) and np.allclose(p[40:], [0.75, 0.25])  # (0 + 0.5) / 2, (1 + 0.5) / 2
    p = Q.neighbour_probs(x, y, 2, neighbours=1, max_ref=50)
    assert p.shape == (80, 2) and np.allclose(p.sum(1), 1)
    assert (p[np.arange(80), y] < 0.5).sum() >= 80 - 2 * 30  # only a copy outside the sample can be missed
