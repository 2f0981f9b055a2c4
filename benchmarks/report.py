"""Markdown report of pytest-benchmark JSON files.

    python benchmarks/report.py bench.json [more.json ...] > report.md

One table per benchmark function; one row per case (shape, dtype); astrea, eager and
torch.compile medians side by side, astrea's speed-up over each, astrea's share of the
measured memory bandwidth (and of the matmul peak where the op counts FLOPs), and the
peak-memory ratio astrea / eager.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PROVIDERS = ("astrea", "eager", "compile")


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _ratio(num: float | None, den: float | None) -> str:
    return "–" if not num or not den else f"{num / den:.2f}×"


def _number_or_dash(extra: dict, key: str) -> str:
    return f"{extra[key]:.1f}" if key in extra else "–"


def _case_label(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "provider")


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    benchmarks, machine = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        benchmarks.extend(data["benchmarks"])
        machine = data.get("machine_info", machine) | {"datetime": data.get("datetime"),
                                                        "commit": data.get("commit_info", {}).get("id")}
    return benchmarks, machine


def render(benchmarks: list[dict], machine: dict) -> str:
    tables: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    env = {}
    for bench in benchmarks:
        params = bench.get("params") or {}
        provider = params.get("provider", "astrea")
        function = bench["name"].split("[")[0]
        tables[function][_case_label(params)][provider] = bench
        env = {k: bench["extra_info"].get(k) for k in ("device", "torch", "triton", "cuda")} or env
    lines = [
        "# astrea benchmarks",
        "",
        f"device: {env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
        f"CUDA {env.get('cuda')} · run {machine.get('datetime')} · commit {str(machine.get('commit'))[:10]}",
        "",
        "Times are medians. Speed-ups are eager / astrea and compile / astrea (> 1: astrea faster). "
        "% BW: astrea's bytes moved over the device's measured copy bandwidth. Mem: astrea's peak extra "
        "memory / eager's.",
    ]
    for function, cases in tables.items():
        lines += ["", f"## {function}", "",
                  "| case | astrea | eager | compile | vs eager | vs compile | astrea GB/s | % BW | % matmul peak | mem |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for case, by_provider in cases.items():
            median = {p: by_provider[p]["stats"]["median"] if p in by_provider else None for p in PROVIDERS}
            ours = by_provider.get("astrea", {}).get("extra_info", {})
            eager = by_provider.get("eager", {}).get("extra_info", {})
            cells = [
                case,
                *(_fmt_time(median[p]) for p in PROVIDERS),
                _ratio(median["eager"], median["astrea"]),
                _ratio(median["compile"], median["astrea"]),
                _number_or_dash(ours, "gbps"),
                _number_or_dash(ours, "pct_bandwidth"),
                _number_or_dash(ours, "pct_matmul_peak"),
                _ratio(ours.get("peak_memory_bytes"), eager.get("peak_memory_bytes")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    args = parser.parse_args()
    print(render(*load(args.json)), end="")


if __name__ == "__main__":
    main()
