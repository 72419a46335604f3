"""The cost model's pure functions against hand-computed cases."""
import pytest

from flywheel import costs as K


@pytest.mark.parametrize("volume,esc,llm,stu,fixed,expected", [
    (10_000, 0.2, 0.0004, 0.0, 0.0, 0.8),          # only escalations: 10k * 0.2 * 0.0004
    (10_000, 0.0, 0.0004, 0.01, 0.0, 0.1),         # only the student: 10 * 0.01
    (0, 0.5, 0.0004, 0.01, 7.0, 7.0),              # no traffic: the fixed cost alone
])
def test_flywheel_monthly(volume, esc, llm, stu, fixed, expected):
    assert K.flywheel_monthly(volume, esc, llm, stu, fixed) == pytest.approx(expected)


@pytest.mark.parametrize("esc,llm,stu,fixed,expected", [
    (0.2, 0.0004, 0.0, 32.0, 100_000.0),           # saves 0.00032 per item
    (0.2, 0.0004, 0.0, 0.0, 0.0),                  # no fixed cost: cheaper from the first item
    (1.0, 0.0004, 0.0, 1.0, None),                 # escalates everything: never
    (0.0, 0.0004, 0.4, 1.0, None),                 # student costs as much as the LLM: never
])
def test_breakeven_volume(esc, llm, stu, fixed, expected):
    got = K.breakeven_volume(esc, llm, stu, fixed)
    assert got == (None if expected is None else pytest.approx(expected))


def test_below_breakeven_is_plainly_more_expensive():
    rows = K.breakeven_table([100, 100_000, 10_000_000], 0.2, 0.0004, 0.0, 32.0, 0.6)
    assert rows[0]["verdict"] == "flywheel costs more" and rows[0]["savings_pct"] is None
    assert rows[0]["extra_cost_usd"] == pytest.approx(32.0 + 100 * 0.00008 - 0.04)
    assert rows[1]["verdict"] == "break even" and rows[1]["payback_months"] is None
    assert rows[2]["savings_pct"] == pytest.approx(100 * (4000 - 832) / 4000)
    assert rows[2]["payback_months"] == pytest.approx(0.6 / 3168)


def test_student_cost_from_throughput_and_cost_per_1k():
    assert K.student_cost_per_1k_from_throughput(100, 0.36) == pytest.approx(0.001)  # 10 s of a $0.36/h machine
    assert K.cost_per_1k(0.25, 0.0004, 0.001) == pytest.approx(0.101)
    assert K.payback_months(1.0, 0.0) is None
