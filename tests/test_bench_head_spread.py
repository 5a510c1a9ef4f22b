"""benchmarks/head_spread.py on the CPU with the tiny random model: the per-head spread of an
Ada-KV eviction and of the synthetic spreads the kernel benchmarks assume, written as the
report the real-model run is made of (its smoke test, kept in CI)."""
import json
import sys

import pytest

from conftest import BENCH_DIR, HAVE_OPS

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

sys.path.insert(0, str(BENCH_DIR))


def test_head_spread_report(tmp_path):
    import head_spread
    out = tmp_path / "spread.json"
    head_spread.main(["--model", "tiny-random-llama", "--length", "320", "--per-task", "1",
                      "--fracs", "0.25", "--window", "8", "--threads", "1", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["kv_heads"] == 2 and rec["layers"] == 2
    assert len(rec["prompts"]) == 5 + 2               # the five tasks and two source files
    b = rec["by_budget"]["0.25"]
    assert b["budget"] == 80
    m = b["model"]
    assert m["segments"] == len(rec["prompts"]) * 2 * 2    # prompts x layers x KV heads
    # ratios to the (prompt, layer) mean: Ada-KV keeps each layer's total, so they average 1
    assert 0 <= m["min"] <= 1 <= m["max"] <= 2 and m["cv"] >= 0
    # the synthetic spreads the kernel benchmarks use grow with sigma and with the head count
    syn = {k: v["cv"] for k, v in b.items() if k.startswith("ada_budgets")}
    assert syn["ada_budgets Hk=8 sigma=1.0"] > syn["ada_budgets Hk=8 sigma=0.5"] > 0
    assert syn["ada_budgets Hk=2 sigma=1.0"] > syn["ada_budgets Hk=2 sigma=0.5"] > 0


def test_spread_of_group_ratios():
    import head_spread
    from bench_ops import spread_stats
    st = spread_stats(head_spread.group_ratios([[1, 3], [2, 2], [0, 0]]))
    assert st["segments"] == 4                         # an empty group adds nothing
    assert st["min"] == 0.5 and st["max"] == 1.5 and st["p90"] == 1.0
    assert st["cv"] == pytest.approx(0.5 / (2 ** 0.5))
