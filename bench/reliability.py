"""Reliability figures: what the hardening runs recorded, printed as one report.

The hostile-input tests, the load run and the fault runs each write one JSON file
under RELIABILITY_DIR (default `test-artifacts/reliability`) with `record()`; this
command prints them together:

    .venv/bin/python -m bench.reliability [--dir DIR] [--require bad_inputs,load,faults]

Record shapes (extra keys are printed as they are):
- bad_inputs: {"tried": int, "by_category": {name: int}, "unexpected": [str]}
- load: {"clients", "duration_s", "requests", "errors", "error_rate", "p50_ms", "p99_ms",
  "rps", "overload": {...}, "rss_start_mb", "rss_end_mb"} (optional: "rss_peak_mb", "publishes",
  "publish_errors", "workers", "threads", "recorded")
- overload: {"clients", "duration_s", "requests", "ok", "rejected_503", "other_errors", "p50_503_ms",
  "p99_503_ms", "p50_200_ms", "p99_200_ms", "healthy_after"} (also the `overload` of a load record)
- faults: {"faults": [{"name": str, "survived": bool, "detail": str}]}

The exit status is 1 when a required record is missing, a fault was not survived, a bad input
got an unexpected answer, or a load or overload run saw errors.
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
    if "publishes" in data:
        lines.append(f"  published / rolled back {data['publishes']} times during the load, "
                     f"{data.get('publish_errors', 0)} errors")
    if "rss_start_mb" in data:
        peak = f", peak {data['rss_peak_mb']:.0f} MB" if "rss_peak_mb" in data else ""
        growth = (data["rss_end_mb"] / data["rss_start_mb"] - 1) * 100 if data["rss_start_mb"] else 0.0
        lines.append(f"  memory: {data['rss_start_mb']:.0f} MB after warm-up, {data['rss_end_mb']:.0f} MB at end "
                     f"({growth:+.1f}%){peak}")
    if data.get("overload"):
        lines += ["  " + line for line in format_overload(data["overload"])]
    return lines


def format_overload(data: dict) -> list[str]:
    if not {"requests", "rejected_503", "p99_503_ms"} <= data.keys():  # an older or foreign shape: print as is
        return ["overload: " + ", ".join(f"{k} {v}" for k, v in sorted(data.items()))]
    line = (f"overload: {data['clients']} clients for {data['duration_s']:.0f} s past the queue bound, "
            f"{data['requests']} requests: {data['ok']} answered, {data['rejected_503']} got 503 + Retry-After "
            f"(p50 {data['p50_503_ms']:.0f} ms, p99 {data['p99_503_ms']:.0f} ms), {data['other_errors']} other errors")
    if "healthy_after" in data:
        line += "; healthy after" if data["healthy_after"] else "; NOT healthy after"
    return [line]


def format_faults(data: dict) -> list[str]:
    faults = data["faults"]
    survived = sum(1 for fault in faults if fault["survived"])
    lines = [f"faults survived: {survived} of {len(faults)}"]
    lines += [f"  {'ok  ' if f['survived'] else 'LOST'} {f['name']}: {f.get('detail', '')}" for f in faults]
    return lines


FORMATTERS = {"bad_inputs": format_bad_inputs, "load": format_load, "overload": format_overload,
              "faults": format_faults}


def report(records: dict[str, dict]) -> list[str]:
    """The report's lines, one block per record."""
    lines: list[str] = []
    for name, data in records.items():
        formatter = FORMATTERS.get(name) or FORMATTERS.get(name.split("-")[0])
        block = formatter(data) if formatter else [f"{name}: {json.dumps(data, sort_keys=True)}"]
        if formatter and data.get("recorded") and block:
            block[0] += f" [recorded {data['recorded']}]"
        if formatter and name not in FORMATTERS and block:
            block[0] += f" [record {name}]"  # e.g. bad_inputs-partial: a run of part of the corpus
        lines += block
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
    load_errors = any(had_errors(data) for name, data in records.items()
                      if name.split("-")[0] in ("load", "overload"))
    return 1 if missing or lost or unexpected or load_errors else 0


def had_errors(data: dict) -> bool:
    """Whether a load or overload record counted errors (a 503 past the queue bound is not one)."""
    overload = data.get("overload") or {}
    return bool(data.get("errors") or data.get("publish_errors") or data.get("other_errors")
                or overload.get("other_errors") or data.get("healthy_after") is False
                or overload.get("healthy_after") is False)


if __name__ == "__main__":
    sys.exit(main())
