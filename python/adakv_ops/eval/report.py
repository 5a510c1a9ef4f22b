"""Aggregates, tables and plots of an evaluation result (the JSON written by the CLI).

``python -m adakv_ops.eval.report RESULT.json`` rewrites the markdown and the plots of a result
(for instance after a change of the plotting code) without running anything."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

__all__ = ["aggregate", "compact_record", "dumps", "markdown", "plot", "write_report"]

_ORDER = ("full", "streaming", "snapkv", "ada_snapkv", "pyramid", "ada_pyramid", "criticalkv",
          "ada_criticalkv", "defensivekv", "layer_defensivekv", "criticalkv:as_written",
          "ada_criticalkv:as_written", "defensivekv:as_written", "layer_defensivekv:as_written")
# paired comparisons (A vs B): Ada vs its uniform method, and each of the authors' follow-ups
# (SPEC 7) vs ada_snapkv, the reference point
_PAIRS = (("ada_snapkv", "snapkv"), ("ada_pyramid", "pyramid"), ("criticalkv", "ada_snapkv"),
          ("ada_criticalkv", "ada_snapkv"), ("defensivekv", "ada_snapkv"),
          ("layer_defensivekv", "ada_snapkv"))
# the follow-ups as the authors' code runs them: against ada_snapkv and against the default form
_AS_WRITTEN = ("criticalkv", "ada_criticalkv", "defensivekv", "layer_defensivekv")
_PAIRS += tuple((f"{m}:as_written", "ada_snapkv") for m in _AS_WRITTEN) + \
    tuple((f"{m}:as_written", m) for m in _AS_WRITTEN)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _round(x, digits: int = 5):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def compact_record(r: dict) -> dict:
    """A record as stored: floats to 5 significant digits; the relative eviction loss as its
    mean over layers (older runs stored it per layer, and the per-layer budgets, which
    follow from method, budget and prompt length)."""
    r = {k: v for k, v in r.items() if k != "layer_budgets"}
    if isinstance(r.get("evict_rel"), list):
        r["evict_rel_mean"] = _mean(r.pop("evict_rel"))
    return {k: _round(v) for k, v in r.items()}


def dumps(result: dict) -> str:
    """The result JSON: compact, one record per line (a full sweep is a few MB, diffable)."""
    head = {k: v for k, v in result.items() if k not in ("records", "text_records")}
    body = json.dumps(head, indent=1)[:-2]
    for key in ("records", "text_records"):
        rows = ",\n".join(json.dumps(compact_record(r), separators=(",", ":"))
                          for r in result.get(key, []))
        body += f',\n "{key}": [\n{rows}\n ]'
    return body + "\n}\n"


def aggregate(records: list[dict], text_records: list[dict]) -> dict:
    """``accuracy[setting][method][frac]``, the same per task and per length, eviction loss
    (mean over samples and layers, and per layer), kept fraction, and the text measures."""
    acc = defaultdict(lambda: defaultdict(list))
    by_task = defaultdict(lambda: defaultdict(list))
    by_len = defaultdict(lambda: defaultdict(list))
    loss = defaultdict(lambda: defaultdict(list))
    rel = defaultdict(lambda: defaultdict(list))
    kept = defaultdict(lambda: defaultdict(list))
    by_layer = defaultdict(lambda: defaultdict(list))
    for r in records:
        k = (r["method"], r["budget_frac"])
        acc[r["setting"]][k].append(float(r["correct"]))
        by_task[(r["setting"], r["task"])][k].append(float(r["correct"]))
        by_len[(r["setting"], r["length"])][k].append(float(r["correct"]))
        loss[r["setting"]][k].append(_mean(r["evict_l1"]))
        rel[r["setting"]][k].append(r["evict_rel_mean"] if "evict_rel_mean" in r
                                    else _mean(r["evict_rel"]))
        by_layer[r["setting"]][k].append(r["evict_l1"])
        kept[r["setting"]][k].append(r["kept_fraction"])

    def fold(d):
        return {s: {f"{m}@{f:g}": {"mean": _mean(v), "n": len(v)}
                    for (m, f), v in sorted(d[s].items())} for s in d}

    def fold2(d):
        return {f"{s}/{x}": {f"{m}@{f:g}": _mean(v) for (m, f), v in sorted(d[(s, x)].items())}
                for (s, x) in sorted(d)}

    text = defaultdict(lambda: defaultdict(list))
    for r in text_records:
        for key in ("kl", "top1_agreement", "nll"):
            text[key][(r["method"], r["budget_frac"])].append(r[key])
    out = {"accuracy": fold(acc), "accuracy_by_task": fold2(by_task),
           "accuracy_by_length": fold2(by_len), "eviction_l1": fold(loss),
           "eviction_rel": fold(rel), "kept_fraction": fold(kept),
           "eviction_l1_by_layer": {
               s: {f"{m}@{f:g}": [_round(_mean(col)) for col in zip(*v)]
                   for (m, f), v in sorted(by_layer[s].items())} for s in by_layer},
           "text": {key: {f"{m}@{f:g}": {"mean": _mean(v), "n": len(v)}
                          for (m, f), v in sorted(d.items())} for key, d in text.items()}}
    out["ada_vs_uniform"] = _compare(records)
    out["authors_ordering"] = _ordering(out["eviction_l1"])
    return out


# The authors' ordering (SPEC 7.4: SnapKV < AdaKV < CriticalKV < DefensiveKV < Layer-DefensiveKV
# in quality), checked on the eviction loss, which must then decrease along it.
AUTHORS_ORDER = ("snapkv", "ada_snapkv", "ada_criticalkv", "defensivekv", "layer_defensivekv")


def _ordering(loss: dict) -> list[dict]:
    """Per setting, budget and form: the mean eviction loss of each method of ``AUTHORS_ORDER``
    that ran, and whether it never increases along that order (equal is allowed: with one KV
    head per layer, AdaKV is SnapKV). Form ``"default"``: the library's methods; form
    ``"as_written"`` (where any ran): the follow-ups' ``:as_written`` forms in their places,
    SnapKV and AdaKV as they are. Each row's ``loss`` is keyed by the ``AUTHORS_ORDER`` name."""
    rows = []
    for setting, table in loss.items():
        fracs = sorted({float(k.split("@")[1]) for k in table if not k.startswith("full@")})
        for form in ("default", "as_written"):
            for f in fracs:
                if form == "as_written" and not any(f"{m}:as_written@{f:g}" in table
                                                    for m in _AS_WRITTEN):
                    continue
                vals = []
                for m in AUTHORS_ORDER:
                    run = f"{m}:as_written" if form == "as_written" and m in _AS_WRITTEN else m
                    if f"{run}@{f:g}" in table:
                        vals.append((m, table[f"{run}@{f:g}"]["mean"]))
                if len(vals) < 2:
                    continue
                holds = all(a[1] >= b[1] for a, b in zip(vals, vals[1:]))
                rows.append({"setting": setting, "budget_frac": f, "form": form,
                             "loss": dict(vals), "holds": holds})
    return rows


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on discordant pairs): the probability,
    with no difference, of a split at least as uneven as ``wins`` : ``losses``."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _compare(records: list[dict]) -> list[dict]:
    """Per setting, budget and pair (ada vs uniform): accuracy and eviction-loss means and the
    paired sample counts where ada is better / worse."""
    idx = {}
    for r in records:
        idx[(r["setting"], r["task"], r["length"], r["sample"], r["method"], r["budget_frac"])] = r
    rows = []
    settings = sorted({r["setting"] for r in records})
    fracs = sorted({r["budget_frac"] for r in records if r["method"] != "full"})
    for s in settings:
        for f in fracs:
            for ada, uni in _PAIRS:
                pairs = [(idx[k], idx[k[:4] + (uni, f)]) for k in idx
                         if k[0] == s and k[4] == ada and k[5] == f and k[:4] + (uni, f) in idx]
                if not pairs:
                    continue
                a_acc = _mean(float(a["correct"]) for a, _ in pairs)
                u_acc = _mean(float(u["correct"]) for _, u in pairs)
                a_l = _mean(_mean(a["evict_l1"]) for a, _ in pairs)
                u_l = _mean(_mean(u["evict_l1"]) for _, u in pairs)
                rows.append({"setting": s, "budget_frac": f, "ada": ada, "uniform": uni,
                             "n": len(pairs), "acc_ada": a_acc, "acc_uniform": u_acc,
                             "ada_wins": sum(a["correct"] and not u["correct"] for a, u in pairs),
                             "uniform_wins": sum(u["correct"] and not a["correct"]
                                                 for a, u in pairs),
                             "l1_ada": a_l, "l1_uniform": u_l,
                             "l1_lower_ada": sum(_mean(a["evict_l1"]) < _mean(u["evict_l1"])
                                                 for a, u in pairs),
                             "l1_higher_ada": sum(_mean(a["evict_l1"]) > _mean(u["evict_l1"])
                                                  for a, u in pairs)})
                row = rows[-1]
                row["acc_p"] = sign_test_p(row["ada_wins"], row["uniform_wins"])
                row["l1_p"] = sign_test_p(row["l1_lower_ada"], row["l1_higher_ada"])
    return rows


def _methods_fracs(table: dict):
    methods, fracs = [], set()
    for key in table:
        m, f = key.split("@")
        if m not in methods:
            methods.append(m)
        fracs.add(float(f))
    methods.sort(key=lambda m: _ORDER.index(m) if m in _ORDER else len(_ORDER))
    return methods, sorted(fracs - {1.0}) or sorted(fracs)


def markdown(result: dict) -> str:
    """Tables: accuracy and eviction loss per setting (rows = methods, columns = budgets),
    Ada vs uniform, and the text measures."""
    agg = result["aggregates"]
    lines = []
    for name, title, fmt in (("accuracy", "accuracy (teacher-forced greedy exact match)", "{:.3f}"),
                             ("eviction_l1", "eviction loss (L1, mean over layers)", "{:.4g}")):
        for setting, table in agg[name].items():
            methods, fracs = _methods_fracs(table)
            lines.append(f"\n**{title}, question-{setting}**\n")
            lines.append("| method | " + " | ".join(f"{f:.0%}" for f in fracs) + " |")
            lines.append("|---|" + "---|" * len(fracs))
            for m in methods:
                cells = []
                for f in fracs:
                    e = table.get(f"{m}@{f:g}") or table.get(f"{m}@1")
                    cells.append(fmt.format(e["mean"]) if e else "-")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if agg.get("authors_ordering"):
        lines.append("\n**The authors' ordering on eviction loss** (SnapKV >= AdaKV >= "
                     "AdaCriticalKV >= DefensiveKV >= Layer-DefensiveKV expected, SPEC 7.4)\n")
        ms = [m for m in AUTHORS_ORDER
              if any(m in r["loss"] for r in agg["authors_ordering"])]
        lines.append("| setting | budget | form | " + " | ".join(ms) + " | holds |")
        lines.append("|---|---|---|" + "---|" * (len(ms) + 1))
        for r in agg["authors_ordering"]:
            cells = [f"{r['loss'][m]:.4g}" if m in r["loss"] else "-" for m in ms]
            lines.append(f"| {r['setting']} | {r['budget_frac']:.0%} | "
                         f"{r['form']} | " + " | ".join(cells)
                         + f" | {'yes' if r['holds'] else 'no'} |")
    if agg.get("ada_vs_uniform"):
        lines.append("\n**Paired comparisons, A vs B (Ada vs uniform; the follow-ups vs "
                     "ada_snapkv)**\n")
        lines.append("p: two-sided exact sign test on the paired samples that differ (McNemar's "
                     "exact test for accuracy).\n")
        lines.append("| setting | budget | pair (A vs B) | n | acc A | acc B | A-only correct | "
                     "B-only correct | acc p | L1 A | L1 B | lower L1 A / B | L1 p |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in agg["ada_vs_uniform"]:
            lines.append(f"| {r['setting']} | {r['budget_frac']:.0%} | {r['ada']} vs "
                         f"{r['uniform']} | {r['n']} | {r['acc_ada']:.3f} | "
                         f"{r['acc_uniform']:.3f} | {r['ada_wins']} | {r['uniform_wins']} | "
                         f"{r.get('acc_p', float('nan')):.2g} | {r['l1_ada']:.4g} | "
                         f"{r['l1_uniform']:.4g} | {r['l1_lower_ada']} / "
                         f"{r.get('l1_higher_ada', '-')} | {r.get('l1_p', float('nan')):.2g} |")
    text = agg.get("text") or {}
    if text.get("kl"):
        methods, fracs = _methods_fracs(text["kl"])
        lines.append("\n**natural text: KL(full || evicted) / top-1 agreement**\n")
        lines.append("| method | " + " | ".join(f"{f:.0%}" for f in fracs) + " |")
        lines.append("|---|" + "---|" * len(fracs))
        for m in methods:
            cells = []
            for f in fracs:
                k = f"{m}@{f:g}" if f"{m}@{f:g}" in text["kl"] else f"{m}@1"
                if k in text["kl"]:
                    cells.append(f"{text['kl'][k]['mean']:.4f} / "
                                 f"{text['top1_agreement'][k]['mean']:.3f}")
                else:
                    cells.append("-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_PROMPT_BUDGET = "budget (share of prompt tokens kept per head, + window)"


def _finish_axes(ax, fracs, xlabel: str, ylabel: str, title: str, legend_size: int = 8):
    """Log budget axis labelled in percent, labels, grid, legend."""
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in fracs], [f"{100 * f:g}%" for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save_figure(fig, path: Path, written: list) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def plot(result: dict, stem: Path) -> list[Path]:
    """PNG plots next to ``stem``: accuracy, eviction loss, text agreement vs budget, one
    line per method (``full`` dashed). Needs matplotlib; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = result["aggregates"]
    written = []
    panels = [("accuracy", "accuracy", "accuracy"), ("eviction_l1", "eviction_loss",
                                                     "eviction loss (L1)")]
    for key, suffix, ylabel in panels:
        settings = list(agg[key])
        if not settings:
            continue
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4),
                                 squeeze=False)
        for ax, setting in zip(axes[0], settings):
            table = agg[key][setting]
            methods, fracs = _methods_fracs(table)
            for m in methods:
                if m == "full":
                    e = table.get("full@1")
                    if e:
                        ax.axhline(e["mean"], color="k", ls="--", lw=1, label="full")
                    continue
                ys = [table.get(f"{m}@{f:g}", {}).get("mean", float("nan")) for f in fracs]
                ax.plot([100 * f for f in fracs], ys, marker="o", label=m,
                        ls="-" if m.startswith("ada") else ":")
            _finish_axes(ax, fracs, _PROMPT_BUDGET, ylabel,
                         f"{result['model']['name']}, question-{setting}")
        _save_figure(fig, Path(f"{stem}-{suffix}.png"), written)
    text = agg.get("text") or {}
    if text.get("kl"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for ax, key, ylabel in ((axes[0][0], "kl", "KL(full || evicted), nats/token"),
                                (axes[0][1], "top1_agreement", "top-1 agreement with full")):
            methods, fracs = _methods_fracs(text[key])
            for m in methods:
                if m == "full":
                    continue
                ys = [text[key].get(f"{m}@{f:g}", {}).get("mean", float("nan")) for f in fracs]
                ax.plot([100 * f for f in fracs], ys, marker="o", label=m,
                        ls="-" if m.startswith("ada") else ":")
            _finish_axes(ax, fracs, "budget (share of prefix tokens kept per head, + window)",
                         ylabel, f"{result['model']['name']}, natural text")
        _save_figure(fig, Path(f"{stem}-text.png"), written)
    rows = agg.get("ada_vs_uniform") or []
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        lines = sorted({(r["setting"], r["ada"], r["uniform"]) for r in rows})
        fracs = sorted({r["budget_frac"] for r in rows})
        for s, ada, uni in lines:
            sel = {r["budget_frac"]: r for r in rows
                   if (r["setting"], r["ada"], r["uniform"]) == (s, ada, uni)}
            xs = [100 * f for f in fracs if f in sel]
            style = dict(marker="o", ls="-" if s == "aware" else "--",
                         label=f"{ada} vs {uni}, question-{s}")
            axes[0][0].plot(xs, [100 * (sel[f]["acc_ada"] - sel[f]["acc_uniform"])
                                 for f in fracs if f in sel], **style)
            axes[0][1].plot(xs, [100 * (sel[f]["l1_ada"] / sel[f]["l1_uniform"] - 1)
                                 for f in fracs if f in sel], **style)
        for ax, ylabel in ((axes[0][0], "accuracy, ada - uniform (points)"),
                           (axes[0][1], "eviction loss, ada / uniform - 1 (%)")):
            ax.axhline(0.0, color="k", lw=1)
            _finish_axes(ax, fracs, _PROMPT_BUDGET, ylabel,
                         f"{result['model']['name']}: Ada-KV vs uniform budgets", legend_size=7)
        _save_figure(fig, Path(f"{stem}-ada_vs_uniform.png"), written)
    return written


def write_report(result: dict, out: Path, plots: bool = True) -> list[Path]:
    """``out`` with suffix ``.md`` (header + ``markdown``) and, with ``plots`` and matplotlib
    installed, the PNGs beside it; returns the written paths."""
    out = Path(out)
    info, config = result["model"], result.get("config", {})
    md = markdown(result)
    md_path = out.with_suffix(".md")
    md_path.write_text(
        f"# {info['name']} ({info['source']})\n\n- date {result['date']}, torch "
        f"{result['torch']}, device {result['device']}, {len(result['records'])} records, "
        f"{result['elapsed_s']:.0f} s\n- config: `{json.dumps(config)}`\n" + md)
    print(md)
    written = [md_path]
    if plots:
        try:
            written += plot(result, out.with_suffix(""))
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)",
                  file=sys.stderr)
    return written


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m adakv_ops.eval.report", description=__doc__)
    p.add_argument("results", nargs="+", type=Path, help="result JSON files")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    for path in args.results:
        result = json.loads(path.read_text())
        result["aggregates"] = aggregate(result["records"], result["text_records"])
        for w in write_report(result, path, plots=not args.no_plots):
            print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
