"""benchmarks/report.py turns pytest-benchmark JSON into the markdown table of the README."""

import json
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
    run_dir = report.store(path, tmp_path / "results")
    assert run_dir == tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "2026-03-04_feedbeef00"
    assert json.loads((run_dir / "benchmarks.json").read_text())["benchmarks"][0]["stats"]["median"] == 1e-3
    assert "## test_op" in (run_dir / "report.md").read_text()


def test_case_labels_flatten_dict_params_and_name_dtypes():
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    params = {"mode": "forward", "case": {"tokens": 512, "dtype": "UNSERIALIZABLE[torch.bfloat16]"}, "provider": "eager"}
    assert report._case_label(params) == "mode=forward, tokens=512, dtype=bfloat16"
