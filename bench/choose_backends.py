"""Turn a kernel-benchmark JSON into the table ``backend="auto"`` consults.

    python -m bench.choose_backends bench/results/kernels_<gpu>_<date>.json

For each (shape N x K, M) it takes the int4ops backend (triton or cuda) with the lowest median
time summed over the dtypes measured, and merges the result, keyed by GPU name, into
``int4ops/kernels/auto_backend.json``. ``int4ops.ops.select_backend`` reads that file:
the exact shape when it was measured, else the backend that won most shapes at the nearest M.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "int4ops" / "kernels" / "auto_backend.json"
CANDIDATES = ("triton", "cuda")


def choose(doc: dict) -> dict:
    totals = collections.defaultdict(float)  # (shape, m, backend) -> summed ms over dtypes
    seen = collections.defaultdict(set)  # (shape, m, backend) -> dtypes measured
    dtypes = collections.defaultdict(set)  # (shape, m) -> dtypes any candidate measured
    for p in doc["results"]:
        if p.get("backend") in CANDIDATES and p.get("ms") and not p.get("error"):
            key = (f"{p['n']}x{p['k']}", p["m"])
            totals[(*key, p["backend"])] += p["ms"]
            seen[(*key, p["backend"])].add(p["dtype"])
            dtypes[key].add(p["dtype"])
    shapes: dict = {}
    for (shape, m), dts in sorted(dtypes.items()):
        # Only backends measured at every dtype compete, so a partial row cannot win by omission.
        full = [b for b in CANDIDATES if seen.get((shape, m, b)) == dts]
        if full:
            best = min(full, key=lambda b: totals[(shape, m, b)])
            shapes.setdefault(shape, {})[str(m)] = best
    return shapes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="kernels_*.json from python -m bench.kernels")
    ap.add_argument("--table", default=str(TABLE))
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    gpu = doc["env"]["gpu"]
    table_path = Path(args.table)
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    table[gpu] = {"source": Path(args.results).name, "date": doc["env"]["date"], "group_size": doc["args"]["group_size"],
                  "shapes": choose(doc)}
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    for shape, by_m in table[gpu]["shapes"].items():
        print(f"{gpu} {shape}: " + ", ".join(f"M={m}:{b}" for m, b in sorted(by_m.items(), key=lambda kv: int(kv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
