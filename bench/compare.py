"""Are two kernel-benchmark runs the same? Point by point, against the spread each reports.

    python -m bench.compare bench/results/kernels_A.json bench/results/kernels_B.json

For every (shape, M, dtype, backend) measured in both, the difference of the medians relative
to their mean is set against the larger of the two points' own spreads ((p90 - p10) / median).
A point "agrees" when its difference is within that spread. Prints a summary and the worst
points; ``--markdown`` prints the summary as a markdown paragraph for the results README.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _points(doc: dict) -> dict:
    return {
        (p["shape"], p["m"], p["dtype"], p["backend"]): p
        for p in doc["results"]
        if p.get("ms") and p.get("p10") is not None and p.get("p90") is not None
    }


def compare(a: dict, b: dict) -> list[dict]:
    pa, pb = _points(a), _points(b)
    rows = []
    for key in sorted(pa.keys() & pb.keys(), key=str):
        x, y = pa[key], pb[key]
        diff = abs(x["ms"] - y["ms"]) / ((x["ms"] + y["ms"]) / 2)
        spread = max((x["p90"] - x["p10"]) / x["ms"], (y["p90"] - y["p10"]) / y["ms"])
        rows.append({"key": key, "a_us": x["ms"] * 1e3, "b_us": y["ms"] * 1e3, "diff": diff, "spread": spread,
                     "agrees": diff <= spread})
    return rows


def summary(rows: list[dict]) -> str:
    if not rows:
        return "no common points"
    agree = sum(r["agrees"] for r in rows)
    diffs = [r["diff"] for r in rows]
    within5 = sum(d <= 0.05 for d in diffs)
    return (f"{len(rows)} common points: median difference {statistics.median(diffs):.1%}, "
            f"{within5 / len(rows):.0%} within 5%, {agree / len(rows):.0%} within their own reported spread "
            f"(median spread {statistics.median(r['spread'] for r in rows):.1%}); worst {max(diffs):.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--worst", type=int, default=10)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    da, db = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    rows = compare(da, db)
    text = summary(rows)
    if args.markdown:
        print(f"Reproducibility: `{Path(args.a).name}` ({da['env']['date']}) vs `{Path(args.b).name}` "
              f"({db['env']['date']}), two leases of {da['env']['gpu']}: {text}.")
        return 0
    print(text)
    for r in sorted(rows, key=lambda r: -r["diff"])[: args.worst]:
        shape, m, dtype, backend = r["key"]
        print(f"  {shape} M={m} {dtype} {backend}: {r['a_us']:.1f} vs {r['b_us']:.1f} us "
              f"({r['diff']:.1%}, spread {r['spread']:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
