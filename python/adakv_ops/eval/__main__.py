"""``python -m adakv_ops.eval``: RULER-style retrieval accuracy, eviction loss and agreement on
natural text for every method and budget, from one prefill per sample. Writes JSON (updated
after every sample, so ``--resume`` continues an interrupted run), a markdown table and PNG
plots. See docs/eval.md."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    from .models import OFFLINE_MODELS
    from .runner import METHODS_ALL, METHODS_AS_WRITTEN, SETTINGS
    from .tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m adakv_ops.eval", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b",
                   help=f"offline model ({', '.join(OFFLINE_MODELS)}), tiny-random-llama, "
                        f"tiny-random-gemma3, a local HF model directory or a hub id")
    p.add_argument("--gguf", default=None,
                   help="an already joined GGUF file of the offline model (checked by SHA-256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--methods", nargs="+", default=list(METHODS_ALL),
                   choices=METHODS_ALL + METHODS_AS_WRITTEN,
                   help="NAME:as_written: a follow-up method as the authors' code runs it")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.4],
                   help="kept prefix tokens per head as a share of the prompt (window extra)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.2, help="Ada-KV safeguard fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-file", nargs="*", default=None,
                   help="natural text for KL / agreement (default: the project's README and "
                        "docs, when run from a checkout)")
    p.add_argument("--text-prefix", type=int, default=2048)
    p.add_argument("--text-cont", type=int, default=256)
    p.add_argument("--text-segments", type=int, default=4)
    p.add_argument("--out", default=None,
                   help="result JSON (default eval/results/<model>-<date>.json)")
    p.add_argument("--resume", action="store_true", help="keep the samples already in --out")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop after this many seconds (results so far are saved; --resume)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _default_text() -> list[Path]:
    """The project's README and docs: from the checkout the package runs from (editable
    install), else from the working directory when it is a checkout; an installed wheel run
    elsewhere falls back to the package's own modules (their docstrings are prose too)."""
    pkg = Path(__file__).resolve().parents[1]
    for root in (pkg.parents[1], Path.cwd()):
        files = [root / "README.md", root / "docs" / "semantics.md", root / "docs" / "hf.md",
                 root / "docs" / "eval.md"]
        if all(f.exists() for f in files):
            return files
    return [pkg / "hf" / "__init__.py", pkg / "ops.py", pkg / "reference.py",
            pkg / "eval" / "tasks.py"]


def _save(path: Path, result: dict) -> None:
    from .report import aggregate, dumps

    result["aggregates"] = aggregate(result["records"], result["text_records"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dumps(result))
    tmp.replace(path)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from tqdm.auto import tqdm

    from .models import load_model
    from .report import write_report
    from .runner import PromptBuilder, run_sample, run_text
    from .tasks import make_samples

    t0 = time.time()
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    model, tok, info = load_model(args.model, args.device, dtype, gguf=args.gguf)
    today = datetime.date.today().isoformat()
    out = Path(args.out or f"eval/results/{info['name']}-{today}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "no_progress")}
    result = {"model": info, "config": config, "date": today, "torch": torch.__version__,
              "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else platform.processor() or platform.machine()),
              "records": [], "text_records": [], "elapsed_s": 0.0}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        result["records"], result["text_records"] = old["records"], old["text_records"]
        result["elapsed_s"] = old.get("elapsed_s", 0.0)
    done = {(r["task"], r["length"], r["sample"]) for r in result["records"]}
    done_text = {r["segment"] for r in result["text_records"]}

    builder = PromptBuilder(tok, info["chat"])
    work = [(task, length, i, s) for length in args.lengths for task in args.tasks
            for i, s in enumerate(make_samples(task, length, args.samples, tok, args.seed))
            if (task, length, i) not in done]
    texts = [Path(f) for f in args.text_file] if args.text_file is not None else _default_text()
    segments = []
    if texts and args.text_segments > 0:
        ids = list(tok.encode("\n\n".join(f.read_text() for f in texts),
                              add_special_tokens=False))
        span = args.text_prefix + args.text_cont
        n = min(args.text_segments, len(ids) // span)
        segments = [(j, ids[j * span:(j + 1) * span]) for j in range(n) if j not in done_text]
        result["text_source"] = {"files": [f.name for f in texts], "tokens": len(ids),
                                 "segments": n}
    stopped = False
    bar = tqdm(total=len(work) + len(segments), disable=args.no_progress, desc=info["name"])
    for j, seg in segments:
        for r in run_text(model, seg, args.methods, args.budgets, args.text_prefix,
                          args.text_cont, args.window, args.alpha):
            result["text_records"].append({"segment": j, **r})
        bar.update()
    for task, length, i, sample in work:
        if args.time_limit is not None and time.time() - t0 > args.time_limit:
            stopped = True
            break
        prompt = builder.build(sample)
        for r in run_sample(model, prompt, args.methods, args.budgets, args.window, args.alpha,
                            args.settings):
            result["records"].append({"task": task, "length": length, "sample": i,
                                      "depth": sample.depth, **r})
        result["elapsed_s"] += 0  # updated at save
        bar.update()
        bar.set_postfix(task=task, length=length)
        _save(out, {**result, "elapsed_s": result["elapsed_s"] + time.time() - t0})
    bar.close()
    result["elapsed_s"] += time.time() - t0
    _save(out, result)
    result = json.loads(out.read_text())
    for path in write_report(result, out, plots=not args.no_plots):
        print(f"wrote {path}")
    print(f"wrote {out} ({'stopped at --time-limit; rerun with --resume' if stopped else 'done'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
