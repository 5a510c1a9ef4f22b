"""benchmarks/bench_followups.py on the CPU (small shapes): its three parts run end to end and
write the record the GPU report is made of (a smoke test, so the next GPU run finds a working
script); the store's peak is layer_defensivekv's final size (bounded memory)."""
import json
import sys
from pathlib import Path

import pytest

from conftest import HAVE_OPS

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_followups_cpu(tmp_path):
    import bench_followups
    out = tmp_path / "f.jsonl"
    bench_followups.main(["--cpu", "--n", "300", "--budget", "16", "--reps", "1",
                          "--out", str(out)])
    rec = json.loads(out.read_text().splitlines()[-1])
    assert set(rec["costs_ms"]) == {"ada_snapkv", "ada_criticalkv", "defensivekv", "score",
                                    "defensive_score", "value_norm", "matmul_products"}
    cal = rec["calibration"]
    assert cal["copy_GBps"] > 0 and cal["matmul_TFLOPs"] > 0 and cal["value_norm_TFLOPs"] > 0
    assert rec["layer_prefill_ms"] > 0
    mem = rec["memory"]["layer_defensivekv"]
    assert 0 < mem["store_peak_bytes"] == mem["final_bytes"]
