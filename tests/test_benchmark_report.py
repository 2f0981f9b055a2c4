"""benchmarks/report.py turns pytest-benchmark JSON into the markdown table of the README."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(provider, median, n, **extra):
    return {
        "name": f"test_op[{n}-{provider}]",
        "params": {"n": n, "provider": provider},
        "stats": {"median": median},
        "extra_info": {"device": "Fake GPU", "torch": "2.x", "triton": "3.x", "cuda": "13.0", **extra},
    }


def test_report_table(tmp_path):
    data = {
        "datetime": "2026-01-01T00:00:00",
        "commit_info": {"id": "0123456789abcdef"},
        "benchmarks": [
            _bench("astrea", 1e-3, 4096, gbps=100.0, pct_bandwidth=50.0, peak_memory_bytes=100),
            _bench("eager", 4e-3, 4096, peak_memory_bytes=400),
            _bench("compile", 2e-3, 4096),
            _bench("astrea-two-ops", 3e-3, 4096),
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "device: Fake GPU" in out and "commit 0123456789" in out
    assert "## test_op" in out
    assert "| n=4096 | 1 ms | 4 ms | 2 ms | 4.00× | 2.00× | 100.0 | 50.0 | – | 0.25× | astrea-two-ops 3 ms (3.00×) |" in out


def test_readme_section_uses_newest_run_per_device(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    for device, run, text in [("cpu-x86_64", "2026-01-01_aaaa", "old"), ("cpu-x86_64", "2026-02-01_bbbb", "new"),
                              ("nvidia-h100", "2026-01-15_cccc", "gpu")]:
        (tmp_path / device / run).mkdir(parents=True)
        (tmp_path / device / run / "report.md").write_text(f"# astrea benchmarks\n\n## test_x\n{text}\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nstale\n{report.README_END}\noutro\n")
    report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "stale" not in text and "old" not in text
    assert "### CPU figures: cpu-x86_64 (2026-02-01_bbbb)" in text and "new" in text
    assert "### GPU figures: nvidia-h100 (2026-01-15_cccc)" in text and "#### test_x" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")


def test_readme_section_orders_runs_of_one_day_by_time(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    # The later run's commit hash sorts first: the run's own datetime must decide.
    for run, when, text in [("2026-03-04_ffff", "2026-03-04T09:00:00", "morning"),
                            ("2026-03-04_0000", "2026-03-04T17:00:00", "evening")]:
        (tmp_path / "cpu-x86_64" / run).mkdir(parents=True)
        (tmp_path / "cpu-x86_64" / run / "report.md").write_text(f"# astrea benchmarks\n\n{text}\n")
        (tmp_path / "cpu-x86_64" / run / "benchmarks.json").write_text(json.dumps({"datetime": when}))
    assert report.latest_reports(tmp_path) == [("cpu-x86_64", tmp_path / "cpu-x86_64" / "2026-03-04_0000" / "report.md")]


def test_store_files_a_run_by_device_and_date(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"datetime": "2026-03-04T05:06:07", "commit_info": {"id": "feedbeef00112233"},
                                "benchmarks": [_bench("astrea", 1e-3, 8, device="NVIDIA H100 80GB HBM3")]}))
    run_dir = report.store([path], tmp_path / "results")
    assert run_dir == tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "2026-03-04_feedbeef00"
    assert json.loads((run_dir / "benchmarks.json").read_text())["benchmarks"][0]["stats"]["median"] == 1e-3
    assert "## test_op" in (run_dir / "report.md").read_text()


def test_case_labels_flatten_dict_params_and_name_dtypes():
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    params = {"mode": "forward", "case": {"tokens": 512, "dtype": "UNSERIALIZABLE[torch.bfloat16]"}, "provider": "eager"}
    assert report._case_label(params) == "mode=forward, tokens=512, dtype=bfloat16"


def test_store_merges_several_files_of_one_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    paths = []
    for name, provider in (("a", "astrea"), ("b", "eager")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"datetime": "2026-03-04T05:06:07", "commit_info": {"id": "feedbeef00112233"},
                                    "benchmarks": [_bench(provider, 1e-3, 8)]}))
        paths.append(path)
    run_dir = report.store(paths, tmp_path / "results")
    kept = json.loads((run_dir / "benchmarks.json").read_text())["benchmarks"]
    assert sorted(b["params"]["provider"] for b in kept) == ["astrea", "eager"]


def test_store_gpu_run_keeps_what_every_finished_phase_wrote(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)
    (out / "phases.json").write_text(json.dumps({"commit": "cafe0123456789", "started": "2026-03-04T05:06:07Z",
                                                 "device": "NVIDIA H200", "torch": "2.11.0",
                                                 "phases": [{"phase": "smoke", "status": "ok"}]}))
    (out / "smoke.json").write_text("[]")
    (out / "tests.log").write_text("\n".join(f"line {i}" for i in range(1000)))
    (out / "bench" / "test_bench_router.json").write_text(json.dumps(
        {"datetime": "2026-03-04T05:10:00", "commit_info": {"id": "cafe0123456789"},
         "benchmarks": [_bench("astrea", 1e-3, 8, device="NVIDIA H200")]}))
    run_dir = report.store_gpu_run(out, tmp_path / "results")
    assert run_dir == tmp_path / "results" / "nvidia-h200" / "2026-03-04_cafe012345"
    assert json.loads((run_dir / "phases.json").read_text())["torch"] == "2.11.0"
    assert (run_dir / "smoke.json").exists() and not (run_dir / "tests.xml").exists()
    tail = (run_dir / "tests.log.tail").read_text().splitlines()
    assert len(tail) == report.LOG_TAIL_LINES and tail[-1] == "line 999"
    assert "## test_op" in (run_dir / "report.md").read_text()
    # A run whose bench phase wrote nothing still keeps its phases.
    (out / "bench" / "test_bench_router.json").unlink()
    (out / "phases.json").write_text(json.dumps({"commit": "0000aaaa", "started": "2026-03-05T00:00:00Z",
                                                 "device": "NVIDIA H200", "phases": []}))
    assert not (report.store_gpu_run(out, tmp_path / "results") / "report.md").exists()


def test_headline_keeps_each_benchmarks_first_case_with_every_provider_and_mode(tmp_path):
    (tmp_path / "test_bench_fake.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('case', [1, 2, 3])\n"
        "@pytest.mark.parametrize('mode', ['forward', 'forward_backward'])\n"
        "@pytest.mark.parametrize('provider', ['astrea', 'eager', 'compile'])\n"
        "def test_a(provider, mode, case): pass\n"
        "@pytest.mark.parametrize('k', [8, 2])\n"
        "@pytest.mark.parametrize('provider', ['astrea', 'eager'])\n"
        "def test_b(provider, k): pass\n")

    def collected(*options):
        result = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "--collect-only", "-q",
                                 "-p", "no:cacheprovider", "-p", "benchmarks.conftest", *options],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        return sorted(line.split("::")[1] for line in result.stdout.splitlines() if "::" in line)

    assert len(collected()) == 18 + 4
    assert collected("--headline") == sorted(
        [f"test_a[{p}-{m}-1]" for p in ("astrea", "eager", "compile") for m in ("forward", "forward_backward")]
        + ["test_b[astrea-8]", "test_b[eager-8]"])
