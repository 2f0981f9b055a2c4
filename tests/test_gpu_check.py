"""The time-boxed GPU run (scripts/gpu_check.sh -> scripts/gpu_check.py): its phase logic on
CPU, with stand-in phases, and the real smoke phase end to end through the interpreter."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _phase(name, budget, *codes):
    return gpu_check.Phase(name, budget, lambda out: (_python(code) for code in codes))


def test_phases_run_in_order_record_status_and_survive_failures_and_timeouts(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE", 2)
    phases = [
        _phase("first", 30, "print('built')"),
        _phase("second", 30, "import sys; sys.exit(3)", "print('after the failure')"),
        _phase("third", 1.5, "import time; print('started', flush=True); time.sleep(60)", "print('never')"),
        _phase("fourth", None, "print('the rest')"),
    ]
    start = time.monotonic()
    records = gpu_check.run_phases(phases, tmp_path, total=120, summary={"commit": "abc"})
    assert time.monotonic() - start < 30  # the sleeping phase was stopped at its budget
    assert [(r["phase"], r["status"]) for r in records] == [
        ("first", "ok"), ("second", "failed"), ("third", "timeout"), ("fourth", "ok")]
    assert records[1]["exit_codes"] == [3, 0]  # a failing command does not stop its phase
    assert 1.5 <= records[2]["seconds"] < 1.5 + 2 + 5
    assert "started" in (tmp_path / "third.log").read_text()  # a killed phase keeps its log
    assert "never" not in (tmp_path / "third.log").read_text()
    saved = json.loads((tmp_path / "phases.json").read_text())
    assert saved["commit"] == "abc" and [r["phase"] for r in saved["phases"]] == ["first", "second", "third", "fourth"]
    table = gpu_check.timing_table(records)
    assert all(name in table for name in ("first", "second", "third", "fourth", "total"))


def test_the_open_budget_is_what_the_total_leaves_after_the_sanitizer():
    phases = list(gpu_check.PHASES)
    build, tests, sanitizer = phases[0], phases[3], phases[4]
    assert (build.name, tests.name, sanitizer.name) == ("build", "tests", "sanitizer")
    assert gpu_check.phase_budget(tests, phases, total=540, elapsed=200) == 540 - 200 - sanitizer.budget
    assert gpu_check.phase_budget(tests, phases, total=540, elapsed=500) == 0
    # Fixed budgets are caps, cut only by what the total leaves after the sanitizer's share.
    assert gpu_check.phase_budget(build, phases, total=540, elapsed=0) == build.budget
    assert gpu_check.phase_budget(phases[2], phases, total=540, elapsed=400) == 540 - 400 - sanitizer.budget
    assert gpu_check.phase_budget(sanitizer, phases, total=540, elapsed=500) == 40


def test_a_phase_with_no_time_left_is_skipped_not_started(tmp_path):
    phases = [_phase("late", None, "print('ran')"), _phase("sanitizer", 10, "print('ran')")]
    records = gpu_check.run_phases(phases, tmp_path, total=5, summary={})
    assert records[0]["status"] == "skipped" and not (tmp_path / "late.log").exists()
    assert records[1]["status"] == "ok"


def test_dry_run_lists_every_phase_in_order_and_unknown_phases_are_refused(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    names = [p.name for p in gpu_check.PHASES]
    assert names == ["build", "smoke", "bench", "tests", "sanitizer"]
    positions = [printed.index(f"{name} (budget") for name in names]
    assert positions == sorted(positions)
    assert "--headline" in printed and "--timeout=" in printed
    build = gpu_check.PHASES[0]
    assert build.env == {"FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count())}
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--phases", "smoke,lint"])


def test_the_smoke_phase_runs_end_to_end_on_cpu(tmp_path):
    """scripts/gpu_check.sh itself, smoke phase only: the interpreter on CPU at tiny sizes."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--phases", "smoke"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = json.loads((tmp_path / "phases.json").read_text())
    assert [(r["phase"], r["status"]) for r in phases["phases"]] == [("smoke", "ok")]
    assert phases["torch"] and phases["commit"]
    records = json.loads((tmp_path / "smoke.json").read_text())
    assert records and all(r["ok"] for r in records)
    assert "smoke" in result.stdout and "total" in result.stdout
