"""Reliability figures: what the hardening runs recorded, printed as one report.

The hostile-input tests, the load run and the fault runs each write one JSON file
under RELIABILITY_DIR (default `test-artifacts/reliability`) with `record()`; this
command prints them together:

    .venv/bin/python -m bench.reliability [--dir DIR] [--require bad_inputs,load,faults]

Record shapes (extra keys are printed as they are):
- bad_inputs: {"tried": int, "by_category": {name: int}, "unexpected": [str]}
- load: {"clients", "duration_s", "requests", "errors", "error_rate", "p50_ms", "p99_ms",
  "rps", "overload": {...}, "rss_start_mb", "rss_end_mb"}
- faults: {"faults": [{"name": str, "survived": bool, "detail": str}]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "test-artifacts" / "reliability"


def results_dir() -> Path:
    """The folder the records go to: RELIABILITY_DIR or the default."""
    return Path(os.environ.get("RELIABILITY_DIR") or DEFAULT_DIR)


def record(name: str, data: dict) -> Path:
    """Write one run's figures as `<name>.json`, replacing an older record of the same name."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def load_records(folder: Path) -> dict[str, dict]:
    """Every record in the folder, by name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def format_bad_inputs(data: dict) -> list[str]:
    lines = [f"bad inputs tried: {data['tried']}, unexpected answers: {len(data.get('unexpected', []))}"]
    lines += [f"  {name}: {count}" for name, count in sorted(data.get("by_category", {}).items())]
    lines += [f"  UNEXPECTED {item}" for item in data.get("unexpected", [])]
    return lines


def format_load(data: dict) -> list[str]:
    lines = [f"load held: {data['clients']} clients for {data['duration_s']:.0f} s, {data['requests']} requests, "
             f"{data['errors']} errors (rate {data['error_rate']:.4f}), p50 {data['p50_ms']:.0f} ms, "
             f"p99 {data['p99_ms']:.0f} ms, {data['rps']:.1f} req/s"]
    if "rss_start_mb" in data:
        lines.append(f"  memory: {data['rss_start_mb']:.0f} MB at start, {data['rss_end_mb']:.0f} MB at end")
    if data.get("overload"):
        lines.append("  overload: " + ", ".join(f"{k} {v}" for k, v in sorted(data["overload"].items())))
    return lines


def format_faults(data: dict) -> list[str]:
    faults = data["faults"]
    survived = sum(1 for fault in faults if fault["survived"])
    lines = [f"faults survived: {survived} of {len(faults)}"]
    lines += [f"  {'ok  ' if f['survived'] else 'LOST'} {f['name']}: {f.get('detail', '')}" for f in faults]
    return lines


FORMATTERS = {"bad_inputs": format_bad_inputs, "load": format_load, "faults": format_faults}


def report(records: dict[str, dict]) -> list[str]:
    """The report's lines, one block per record."""
    lines: list[str] = []
    for name, data in records.items():
        formatter = FORMATTERS.get(name) or FORMATTERS.get(name.split("-")[0])
        lines += formatter(data) if formatter else [f"{name}: {json.dumps(data, sort_keys=True)}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="records folder (default RELIABILITY_DIR)")
    parser.add_argument("--require", default="", help="comma-separated record names that must be present")
    args = parser.parse_args(argv)
    folder = args.dir or results_dir()
    records = load_records(folder) if folder.is_dir() else {}
    print("\n".join(report(records)) or f"no records in {folder}")
    missing = [name for name in filter(None, args.require.split(",")) if name not in records]
    if missing:
        print(f"missing records: {', '.join(missing)} (run their steps first)", file=sys.stderr)
    lost = any(not f["survived"] for data in records.values() for f in data.get("faults", []))
    unexpected = any(data.get("unexpected") for data in records.values())
    return 1 if missing or lost or unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
