"""The GPU training benchmark's CPU mode: a tiny grid, one process and two (DDP over gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_gpu_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / "train_cpu.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_gpu.py"), "--device", "cpu",
                          "--shape", "16", "16", "16", "--scans", "10", "--epochs", "2", "--batch", "4",
                          "--variants", "dense", "spatial_small", "--processes", "1", "2", "--threads", "1",
                          "--config", '{"model": {"widths": [4, 8]}, "spatial": {"channels": "auto"}}',
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["command"].startswith("python ")
    rows = result["rows"]
    assert {(r["variant"], r["processes"]) for r in rows} == {("dense", 1), ("dense", 2), ("spatial_small", 1),
                                                              ("spatial_small", 2)}
    for row in rows:
        assert row["volumes_per_s"] > 0 and 0 <= row["loader_wait_fraction"] <= 1
        assert row["gpu_util"] is None and row["peak_gpu_memory_mb"] is None  # CPU: no GPU figures
        assert (row["scaling_efficiency"] is None) == (row["processes"] == 1)
        assert row["n_train"] == 9
