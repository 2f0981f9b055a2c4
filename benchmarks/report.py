"""Markdown report of pytest-benchmark JSON files, and the README's performance section.

    python benchmarks/report.py bench.json [more.json ...] > report.md
    python benchmarks/report.py --output report.md bench.json [more.json ...]
    python benchmarks/report.py --store bench.json [more.json ...]
    python benchmarks/report.py --store-gpu-run OUTDIR
    python benchmarks/report.py --readme README.md

``--store`` keeps a run: it merges the JSON files and writes their report.md under
``benchmarks/results/<device>/<date>_<commit>/``. ``--store-gpu-run`` keeps a whole
``scripts/gpu_check.sh`` output folder there (phases, versions, smoke and test results, the
logs' ends, the benchmarks).

The second form rewrites the README between the ``benchmarks:start`` / ``benchmarks:end``
markers from the newest ``report.md`` of each device folder under benchmarks/results/
(``results/<device>/<date>_<commit>/report.md``), labelled GPU or CPU.

One table per benchmark function; one row per case (shape, dtype); astrea, eager and
torch.compile medians side by side, astrea's speed-up over each, astrea's share of the
measured memory bandwidth (and of the matmul peak where the op counts FLOPs), and the
peak-memory ratio astrea / eager.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

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


def _seconds(bench: dict) -> float:
    """The run's time of record: CUDA-event timing on GPU (harness.run), else pytest-benchmark's median."""
    return bench["extra_info"].get("median_s", bench["stats"]["median"])


def _plain(value) -> str:
    """pytest-benchmark writes objects it cannot serialise (dtypes) as 'UNSERIALIZABLE[torch.x]'."""
    text = str(value)
    match = re.fullmatch(r"UNSERIALIZABLE\[(?:torch\.)?(.*)\]", text)
    return match.group(1) if match else text


def _case_label(params: dict) -> str:
    items = []
    for key, value in params.items():
        if key == "provider":
            continue
        items += value.items() if isinstance(value, dict) else [(key, value)]
    return ", ".join(f"{k}={_plain(v)}" for k, v in items)


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
        "Times are medians (CUDA-event device time on GPU, wall time on CPU). Speed-ups are eager / astrea and compile / astrea (> 1: astrea faster). "
        "% BW: astrea's bytes moved over the device's measured copy bandwidth. Mem: astrea's peak extra "
        "memory / eager's.",
    ]
    for function, cases in tables.items():
        lines += ["", f"## {function}", "",
                  "| case | astrea | eager | compile | vs eager | vs compile | astrea GB/s | % BW | % matmul peak | mem "
                  "| other providers (their time / astrea's) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for case, by_provider in cases.items():
            median = {p: _seconds(by_provider[p]) if p in by_provider else None for p in PROVIDERS}
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
                "; ".join(f"{name} {_fmt_time(_seconds(bench))} ({_ratio(_seconds(bench), median['astrea'])})"
                          for name, bench in by_provider.items() if name not in PROVIDERS) or "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"
RESULTS = Path(__file__).parent / "results"


def _run_time(report: Path) -> str:
    """When the run of ``report`` was measured (its JSON's ISO datetime), so that runs of one
    day are ordered by time, not by commit hash; the folder's ``<date>`` without a JSON."""
    stored = report.parent / "benchmarks.json"
    when = json.loads(stored.read_text()).get("datetime") if stored.exists() else None
    return when or report.parent.name[:10]


def latest_reports(results: Path = RESULTS) -> list[tuple[str, Path]]:
    """(device folder, newest report.md in it) for every device folder, sorted by name."""
    found = []
    for device_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        runs = list(device_dir.glob("*/report.md"))
        if runs:
            found.append((device_dir.name, max(runs, key=_run_time)))
    return found


def readme_section(results: Path = RESULTS) -> str:
    parts = []
    for device, report in latest_reports(results):
        kind = "CPU" if device.startswith("cpu") else "GPU"
        body = re.sub(r"^## ", "#### ", report.read_text().replace("# astrea benchmarks", "").strip(), flags=re.M)
        parts.append(f"### {kind} figures: {device} ({report.parent.name})\n\n{body}\n")
    if not parts:
        parts.append("No benchmark results are committed yet.\n")
    return "\n".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _device_dir(device: str) -> str:
    return "cpu-" + _slug(device.split("(")[1].split(",")[0]) if device.startswith("CPU") else _slug(device)


def _write_benchmarks(json_paths: Sequence[Path], benchmarks: list[dict], machine: dict, run_dir: Path) -> None:
    """One benchmarks.json of the runs in ``json_paths``, already loaded as ``benchmarks`` and
    ``machine`` (raw timings dropped; the first file's metadata), and its report.md."""
    merged = json.loads(json_paths[0].read_text())
    merged["benchmarks"] = benchmarks
    for bench in benchmarks:
        bench["stats"].pop("data", None)  # every raw timing: megabytes, and the report needs none
    (run_dir / "benchmarks.json").write_text(json.dumps(merged, indent=1) + "\n")
    (run_dir / "report.md").write_text(render(benchmarks, machine))


def store(json_paths: Sequence[Path], results: Path = RESULTS) -> Path:
    """Keeps one benchmark run (one or more JSON files of one commit on one device) under
    results/<device>/<date>_<commit>/ as benchmarks.json and report.md; returns that folder."""
    benchmarks, machine = load(list(json_paths))
    device = benchmarks[0]["extra_info"]["device"]
    run_dir = results / _device_dir(device) / f"{str(machine.get('datetime'))[:10]}_{str(machine.get('commit'))[:10]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_benchmarks(json_paths, benchmarks, machine, run_dir)
    return run_dir


# What a scripts/gpu_check.sh OUTDIR keeps whole; of its logs only the last LOG_TAIL_LINES lines.
GPU_RUN_FILES = ("phases.json", "smoke.json", "tests.xml")
LOG_TAIL_LINES = 400


def store_gpu_run(outdir: Path, results: Path = RESULTS) -> Path:
    """Keeps a whole ``scripts/gpu_check.sh OUTDIR`` run, whatever phases finished, under
    results/<device>/<date>_<commit>/: phases.json (commit, device, versions, each phase's
    status and seconds), the smoke records, the test results, each log's end, and the
    benchmarks of the bench phase as :func:`store` keeps them. Returns that folder."""
    phases = json.loads((outdir / "phases.json").read_text())
    run_dir = results / _device_dir(phases.get("device") or "unknown") / (
        f"{str(phases.get('started'))[:10]}_{str(phases.get('commit'))[:10]}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in GPU_RUN_FILES:
        if (outdir / name).exists():
            shutil.copyfile(outdir / name, run_dir / name)
    for log in sorted(outdir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        (run_dir / f"{log.name}.tail").write_text("\n".join(lines) + "\n")
    benchmark_files = sorted((outdir / "bench").glob("*.json"))
    if benchmark_files:
        _write_benchmarks(benchmark_files, *load(benchmark_files), run_dir)
    return run_dir


def update_readme(readme: Path, results: Path = RESULTS) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{readme_section(results)}{README_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--store", action="store_true", help="keep the run under benchmarks/results/")
    parser.add_argument("--store-gpu-run", type=Path, metavar="OUTDIR",
                        help="keep a scripts/gpu_check.sh OUTDIR under benchmarks/results/")
    parser.add_argument("--readme", type=Path, help="rewrite this README's performance section instead")
    parser.add_argument("--output", type=Path, help="write the report to this file (default: standard output)")
    args = parser.parse_args()
    if args.readme:
        update_readme(args.readme)
    elif args.store_gpu_run:
        print(store_gpu_run(args.store_gpu_run))
    elif args.store:
        print(store(args.json))
    elif args.json and args.output:
        args.output.write_text(render(*load(args.json)))
    elif args.json:
        print(render(*load(args.json)), end="")
    else:
        parser.error("give benchmark JSON files or --readme")


if __name__ == "__main__":
    main()
