"""Run-to-run reproducibility of the kernel sweep: merge runs, and check a run against a merged result.

    python -m bench.repro merge run1.json run2.json [...] --out merged.json
    python -m bench.repro check merged.json independent.json [--min-agree 0.9]

Why: the p10-p90 of CUDA-graph replays within one process is ~1% wide, but two leases of the
same H200 disagreed by more than that on a third of the points (bench/README.md,
"Reproducibility"). A spread that is meant to contain the next run has to be measured across
runs in separate processes, so ``merge`` combines runs of ``python -m bench.kernels``.

merge: points are matched on (dtype, group size, sym, backend, N, K, M). Per point:

- ``ms``: median of the run medians (report, compare and choose_backends read it as before)
- ``run_ms``: the run medians; ``p10``/``p90``: lowest p10 and highest p90 of the runs
- ``lo``/``hi``: the reported spread, FLOOR_RULE below
- ``speedup`` from the merged medians; ``speedup_lo``/``speedup_hi`` = cuBLAS lo / hi and
  cuBLAS hi / lo: the two are measured independently, so their spreads combine worst-case

check: for every point measured in both, is the other run's median inside the reported spread
(``lo``..``hi``; ``p10``..``p90`` for a single-run JSON, the old method)? Prints the points
outside, the fraction inside per backend and in total, and exits 1 (with a FAIL line) when the
fraction is below ``--min-agree``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import statistics
import sys
from pathlib import Path

from . import common
from .kernels import add_derived

log = logging.getLogger("bench")

FLOOR_RULE = (
    "lo/hi cover the within-run p10..p90 of every run, every run median, and ms x (1 -+ floor), where the floor "
    "of a backend is sqrt((R+1)/(R-1)) x the 90th percentile, over that backend's points measured in >= 2 of the "
    "R runs, of |run median - ms| / ms (the pooled floor of all backends when one has < 10 such points): under "
    "normal noise that is a 90% prediction interval for one more run")
MIN_POINTS_PER_FLOOR = 10  # fewer points than this give a noisy 90th percentile: use the pooled one
DEFAULT_MIN_AGREE = 0.9  # the floor alone is a nominal 90% interval; lo/hi are wider still


def point_key(p: dict) -> tuple:
    """What makes two points the same measurement (the shape's name is a label, not part of it)."""
    return (p["dtype"], p.get("group_size"), bool(p.get("sym")), p["backend"], p["n"], p["k"], p["m"])


def _floors(points: list[dict], n_runs: int) -> dict:
    """backend -> relative half-width floor, from the between-run deviations of the merged points."""
    if n_runs < 2:
        return {}
    devs = collections.defaultdict(list)
    for p in points:
        if len(p["run_ms"]) >= 2:
            devs[p["backend"]] += [abs(t - p["ms"]) / p["ms"] for t in p["run_ms"]]
    pooled = [d for ds in devs.values() for d in ds]
    if not pooled:
        return {}
    factor = math.sqrt((n_runs + 1) / (n_runs - 1))
    n_points = collections.Counter(p["backend"] for p in points if len(p["run_ms"]) >= 2)
    floors = {b: factor * common.quantiles(ds)["p90"] for b, ds in devs.items() if n_points[b] >= MIN_POINTS_PER_FLOOR}
    floors["*"] = factor * common.quantiles(pooled)["p90"]
    return floors


def _median_of(dicts: list[dict], field: str):
    vals = [d[field] for d in dicts if d.get(field)]
    return statistics.median(vals) if vals else None


def merge(docs: list[dict], names: list[str] | None = None) -> dict:
    """One kernels JSON from several runs of the same sweep (see the module docstring)."""
    names = names or [f"run{i + 1}" for i in range(len(docs))]
    by_key: dict[tuple, list[dict]] = {}
    for doc in docs:
        for p in doc["results"]:
            by_key.setdefault(point_key(p), []).append(p)
    results = []
    for runs in by_key.values():
        timed = [p for p in runs if p.get("ms")]
        # Per-run fields (bytes, note, rel_err...) come from the first run; derived ones are recomputed below.
        point = {k: v for k, v in (timed or runs)[0].items()
                 if k not in ("gbps", "tflops", "pct_bw", "speedup", "roofline_ms", "bound_speedup")}
        if timed:
            point.update(ms=statistics.median(p["ms"] for p in timed), run_ms=[p["ms"] for p in timed],
                         p10=min(p["p10"] for p in timed), p90=max(p["p90"] for p in timed),
                         reps=sum(p.get("reps", 0) for p in timed))
            point.pop("error", None)
        results.append(point)

    floors = _floors([p for p in results if p.get("ms")], len(docs))
    for p in results:
        if p.get("ms"):
            f = floors.get(p["backend"], floors.get("*", 0.0))
            p["lo"] = min(p["p10"], *p["run_ms"], p["ms"] * (1 - f))
            p["hi"] = max(p["p90"], *p["run_ms"], p["ms"] * (1 + f))

    first = docs[0]
    bandwidth = dict(first.get("bandwidth") or {})
    for field in ("gbps", "copy_gbps", "read_gbps"):
        if bandwidth.get(field):
            bandwidth[field] = _median_of([d.get("bandwidth") or {} for d in docs], field)
    peaks = {dt: {**v, "tflops": _median_of([(d.get("matmul_peak") or {}).get(dt, {}) for d in docs], "tflops")}
             for dt, v in (first.get("matmul_peak") or {}).items()}
    add_derived(results, bandwidth, peaks)
    base = {(p["dtype"], p.get("group_size"), bool(p.get("sym")), p["n"], p["k"], p["m"]): p
            for p in results if p["backend"] == "cublas" and p.get("ms")}
    for p in results:
        ref = base.get(point_key(p)[:3] + point_key(p)[4:])
        if ref and p.get("ms") and p["backend"] != "cublas":
            p["speedup_lo"], p["speedup_hi"] = ref["lo"] / p["hi"], ref["hi"] / p["lo"]

    left_out = [x for x in first.get("left_out", []) if all(x in d.get("left_out", []) for d in docs)]
    floor_text = ", ".join(f"{b} {f:.1%}" for b, f in sorted(floors.items())) or "none (one run)"
    return {**first, "results": results, "bandwidth": bandwidth, "matmul_peak": peaks, "left_out": left_out,
            "method": f"{first.get('method', '')}; merged over {len(docs)} runs in separate processes: ms = median of "
                      f"the run medians; {FLOOR_RULE}; floors here: {floor_text}",
            "runs": [{"name": n, "date": d["env"].get("date"), "host": d["env"].get("host"),
                      "bandwidth": d.get("bandwidth"), "matmul_peak": d.get("matmul_peak"),
                      "points": sum(1 for p in d["results"] if p.get("ms")), "left_out": d.get("left_out", [])}
                     for n, d in zip(names, docs)],
            "repro": {"runs": len(docs), "floor": floors, "rule": FLOOR_RULE}}


def _spread(p: dict) -> tuple[float, float]:
    """The spread a point reports: lo..hi of a merged result, else the within-run p10..p90 (the old method)."""
    return (p["lo"], p["hi"]) if p.get("lo") is not None else (p["p10"], p["p90"])


def check(reported: dict, other: dict) -> list[dict]:
    """One row per point timed in both: is ``other``'s median inside ``reported``'s spread (and speedup)?"""
    mine = {point_key(p): p for p in reported["results"] if p.get("ms") and p.get("p10") is not None}
    theirs = {point_key(p): p for p in other["results"] if p.get("ms")}
    rows = []
    for key in sorted(mine.keys() & theirs.keys(), key=str):
        p, q = mine[key], theirs[key]
        lo, hi = _spread(p)
        row = {"key": key, "shape": p["shape"], "ms": p["ms"], "lo": lo, "hi": hi, "other_ms": q["ms"],
               "inside": lo <= q["ms"] <= hi, "speedup_inside": None}
        if p.get("speedup_lo") is not None and q.get("speedup"):
            row["speedup_inside"] = p["speedup_lo"] <= q["speedup"] <= p["speedup_hi"]
        rows.append(row)
    return rows


def check_summary(rows: list[dict], min_agree: float) -> tuple[str, bool]:
    """Per-backend and total fraction inside, and whether the total reaches ``min_agree``."""
    if not rows:
        return "FAIL: no common points", False
    lines = []
    by_backend = collections.defaultdict(list)
    for r in rows:
        by_backend[r["key"][3]].append(r["inside"])
    for b, flags in sorted(by_backend.items()):
        lines.append(f"  {b}: {sum(flags)}/{len(flags)} inside ({sum(flags) / len(flags):.0%})")
    sp = [r["speedup_inside"] for r in rows if r["speedup_inside"] is not None]
    if sp:
        lines.append(f"  speedup over cuBLAS: {sum(sp)}/{len(sp)} inside speedup_lo..speedup_hi ({sum(sp) / len(sp):.0%})")
    frac = sum(r["inside"] for r in rows) / len(rows)
    ok = frac >= min_agree
    lines.append(f"{'PASS' if ok else 'FAIL'}: {sum(r['inside'] for r in rows)}/{len(rows)} points ({frac:.1%}) of the "
                 f"other run fall within the reported spread (need >= {min_agree:.0%})")
    return "\n".join(lines), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.repro", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge runs of python -m bench.kernels into one JSON")
    m.add_argument("runs", nargs="+")
    m.add_argument("--out", required=True)
    c = sub.add_parser("check", help="does an independent run fall within a result's reported spread?")
    c.add_argument("reported", help="merged JSON (or a single run: its p10..p90 is then the spread)")
    c.add_argument("other", help="an independent run (another process, better another lease)")
    c.add_argument("--min-agree", type=float, default=DEFAULT_MIN_AGREE)
    c.add_argument("--all", action="store_true", help="print every point, not only those outside")
    args = ap.parse_args(argv)
    common.setup_logging()
    if args.cmd == "merge":
        docs = [json.loads(Path(f).read_text()) for f in args.runs]
        merged = merge(docs, [Path(f).name for f in args.runs])
        common.write_json(args.out, merged)
        log.info("wrote %s: %d points from %d runs; floors %s", args.out, len(merged["results"]), len(docs),
                 {b: round(f, 4) for b, f in merged["repro"]["floor"].items()})
        return 0
    reported, other = (json.loads(Path(f).read_text()) for f in (args.reported, args.other))
    if other["env"].get("date") in {r.get("date") for r in reported.get("runs", [])}:
        # A run inside the merged spread it helped build proves nothing.
        log.error("%s is one of the runs merged into %s: the check needs an independent run", args.other, args.reported)
        return 2
    rows = check(reported, other)
    for r in rows:
        if args.all or not r["inside"]:
            dtype, gs, sym, backend, n, k, m_ = r["key"]
            print(f"{'inside ' if r['inside'] else 'OUTSIDE'} {r['shape']} {n}x{k} M={m_} {dtype} g{gs}{' sym' if sym else ''} "
                  f"{backend}: {r['other_ms'] * 1e3:.1f} us vs {r['ms'] * 1e3:.1f} [{r['lo'] * 1e3:.1f}, {r['hi'] * 1e3:.1f}]")
    text, ok = check_summary(rows, args.min_agree)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
