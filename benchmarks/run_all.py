"""Run every benchmark (benchmarks/bench_*.py) and write its figures to benchmarks/results/ as JSON + markdown.

    python -m benchmarks.run_all            # full benchmarks (slow: tens of minutes on 2 cores)
    python -m benchmarks.run_all --quick    # reduced sizes, a few minutes
    python -m benchmarks.run_all --only segmentation celltyping

Benchmarks print figures; they are not timed tests. Each module exposes ``run(quick: bool) -> dict``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    names = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    if a.only:
        names = [n for n in names if n in a.only]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "_machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor(),
            "quick": a.quick,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    }
    failed = []
    for n in names:
        print(f"=== benchmark {n} ({'quick' if a.quick else 'full'})", flush=True)
        t0 = time.time()
        try:
            mod = importlib.import_module(f"benchmarks.bench_{n}")
            res = mod.run(quick=a.quick)
            res["_seconds"] = round(time.time() - t0, 1)
            results[n] = res
        except Exception:
            traceback.print_exc()
            results[n] = {"error": traceback.format_exc(limit=3)}
            failed.append(n)
        for k, v in _flatten(results[n]).items():
            print(f"  {k}: {_fmt(v)}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = ["# Benchmark results", "", f"machine: {results['_machine']}", ""]
    for n in names:
        lines += [f"## {n}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(results[n]).items()]
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
