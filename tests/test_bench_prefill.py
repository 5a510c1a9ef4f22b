"""benchmarks/bench_prefill.py on the CPU (tiny model): its smoke mode runs one-shot,
layer-major and chunk-major prefills and writes the records the GPU report is made of (kept in
CI so the next GPU run does not find a broken script)."""
import sys

import pytest

from conftest import BENCH_DIR, HAVE_OPS, bench_records

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

sys.path.insert(0, str(BENCH_DIR))


def test_smoke_mode_records_both_orders(tmp_path):
    import bench_prefill
    out = tmp_path / "prefill.jsonl"
    bench_prefill.main(["--cpu", "--lengths", "256", "--chunks", "64,100", "--repeats", "1",
                        "--out", str(out)])
    recs = bench_records(out)
    assert recs[0]["kind"] == "header" and recs[0]["orders"] == ["layer", "chunk"]
    pre = [r for r in recs if r["kind"] == "prefill"]
    assert [(r["chunk"], r["order"]) for r in pre] == [
        (None, "one-shot"), (64, "layer"), (64, "chunk"), (100, "layer"), (100, "chunk")]
    for r in pre[1:]:
        assert r["same_length_heads"] == 1.0 and r["probe_rel"] < 1e-4
        assert r["time_vs_one_shot"] > 0
        if r["order"] == "chunk":    # the same values as layer-major
            assert r["same_length_heads_vs_layer"] == 1.0 and r["probe_rel_vs_layer"] == 0.0
            assert r["held_prompt_gib"] > 0 and r["pool_gib"] > pre[0]["pool_gib"]
        else:                        # its pool holds the kept rows only, like one-shot
            assert r["pool_gib"] == pre[0]["pool_gib"] and r["hidden_gib"] > 0
    assert any(r["kind"] == "full_cache_floor" for r in recs)


def test_one_order(tmp_path):
    import bench_prefill
    out = tmp_path / "chunk.jsonl"
    bench_prefill.main(["--cpu", "--lengths", "128", "--chunks", "48", "--repeats", "1",
                        "--orders", "chunk", "--out", str(out)])
    assert [r.get("order") for r in bench_records(out) if r["kind"] == "prefill"] == [
        "one-shot", "chunk"]
    with pytest.raises(SystemExit):
        bench_prefill.main(["--cpu", "--orders", "rows"])
