"""The GPU run in time-boxed phases (``scripts/gpu_check.sh OUTDIR`` calls this).

Phases, in order, each with its own budget in seconds and its results written to OUTDIR
as soon as it ends, so that a run killed by the window's limit still returns what it
finished:

=========  ======  ==========================================================================
build      180     ``astrea._C`` with CUDA (``FORCE_CUDA=1``, ``MAX_JOBS`` = the cores), then
                   ``python -m astrea info``
smoke      120     ``python -m astrea.smoke``: every op forward and backward in fp32/bf16/fp16
                   at a small odd size and at the benchmark size, against the reference
bench      240     each benchmark file's headline case (``--headline``), astrea / eager /
                   torch.compile, one JSON per file, then ``benchmarks/report.py``
tests      rest    the test suite, 60 s per test, until the total budget less the sanitizer's
sanitizer  60      compute-sanitizer memcheck and racecheck of ``scripts/cuda_sanitizer_check.py``
=========  ======  ==========================================================================

The whole run is bounded by ``--budget`` (default 540 s = 9 minutes). A phase past its
budget gets SIGINT (pytest then writes its summary), then SIGKILL 10 s later. A failing
phase does not stop the next ones. ``OUTDIR/phases.json`` (rewritten after every phase)
holds the commit, the environment and each phase's status, exit code, seconds and log;
the run ends with a table of the phase timings. ``--phases smoke,bench`` reruns a part,
``--dry-run`` prints the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET = 540
SANITIZER_BUDGET = 60
PER_TEST_TIMEOUT = 60
# After SIGINT, the seconds a phase has to write its results before SIGKILL.
GRACE = 10


@dataclasses.dataclass(frozen=True)
class Phase:
    """``commands(outdir)`` yields the commands, each asked for when the one before it has
    ended, and run in ROOT; ``budget``
    is in seconds, None for what the total leaves after the later phases' budgets."""

    name: str
    budget: float | None
    commands: Callable[[Path], Iterable[list[str]]]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def _python() -> str:
    return os.environ.get("PYTHON", sys.executable)


def _build(out: Path) -> Iterator[list[str]]:
    yield [_python(), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    yield [_python(), "-m", "astrea", "info"]


def _smoke(out: Path) -> Iterator[list[str]]:
    yield [_python(), "-m", "astrea.smoke", "--out", str(out / "smoke.json")]


# Benchmark files in the order the bench phase runs them, the experts (most of a MoE layer's
# time) first; files not named here follow in name order.
BENCH_FIRST = ("test_bench_experts", "test_bench_router", "test_bench_dispatch_combine", "test_bench_residual_combine",
               "test_bench_moco")


def _bench_files() -> list[Path]:
    files = sorted((ROOT / "benchmarks").glob("test_bench_*.py"))
    rank = {name: i for i, name in enumerate(BENCH_FIRST)}
    return sorted(files, key=lambda path: (rank.get(path.stem, len(rank)), path.stem))


def _bench(out: Path) -> Iterator[list[str]]:
    (out / "bench").mkdir(exist_ok=True)
    for path in _bench_files():
        yield [_python(), "-m", "pytest", str(path.relative_to(ROOT)), "--benchmark-only", "--headline", "-q",
               "-p", "no:cacheprovider", f"--benchmark-json={out / 'bench' / (path.stem + '.json')}"]
    # Asked for after the benchmarks ran: the report covers the files they wrote.
    written = sorted(str(path) for path in (out / "bench").glob("*.json"))
    if written:
        yield [_python(), "benchmarks/report.py", "--output", str(out / "report.md"), *written]


def _tests(out: Path) -> Iterator[list[str]]:
    yield [_python(), "-m", "pytest", "tests", "-q", "-ra", "-p", "no:cacheprovider",
           f"--timeout={PER_TEST_TIMEOUT}", f"--junitxml={out / 'tests.xml'}"]


def _sanitizer(out: Path) -> Iterator[list[str]]:
    sanitizer = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                  "bin", "compute-sanitizer")
    for tool in ("memcheck", "racecheck"):
        yield [sanitizer, "--tool", tool, "--error-exitcode", "1", _python(), "scripts/cuda_sanitizer_check.py"]


PHASES = (
    Phase("build", 180, _build, {"FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 1)}),
    Phase("smoke", 120, _smoke),
    Phase("bench", 240, _bench),
    Phase("tests", None, _tests),
    Phase("sanitizer", SANITIZER_BUDGET, _sanitizer),
)


def _run_command(command: Sequence[str], log, env: dict[str, str], deadline: float) -> tuple[int | None, bool]:
    """(exit code, timed out): ``command`` with its output appended to ``log``, stopped at
    ``deadline`` (SIGINT to its process group, SIGKILL after GRACE seconds)."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    try:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
    except OSError as exc:
        log.write(f"cannot start: {exc}\n")
        return 127, False
    try:
        return process.wait(timeout=max(deadline - time.monotonic(), 0)), False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return process.returncode, True


def phase_budget(phase: Phase, selected: Sequence[Phase], total: float, elapsed: float) -> float:
    """The seconds ``phase`` may take: its own budget (the open one: all that is left), cut to
    what the total leaves. Up to the open phase, the budgets of the phases after it are kept
    back: the open phase absorbs what the others did not use, not the phases behind it."""
    here = selected.index(phase)
    open_at = next((i for i, p in enumerate(selected) if p.budget is None), None)
    reserved = sum(p.budget for p in selected[open_at + 1:]) if open_at is not None and here <= open_at else 0
    left = total - elapsed - reserved
    return max(min(phase.budget, left) if phase.budget is not None else left, 0.0)


def run_phases(selected: Sequence[Phase], out: Path, total: float, summary: dict) -> list[dict]:
    """Runs the phases in order; writes ``out/phases.json`` after each and returns its records."""
    start = time.monotonic()
    records: list[dict] = []
    for phase in selected:
        budget = phase_budget(phase, selected, total, time.monotonic() - start)
        record = {"phase": phase.name, "budget_s": round(budget, 1), "log": f"{phase.name}.log"}
        began = time.monotonic()
        if budget <= 0:
            record.update(status="skipped", why="no time left in the total budget", seconds=0.0)
        else:
            deadline, codes, timed_out = began + budget, [], False
            with open(out / record["log"], "a") as log:
                for command in phase.commands(out):
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
                    code, expired = _run_command(command, log, phase.env, deadline)
                    codes.append(code)
                    timed_out |= expired
                    if expired:
                        break
            failed = any(code != 0 for code in codes)
            record.update(status="timeout" if timed_out else "failed" if failed else "ok", exit_codes=codes,
                          seconds=round(time.monotonic() - began, 1))
        records.append(record)
        (out / "phases.json").write_text(json.dumps({**summary, "phases": records}, indent=1))
        print(f"== {phase.name}: {record['status']} in {record['seconds']:.1f} s (budget {budget:.0f} s)", flush=True)
    return records


def timing_table(records: Sequence[dict]) -> str:
    lines = ["phase      status    seconds  budget", "---------  --------  -------  ------"]
    lines += [f"{r['phase']:<9}  {r['status']:<8}  {r['seconds']:>7.1f}  {r['budget_s']:>6.0f}" for r in records]
    lines.append(f"total                {sum(r['seconds'] for r in records):>7.1f}")
    return "\n".join(lines)


def _output(command: Sequence[str]) -> str | None:
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Commit, device and versions, read without importing torch into this process."""
    versions = _output([_python(), "-c", "import json, torch, platform; import importlib.metadata as m\n"
                        "def v(d):\n try: return m.version(d)\n except Exception: return None\n"
                        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
                        "'cuda': torch.version.cuda, 'triton': v('triton'), 'transformers': v('transformers'), "
                        "'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))"])
    return {"commit": _output(["git", "rev-parse", "HEAD"]), "dirty": bool(_output(["git", "status", "--short"])),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nvidia_smi": _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                   "--format=csv,noheader"]),
            **(json.loads(versions) if versions else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--phases", default=",".join(p.name for p in PHASES),
                        help="comma-separated phases to run, in the fixed order (default: all)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="seconds for the whole run")
    parser.add_argument("--dry-run", action="store_true", help="print the phases, budgets and commands only")
    args = parser.parse_args(argv)
    names = args.phases.split(",")
    unknown = [n for n in names if n not in {p.name for p in PHASES}]
    if unknown:
        parser.error(f"--phases: unknown {', '.join(unknown)}; the phases are {', '.join(p.name for p in PHASES)}")
    selected = [p for p in PHASES if p.name in names]
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for phase in selected:
            print(f"{phase.name} (budget {phase_budget(phase, selected, args.budget, 0):.0f} s):")
            for command in phase.commands(args.outdir):
                print("   ", " ".join(command))
        return 0
    summary = {**environment(), "budget_s": args.budget}
    print(json.dumps(summary, indent=1), flush=True)
    records = run_phases(selected, args.outdir, args.budget, summary)
    print(timing_table(records))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
