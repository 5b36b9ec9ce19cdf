"""Markdown tables and a plot from benchmark JSON.

    python -m bench.report bench/results/kernels_h100-80gb-hbm3_2026-11-22.json [more.json ...]
    python -m bench.report X.json --no-plot        # markdown only
    python -m bench.report X.json --out X.md       # also write the markdown to a file

Kernel results (bench.kernels) give one table per dtype, a cell per backend
``time us (speedup over cuBLAS, % of measured copy bandwidth)``, and a PNG of speedup vs M
per shape with the roofline bound; end-to-end results (bench.e2e) give one row per model/run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .common import fmt, table

log = logging.getLogger("bench")

ORDER = ["cublas", "triton", "cuda", "dequant+cublas", "torch-int4pack", "bitsandbytes", "gemlite", "reference"]
LABEL = {"cublas": "cuBLAS", "dequant+cublas": "dequant+cuBLAS", "torch-int4pack": "torch int4pack"}


def _backends(results: list[dict]) -> list[str]:
    seen = {p["backend"] for p in results}
    return [b for b in ORDER if b in seen] + sorted(seen - set(ORDER))


def header_markdown(doc: dict) -> str:
    env = doc.get("env", {})
    parts = [f"**{env.get('gpu', '?')}**", f"torch {env.get('torch')}", f"triton {env.get('triton')}",
             f"CUDA {env.get('cuda')}", f"int4ops {env.get('int4ops')}", env.get("date", "")]
    return " | ".join(str(p) for p in parts)


def cell(p: dict | None, base: bool = False) -> str:
    if p is None:
        return ""
    if p.get("ms") is None:
        return "error"
    us = f"{p['ms'] * 1e3:.1f}"
    if base:
        return f"{us} ({fmt(p.get('pct_bw'), '.0f')}%)"
    return f"{us} ({fmt(p.get('speedup'), '.2f')}x, {fmt(p.get('pct_bw'), '.0f')}%)"


def kernels_markdown(doc: dict) -> str:
    res = doc["results"]
    lines = [f"### W4A16 kernels: {header_markdown(doc)}", ""]
    bw, peaks = doc.get("bandwidth") or {}, doc.get("matmul_peak") or {}
    a = doc.get("args", {})
    lines.append(
        f"Measured in the same run: memory bandwidth **{fmt(bw.get('gbps'), '.0f')} GB/s** (best of a copy, read+write: {fmt(bw.get('copy_gbps'), '.0f')}, and a read-only pass: {fmt(bw.get('read_gbps'), '.0f')}), dense matmul peak "
        + ", ".join(f"**{v['tflops']:.0f} TFLOP/s** {k}" for k, v in peaks.items())
        + f". Group size {a.get('group_size')}, {'symmetric' if a.get('sym') else 'asymmetric (zeros)'}."
    )
    lines += ["", f"Method: {doc.get('method', '')}.", ""]
    lines.append("Cells: median time in us (speedup over cuBLAS at the same dtype and M, % of measured copy "
                 "bandwidth for the bytes that point must move). *bound*: cuBLAS time / roofline time of the "
                 "int4 matmul, the most any W4A16 kernel can gain.")
    backends = _backends(res)
    for dt in sorted({p["dtype"] for p in res}, key=lambda d: ("fp16", "bf16", "fp32").index(d)):
        rows = []
        keys = sorted({(p["shape"], p["n"], p["k"], p["m"]) for p in res if p["dtype"] == dt},
                      key=lambda t: ([s for s, *_ in _shape_order(res)].index(t[0]), t[3]))
        cols = [b for b in backends if any(p["backend"] == b and p["dtype"] == dt for p in res)]
        idx = {(p["shape"], p["m"], p["backend"]): p for p in res if p["dtype"] == dt}
        for shape, n, k, m in keys:
            row = [shape if shape == f"{n}x{k}" else f"{shape} ({n}x{k})", m] + [cell(idx.get((shape, m, b)), base=(b == "cublas")) for b in cols]
            bound = next((p.get("bound_speedup") for b in cols if (p := idx.get((shape, m, b))) and b != "cublas"), None)
            rows.append(row + [fmt(bound, ".2f") + "x" if bound else "-"])
        lines += ["", f"#### {dt}", "", table(["shape (NxK)", "M"] + [LABEL.get(b, b) for b in cols] + ["bound"], rows, markdown=True)]
    errs = [p for p in res if p.get("rel_err") is not None]
    if errs:
        worst = {}
        for p in errs:
            key = (p["backend"], p["dtype"])
            worst[key] = max(worst.get(key, 0.0), p["rel_err"])
        tol = {"fp16": 2e-3, "bf16": 1e-2, "fp32": 1e-5}  # tests/conftest.py TOL
        lines += ["", "Correctness (first M and first M >= 64 of each shape), max relative Frobenius error vs the fp32 "
                  "dequantized reference: " + ", ".join(
                      f"{LABEL.get(b, b)} {d} {e:.1e}{' (ABOVE TEST TOLERANCE)' if e > tol.get(d, 1e-2) else ''}"
                      for (b, d), e in sorted(worst.items())) + "."]
    timed = [p for p in res if p.get("ms") and p.get("p90") is not None]
    if timed:
        spread = sorted((p["p90"] - p["p10"]) / p["ms"] for p in timed)
        methods = {}
        for p in timed:
            methods[p.get("method", "?")] = methods.get(p.get("method", "?"), 0) + 1
        lines += ["", f"Timing spread (p90 - p10) / median over points: median {100 * spread[len(spread) // 2]:.1f}%, "
                  f"worst {100 * spread[-1]:.1f}%. Timed by: " + ", ".join(f"{k} {v} points" for k, v in sorted(methods.items())) + "."]
    merged = sorted((p["hi"] - p["lo"]) / p["ms"] for p in timed if p.get("lo") is not None)
    if merged:  # a bench.repro merge: this spread, not the within-run one, is what another run should fall in
        lines += ["", f"Reported spread across {doc.get('repro', {}).get('runs', '?')} runs (hi - lo) / median "
                  f"(bench/repro.py rule, in the method above): median {100 * merged[len(merged) // 2]:.1f}%, worst {100 * merged[-1]:.1f}%."]
    notes = sorted({p["note"] for p in res if p.get("note")})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    skipped = doc.get("skipped") or []
    if skipped:
        lines += ["", "Skipped: " + "; ".join(
            f"{s['backend']}{' (' + s['shape'] + ')' if s.get('shape') else ''}: {s['reason']}" for s in _dedup(skipped)) + "."]
    if doc.get("left_out"):
        lines += ["", "Left out: " + "; ".join(doc["left_out"]) + "."]
    failed = [p for p in res if p.get("error")]
    if failed:
        lines += ["", f"Errors ({len(failed)} points): " + "; ".join(
            f"{p['backend']} {p['shape']} M={p['m']} {p['dtype']}: {p['error'][:120]}" for p in failed[:8])
                  + (" ..." if len(failed) > 8 else "") + "."]
    return "\n".join(lines) + "\n"


def _dedup(items: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in items:
        key = (s["backend"], s.get("shape"), s["reason"])
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _shape_order(res: list[dict]) -> list[tuple[str, int, int]]:
    out = []
    for p in res:
        t = (p["shape"], p["n"], p["k"])
        if t not in out:
            out.append(t)
    return out


def e2e_markdown(doc: dict) -> str:
    lines = [f"### End to end: {header_markdown(doc)}", "", f"Method: {doc.get('method', '')}.", ""]
    runs = doc["runs"]
    batches = sorted({int(k[len("decode_bs"):-len("_tok_s")]) for r in runs for k in r
                      if k.startswith("decode_bs") and k.endswith("_tok_s")})
    rows = []
    for r in runs:
        rows.append([r["model"], r["weights"], fmt(r.get("weight_gib", r.get("param_gib")), ".2f"), fmt(r.get("peak_gib"), ".2f")]
                    + [fmt(r.get(f"decode_bs{b}_tok_s"), ".1f") for b in batches]
                    + [fmt(r.get("prefill_tok_s"), ".0f"), r.get("decode_method", "-"), r.get("setup", "-")])
    lines.append(table(["model", "weights", "weights GiB", "peak GiB"] + [f"decode bs{b} tok/s" for b in batches]
                       + ["prefill tok/s", "decode timing", "setup"], rows, markdown=True))
    for model in dict.fromkeys(r["model"] for r in runs):
        dense = [r for r in runs if r["model"] == model and not r["weights"].startswith("int4")]
        quant = [r for r in runs if r["model"] == model and r["weights"].startswith("int4")]
        if dense and quant:
            d = dense[-1]
            q = next((r for r in quant if r.get("logits_rel_err_vs_dense") is not None), quant[-1])
            ratios = [f"{key} {q[k] / d[k]:.2f}x" for key, k in
                      [(f"decode bs{b}", f"decode_bs{b}_tok_s") for b in batches] + [("prefill", "prefill_tok_s")]
                      if q.get(k) and d.get(k)]
            w = d.get("weight_gib", d.get("param_gib")), q.get("weight_gib", q.get("param_gib"))
            if w[0] and w[1]:
                ratios.append(f"weights {w[0] / w[1]:.2f}x smaller")
            if q.get("logits_rel_err_vs_dense") is not None:
                ratios.append(f"last-token logits rel. error {q['logits_rel_err_vs_dense']:.1e} "
                              f"(top-1 {'same' if q.get('top1_same_as_dense') else 'differs'}; random weights)")
            if ratios:
                lines += ["", f"{model}, {q['weights']} vs {d['weights']}: " + ", ".join(ratios) + "."]
    notes = [f"{r['model']} {r['weights']}: {n}" for r in runs for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def markdown(doc: dict) -> str:
    kind = doc.get("kind")
    if kind == "kernels":
        return kernels_markdown(doc)
    if kind == "e2e":
        return e2e_markdown(doc)
    raise ValueError(f"unknown results kind {kind!r} (expected 'kernels' or 'e2e')")


def plot_kernels(doc: dict, path) -> Path | None:
    """Speedup over cuBLAS vs M, one panel per (dtype, shape), with the roofline bound. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except Exception as e:  # noqa: BLE001
        log.warning("no plot: matplotlib unavailable (%s)", e)
        return None
    res = [p for p in doc["results"] if p.get("ms")]
    if not res:
        return None
    shapes = _shape_order(res)
    dtypes = [d for d in ("fp16", "bf16", "fp32") if any(p["dtype"] == d for p in res)]
    backends = [b for b in _backends(res) if b != "cublas"]
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(3.2 * len(shapes), 2.8 * len(dtypes)),
                             squeeze=False, sharex=True)
    colors = dict(zip(ORDER[1:], ["C0", "C1", "C2", "C3", "C4", "C5", "C6"]))
    xfmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    yfmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}x")
    for i, dt in enumerate(dtypes):
        for j, (shape, n, k) in enumerate(shapes):
            ax = axes[i][j]
            pts = [p for p in res if p["dtype"] == dt and p["shape"] == shape]
            bound = sorted({(p["m"], p["bound_speedup"]) for p in pts if p.get("bound_speedup") and p["backend"] != "cublas"})
            if bound:
                ax.plot(*zip(*bound), "k--", lw=1, label="roofline bound")
            ax.axhline(1.0, color="gray", lw=1, label="cuBLAS")
            for b in backends:
                line = sorted((p["m"], p["speedup"]) for p in pts if p["backend"] == b and p.get("speedup"))
                if line:
                    ax.plot(*zip(*line), "o-", ms=3, color=colors.get(b), label=LABEL.get(b, b))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.xaxis.set_major_formatter(xfmt)
            ax.yaxis.set_major_formatter(yfmt)
            ax.set_title(f"{shape} {n}x{k} {dt}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(dtypes) - 1:
                ax.set_xlabel("M (tokens)")
            if j == 0:
                ax.set_ylabel("speedup vs cuBLAS")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    env = doc.get("env", {})
    fig.suptitle(f"int4ops W4A16 vs cuBLAS, {env.get('gpu')}, torch {env.get('torch')}, {env.get('date', '')[:10]}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description="markdown (and a plot) from bench JSON")
    p.add_argument("json", nargs="+", help="results from bench.kernels or bench.e2e")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--no-plot", action="store_true", help="do not write PNGs for kernel results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parts = []
    for f in args.json:
        doc = json.loads(Path(f).read_text())
        parts.append(markdown(doc))
        if doc.get("kind") == "kernels" and not args.no_plot:
            png = plot_kernels(doc, Path(f).with_suffix(".png"))
            if png:
                log.info("wrote %s", png)
    text = "\n".join(parts)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
