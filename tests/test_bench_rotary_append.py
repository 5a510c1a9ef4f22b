"""benchmarks/bench_rotary_append.py on the CPU (a small layer, eager): it runs end to end,
checks that the fused and unfused steps agree before timing, and writes its records."""

from __future__ import annotations

import sys

import pytest

from conftest import BENCH_DIR, HAVE_OPS, bench_records

pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

sys.path.insert(0, str(BENCH_DIR))


def test_cpu_smoke_records(tmp_path):
    import bench_rotary_append
    out = tmp_path / "rotary.jsonl"
    bench_rotary_append.main(["--cpu", "--reps", "3", "--out", str(out)])
    recs = bench_records(out)
    assert recs[0]["kind"] == "header" and recs[0]["layers"] == 2
    rows = [r for r in recs if r["kind"] == "rotary_append"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["us_per_layer"]["unfused"] > 0 and r["us_per_layer"]["fused"] > 0
        assert r["saved_us_per_layer"] == pytest.approx(
            r["us_per_layer"]["unfused"] - r["us_per_layer"]["fused"], abs=2e-3)
