"""benchmarks/bench_memory.py runs end to end in its small mode and writes the JSON it documents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"evaluate_pca", "evaluate_pca_before", "voxel_matrix", "voxel_features", "voxel_features_subset",
          "voxel_pca_report", "normative_group_map", "normative_group_map_before"}


def test_bench_memory_small_mode_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--scans", "12",
                           "--shape", "20", "24", "20", "--test", "3", "--tmp", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"command", "scans", "shape", "cohort_array_bytes", "goal_mib", "stages", "peak_over_array"} <= set(result)
    assert result["scans"] == 12 and result["shape"] == [20, 24, 20]
    assert result["cohort_array_bytes"] >= 12 * 20 * 24 * 20 * 4
    assert set(result["stages"]) == STAGES
    for stage in result["stages"].values():
        assert stage["peak_rss_mib"] >= stage["baseline_rss_mib"] > 0 and stage["wall_s"] >= 0
    pca = result["stages"]["evaluate_pca"]
    assert pca["train_rows"] == 8 and pca["test_rows"] == 3 and 1 <= pca["components"] <= 8
    assert result["stages"]["voxel_features"]["row_space_shape"][0] == 12
    assert result["stages"]["voxel_features_subset"]["copied"] is True
    for stage in ("normative_group_map", "normative_group_map_before"):
        assert result["stages"][stage]["permutations"] == 100 and result["stages"][stage]["scans"] == 12
    assert not list(tmp_path.glob("bench_memory_*"))  # the temporary cohort is deleted
