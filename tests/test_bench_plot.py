"""benchmarks/plot_ops.py on the committed GPU results (CPU only: reads JSON lines, writes a PNG)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("ops-*.jsonl"))


def _plot_module():
    spec = importlib.util.spec_from_file_location("plot_ops", ROOT / "benchmarks" / "plot_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("results", RESULTS, ids=[p.stem for p in RESULTS])
def test_plot_ops_on_committed_results(results, tmp_path):
    pytest.importorskip("matplotlib")
    plot_ops = _plot_module()
    records = plot_ops.load(results)
    # The records the plot reads: each has the keys the issue asks for and is present.
    for r in records:
        assert {"op", "device", "torch", "date", "shape", "ms", "ref_ms", "gbps"} <= r.keys()
    for n in (8192, 32768, 131072):
        assert plot_ops.pick(records, "evict", ref="reference_evict", N=n) is not None
    assert plot_ops.pick(records, "decode_attention", ref="padded_sdpa", B=64) is not None
    out = tmp_path / "ops.png"
    plot_ops.main([str(results), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
