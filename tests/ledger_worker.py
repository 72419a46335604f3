"""One process of tests/test_shared_folder.py: label the given solid-colour items through the loopback teacher
into a shared ledger, with one --max_usd budget read from that ledger.

    python tests/ledger_worker.py LEDGER URL ITEMS_DIR N OFFSET MAX_USD
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from fakes import solid_jpeg_items  # noqa: E402
from flywheel.labeling import QC, Budget, label_items  # noqa: E402
from flywheel.ledger import Ledger  # noqa: E402
from flywheel.teacher import LLMTeacher  # noqa: E402

def main():
    ledger_path, url, root, n, offset, max_usd = sys.argv[1:7]
    items, _ = solid_jpeg_items(root, int(n), offset=int(offset))
    with Ledger(ledger_path) as led, LLMTeacher(url, "m", "k", ["apple", "pear"]) as t:
        budget = Budget(float(max_usd), led.total_now(), 0.001, ledger=led)
        label_items(items, t, led, QC(["apple", "pear"], second_pass="always"), budget, "label", max_workers=4)
        print(f"calls {budget.calls} stopped {budget.stopped}")


if __name__ == "__main__":
    main()
