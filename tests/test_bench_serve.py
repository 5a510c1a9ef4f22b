"""benchmarks/bench_serve.py on the CPU (tiny model): the serving benchmark's modes run end to
end and write the records the GPU reports are made of (its smoke test, kept in CI so the next
GPU run does not find a broken script)."""
import sys

import pytest

from conftest import BENCH_DIR, HAVE_OPS, bench_records

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

sys.path.insert(0, str(BENCH_DIR))


def test_fork_mode_records(tmp_path):
    import bench_serve
    out = tmp_path / "fork.jsonl"
    # the real prompt prefilled over several steps, as 32K prompts are on the GPU
    bench_serve.main(["--cpu", "--fork-to", "3,5", "--requests", "1", "--warmup", "1",
                      "--steps", "2", "--chunk", "8", "--max-prefill-tokens", "8",
                      "--out", str(out)])
    recs = bench_records(out)
    assert recs[0]["kind"] == "header"
    dec = [r for r in recs if r["kind"] == "fork_decode"]
    assert [r["batch"] for r in dec] == [3, 5]
    for r in dec:
        assert r["step_ms"] > 0 and r["tok_s"] > 0 and r["kv_rows"] > 0
        assert r["leave_ms"] >= 0 and r["join_prefill_ms"] > 0
        assert set(r["step_phases_mean"]) == {"host_ms", "launch_ms", "wait_ms"}
        hr = r["head_rows"]      # the spread of the rows over the heads (split-count evidence)
        assert hr["segments"] == 2 * 2 * r["batch"]     # 2 layers x 2 KV heads x batch
        assert 0 < hr["min"] <= hr["mean"] <= hr["max"] and hr["cv"] >= 0
        assert abs(hr["mean"] * hr["segments"] - r["kv_rows"]) < 1e-6 * r["kv_rows"]
    assert recs[0]["fused_projections"] == 4            # the default: 2 layers x (q/k/v, gate/up)
    assert recs[0]["rotary_modules"] == 0               # the default: RoPE not fused


def test_fork_mode_with_rotary_append(tmp_path):
    import bench_serve
    out = tmp_path / "rotary.jsonl"
    bench_serve.main(["--cpu", "--fork-to", "2", "--requests", "1", "--warmup", "1",
                      "--steps", "2", "--rotary-append", "--out", str(out)])
    recs = bench_records(out)
    assert recs[0]["rotary_modules"] == 2               # both attention layers
    assert [r["batch"] for r in recs if r["kind"] == "fork_decode"] == [2]


def test_fork_mode_refuses_batches_smaller_than_the_real_requests(tmp_path):
    import bench_serve
    with pytest.raises(SystemExit):                     # was a crash in Engine.fork(rid, -1)
        bench_serve.main(["--cpu", "--fork-to", "2", "--requests", "3"])


def test_stream_mode_mixed_prompts_with_reeviction(tmp_path):
    import bench_serve
    out = tmp_path / "stream.jsonl"
    bench_serve.main(["--cpu", "--requests", "4", "--prompt-mix", "20,48,90", "--new", "5,9",
                      "--max-growth", "6", "--chunk", "16", "--max-prefill-tokens", "16",
                      "--out", str(out)])
    head, rec = bench_records(out)
    assert head["max_growth"] == 6 and head["max_prefill_tokens"] == 16
    assert rec["kind"] == "serve" and set(rec["prompt_lengths"]) <= {20, 48, 90}
    assert rec["max_concurrent"] >= 1 and rec["tok_s_incl_prefill"] > 0
    # inter-token gaps of the running requests (prefills run between their steps)
    assert 0 < rec["itl_median_ms"] <= rec["itl_p99_ms"] <= rec["itl_max_ms"]
    by_len = {int(n): t for n, t in rec["ttft_median_s_by_prompt"].items()}
    assert set(by_len) == set(rec["prompt_lengths"])
    assert min(by_len.values()) >= 0 and max(by_len.values()) <= rec["ttft_max_s"]


def test_profile_categories():
    """--profile's kernel families: inductor kernels named after the append they feed are
    elementwise work, not the append."""
    import bench_serve
    c = bench_serve._category
    assert c("void adakv::cuda::decode::decode_split_kernel<__nv_bfloat16, 128, true, true>") \
        == "paged decode attention"
    assert c("triton_poi_fused__to_copy__unsafe_view_add_cat_clone_cos_mul_neg_paged_append__s") \
        == "fused elementwise (inductor)"
    assert c("void adakv::cuda::(anonymous namespace)::paged_append_kernel<16>(adakv::cuda::") \
        == "paged append"
    assert c("void adakv::cuda::(anonymous namespace)::paged_append_rotary_kernel<__nv_bfloat16") \
        == "paged append"
    assert c("nvjet_sm90_tst_224x64_64x5_2x1_v_bz_TNN") == "GEMM (cuBLAS)"
