"""Killed (SIGKILL) training resumes from its last checkpoint and ends bitwise-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from brainvae.vae.cohort import make_splits, read_index
from synthetic_brains import write_synthetic_cohort
from brainvae.vae.train import CHECKPOINT_NAME, train_vae

TINY = {"model": {"latent_dim": 8, "widths": [4, 8], "blocks": 1}, "epochs": 5, "batch_size": 2,
        "lr": 3e-3, "warmup_epochs": 1, "beta_warmup_epochs": 2, "patience": 100, "seed": 7}

# The child trains in a fresh process; after epoch `kill_after` is checkpointed it writes a marker
# and sleeps, and the test SIGKILLs it there: no chance to clean up, exactly like an OOM kill.
CHILD = r"""
import json, sys, time
from pathlib import Path
from brainvae.vae.train import train_vae
data, out, ckpt, kill_after, cfg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])

def on_epoch_end(epoch, row):
    if epoch == kill_after:
        Path(out + ".ready").write_text(str(epoch))
        time.sleep(120)

train_vae(cfg, f"{data}/cohort.npy", f"{data}/cohort_mask.npy", f"{data}/cohort_index.tsv",
          f"{data}/splits.tsv", out, checkpoint_dir=ckpt, device="cpu", deterministic=True,
          threads=1, progress=False, on_epoch_end=on_epoch_end)
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("cohort")
    paths = write_synthetic_cohort(data, 12, shape=(16, 16, 16), seed=3)
    index = read_index(paths["index"])
    make_splits(index, seed=1).to_csv(data / "splits.tsv", sep="\t", index=False)
    return data


def _child(script: Path, data: Path, out: Path, ckpt: Path, kill_after: int, cfg: dict) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(data), str(out), str(ckpt),
                             str(kill_after), json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


def test_sigkill_resume_matches_uninterrupted_run(cohort: Path, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    ref = _child(script, cohort, tmp_path / "ref", tmp_path / "ref_ckpt", 0, TINY)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    run, ckpt = tmp_path / "run", tmp_path / "run_ckpt"
    victim = _child(script, cohort, run, ckpt, 2, TINY)
    marker = Path(f"{run}.ready")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "child never reached epoch 2"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "model.pt").exists()  # killed before the end: no final outputs
    saved = torch.load(ckpt / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2

    again = _child(script, cohort, run, ckpt, 0, TINY)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out

    log = pd.read_csv(run / "training_log.tsv", sep="\t")
    assert log["epoch"].tolist() == [1, 2, 3, 4, 5]
    # Epochs 1-2 come from the killed process (session 1), 3-5 from the resumed one: it
    # started at epoch 3, not 0.
    assert log["session"].tolist() == [1, 1, 2, 2, 2]
    ref_log = pd.read_csv(tmp_path / "ref" / "training_log.tsv", sep="\t")
    assert ref_log["session"].tolist() == [1] * 5
    pd.testing.assert_series_equal(log["train_loss"], ref_log["train_loss"])

    # Bitwise: same seed, CPU, one thread, deterministic algorithms; every RNG and the
    # optimiser/scheduler state are restored, and the batch order is seeded per epoch.
    a, b = _state(tmp_path / "ref"), _state(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((run / "metrics.json").read_text())["sessions"] == 2


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_resume_after_crash_in_process(cohort: Path, tmp_path: Path, schedule: str) -> None:
    cfg = dict(TINY, epochs=3, schedule=schedule)
    args = (f"{cohort}/cohort.npy", f"{cohort}/cohort_mask.npy", f"{cohort}/cohort_index.tsv",
            f"{cohort}/splits.tsv")
    kw = dict(device="cpu", deterministic=True, threads=1, progress=False)
    train_vae(cfg, *args, tmp_path / "ref", checkpoint_dir=tmp_path / "ref_ckpt", **kw)

    def crash(epoch: int, row: dict) -> None:
        if epoch == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        train_vae(cfg, *args, tmp_path / "run", checkpoint_dir=tmp_path / "ck", on_epoch_end=crash, **kw)
    metrics = train_vae(cfg, *args, tmp_path / "run", checkpoint_dir=tmp_path / "ck", **kw)
    assert metrics["sessions"] == 2
    a, b = _state(tmp_path / "ref"), _state(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_config_ignores_stale_checkpoint(cohort: Path, tmp_path: Path) -> None:
    args = (f"{cohort}/cohort.npy", f"{cohort}/cohort_mask.npy", f"{cohort}/cohort_index.tsv",
            f"{cohort}/splits.tsv")
    kw = dict(device="cpu", threads=1, progress=False, checkpoint_dir=tmp_path / "ck")
    train_vae(dict(TINY, epochs=2), *args, tmp_path / "a", **kw)
    metrics = train_vae(dict(TINY, epochs=2, lr=1e-3), *args, tmp_path / "b", **kw)
    assert metrics["sessions"] == 1  # started afresh, not resumed from the other config
    log = pd.read_csv(tmp_path / "b" / "training_log.tsv", sep="\t")
    assert log["session"].tolist() == [1, 1]
    # A rerun of a finished training resumes at its end and trains nothing more.
    metrics = train_vae(dict(TINY, epochs=2, lr=1e-3), *args, tmp_path / "c", **kw)
    assert metrics["sessions"] == 1 and metrics["epochs_run"] == 2
    for name in ("model.pt", "config.json", "environment.txt", "metrics.json",
                 "training_log.tsv", "training_curves.png"):
        assert (tmp_path / "c" / name).stat().st_size > 0


def test_global_torch_settings_are_restored(cohort: Path, tmp_path: Path) -> None:
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    train_vae(dict(TINY, epochs=1), f"{cohort}/cohort.npy", f"{cohort}/cohort_mask.npy",
              f"{cohort}/cohort_index.tsv", f"{cohort}/splits.tsv", tmp_path / "m",
              checkpoint_dir=tmp_path / "ck", device="cpu", deterministic=not before[1],
              threads=before[0] + 1, progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
