"""benchmarks/bench_decode_gemm.py on the CPU (tiny shape): the rows the GPU report is made of,
and the attention-free layer it compiles against the same layer written out step by step."""
import sys

import torch

from conftest import BENCH_DIR, bench_records

sys.path.insert(0, str(BENCH_DIR))


def test_records(tmp_path):
    import bench_decode_gemm
    out = tmp_path / "gemm.jsonl"
    bench_decode_gemm.main(["--cpu", "--batches", "3", "--reps", "10", "--no-compile",
                            "--out", str(out)])
    recs = bench_records(out)
    assert recs[0]["kind"] == "header" and recs[0]["shapes"]["layers"] == 2
    rows = [(r["M"], r["row"]) for r in recs[1:]]
    assert rows == [(3, "qkv x2"), (3, "o x2"), (3, "gate_up x2"), (3, "down x2"), (3, "gemms")]
    assert all(r["ms"] > 0 and r["pct_roofline"] is None for r in recs[1:])
    sh = bench_decode_gemm.SHAPES_CPU
    per_layer = sum(r["weight_bytes"] for r in recs[1:5]) // sh["layers"]
    assert recs[0]["step_weight_bytes"] == sh["layers"] * per_layer + sh["vocab"] * sh["hidden"] * 4


def test_layer_without_attention_matches_its_steps():
    import bench_decode_gemm as b
    sh = b.SHAPES_CPU
    torch.manual_seed(0)
    layers, _, _ = b.build_weights(dict(sh, layers=1), "cpu", torch.float64)
    L = layers[0]
    L["n1"].uniform_(0.5, 1.5)
    L["n2"].uniform_(0.5, 1.5)
    x = torch.randn(5, sh["hidden"], dtype=torch.float64)
    qw, f = sh["heads"] * sh["head_dim"], sh["ffn"]
    got = b.layer_no_attention(x, L, qw, f)

    def norm(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-5) * w
    h = norm(x, L["n1"])
    x1 = x + (h @ L["qkv"].T)[:, :qw] @ L["o"].T
    gu = norm(x1, L["n2"]) @ L["gate_up"].T
    want = x1 + (torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]) @ L["down"].T
    torch.testing.assert_close(got, want)
