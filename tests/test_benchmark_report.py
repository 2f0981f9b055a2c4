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
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "device: Fake GPU" in out and "commit 0123456789" in out
    assert "## test_op" in out
    assert "| n=4096 | 1 ms | 4 ms | 2 ms | 4.00× | 2.00× | 100.0 | 50.0 | – | 0.25× |" in out
