"""Training on several processes (DDP over gloo on CPU), mixed precision, gradient accumulation, the global-batch
sampler, device checks at start-up and the GPU resources a training job asks for."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from brainvae.runtime import DeviceError, device_problems, resolve_device
from brainvae.vae.cohort import read_index
from brainvae.vae.config import resolve_config
from brainvae.vae.trainer import Trainer, train_vae, train_vae_parallel
from brainvae.vae.trainer.distributed import GlobalBatchSampler, launch_command
from brainvae.vae.trainer.loop import precision
from brainvae.vae.variants import gpus_per_node, run_problems, training_processes
from synthetic_brains import write_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": {"latent_dim": 8, "widths": [4, 8], "blocks": 0}, "epochs": 3, "batch_size": 4,
        "lr": 3e-3, "warmup_epochs": 1, "beta_warmup_epochs": 1, "patience": 100, "seed": 5}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 volumes of 16^3: 8 train (two global batches of 4), 4 val, 4 test."""
    data = tmp_path_factory.mktemp("cohort")
    paths = write_synthetic_cohort(data, 16, shape=(16, 16, 16), seed=11)
    index = read_index(paths["index"])
    split = ["train"] * 8 + ["val"] * 4 + ["test"] * 4
    pd.DataFrame({"scan": index["scan"], "split": split}).to_csv(data / "splits.tsv", sep="\t", index=False)
    return data


def _train(cohort: Path, out: Path, config: dict, **options) -> tuple[dict, pd.DataFrame]:
    metrics = train_vae_parallel(config, cohort / "cohort.npy", cohort / "cohort_mask.npy", cohort / "cohort_index.tsv",
                                 cohort / "splits.tsv", out, checkpoint_dir=out.parent / f"{out.name}.ckpt",
                                 device="cpu", threads=1, progress=False, **options)
    return metrics, pd.read_csv(out / "training_log.tsv", sep="\t")


# ------------------------------------------------------------------------------------------------ the sampler
@pytest.mark.parametrize(("n", "batch", "world"), [(8, 4, 2), (10, 4, 2), (9, 3, 3), (7, 4, 1)])
def test_global_batches_are_split_over_the_ranks_without_overlap(n: int, batch: int, world: int) -> None:
    samplers = [GlobalBatchSampler(n, batch, shuffle=True, seed=3, rank=r, world_size=world) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(2)
    reference = samplers[0].global_batches()
    per_rank = [list(s) for s in samplers]
    for b, global_batch in enumerate(reference):
        parts = [per_rank[r][b] for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(global_batch)  # every scan once, on one rank
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    assert all(len(s) == len(reference) for s in samplers)
    # One process sees the same permutation, every batch whole; a last batch smaller than the world is left out.
    single = GlobalBatchSampler(n, batch, shuffle=True, seed=3)
    single.set_epoch(2)
    whole = single.global_batches()
    assert reference == [b for b in whole if len(b) >= world]
    assert sum(map(len, whole)) == n
    other = GlobalBatchSampler(n, batch, shuffle=True, seed=3)
    other.set_epoch(3)
    assert n < 4 or other.order() != single.order()  # a new order every epoch


def test_a_global_batch_smaller_than_the_number_of_processes_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the number of processes"):
        GlobalBatchSampler(8, 1, shuffle=True, seed=0, rank=0, world_size=2)


# ------------------------------------------------------------------------------------------------ DDP on CPU
def test_two_gloo_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(cohort: Path, tmp_path: Path):
    one, log_one = _train(cohort, tmp_path / "one", TINY)
    two, log_two = _train(cohort, tmp_path / "two", TINY, processes_per_node=2)
    other, log_other = _train(cohort, tmp_path / "other_seed", {**TINY, "seed": 6})
    assert one["processes"] == 1 and two["processes"] == 2 and two["n_train"] == 8
    assert len(log_one) == len(log_two) == TINY["epochs"]
    curve = ["train_loss", "val_loss", "val_recon"]
    gap = (log_two[curve] - log_one[curve]).abs().to_numpy()
    # The processes draw their own reparameterisation noise, so the curves agree within a tolerance; that
    # tolerance is far below what a different initialisation (another seed) changes.
    seed_gap = (log_other[curve] - log_one[curve]).abs().to_numpy()
    assert np.all(gap <= 0.05 * log_one[curve].abs().to_numpy()), (log_one[curve], log_two[curve])
    assert gap.mean() < 0.25 * seed_gap.mean(), (gap, seed_gap)
    # Rank 0 wrote the outputs; the model loads.
    state = torch.load(tmp_path / "two" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ one step
def _trainer(cohort: Path, overrides: dict, *, deterministic_noise: bool = True) -> Trainer:
    cfg = resolve_config({**TINY, **overrides}, (16, 16, 16))
    torch.manual_seed(0)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=1, mean_image=None)
    if deterministic_noise:  # z = mu: the comparison below is exact, not up to sampling noise
        trainer.model.reparameterize = lambda mu, logvar: mu
    return trainer


def _volumes(cohort: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.load(cohort / "cohort.npy")[:n].astype(np.float32)).unsqueeze(1)
    m = torch.from_numpy(np.load(cohort / "cohort_mask.npy")[:n].astype(np.float32)).unsqueeze(1)
    return x, m


def test_gradient_accumulation_steps_like_the_larger_batch(cohort: Path) -> None:
    x, m = _volumes(cohort, 4)
    whole = _trainer(cohort, {"batch_size": 4})
    whole.run_epoch([(x, m)], epoch=2, train=True, global_sizes=[4])
    accumulated = _trainer(cohort, {"batch_size": 2, "accumulate_steps": 2})
    accumulated.run_epoch([(x[:2], m[:2]), (x[2:], m[2:])], epoch=2, train=True, global_sizes=[2, 2])
    plain = _trainer(cohort, {"batch_size": 2})
    plain.run_epoch([(x[:2], m[:2]), (x[2:], m[2:])], epoch=2, train=True, global_sizes=[2, 2])
    a, b, c = (t.model.state_dict() for t in (whole, accumulated, plain))
    moved = max(float((a[k] - c[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 1e-4  # two optimiser steps differ from one
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6)


def test_mixed_precision_settings() -> None:
    cpu = torch.device("cpu")
    assert precision("auto", cpu) == (None, False)
    assert precision(False, cpu) == (None, False)
    assert precision(True, cpu) == (torch.bfloat16, False)
    assert precision("float16", cpu) == (torch.float16, True)
    assert precision("bfloat16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="amp must be"):
        precision("fp8", cpu)


def test_bf16_autocast_on_cpu_trains_close_to_float32(cohort: Path) -> None:
    x, m = _volumes(cohort, 4)
    full = _trainer(cohort, {"amp": False})
    half = _trainer(cohort, {"amp": True})
    assert half.amp_dtype == torch.bfloat16 and full.amp_dtype is None
    with half._autocast():
        recon, _mu, _logvar = half.model(x)
    assert recon.dtype == torch.bfloat16  # the convolutions ran in bf16
    before = {k: v.clone() for k, v in half.model.state_dict().items()}
    loss_full = full.run_epoch([(x, m)], epoch=2, train=True, global_sizes=[4])["loss"]
    loss_half = half.run_epoch([(x, m)], epoch=2, train=True, global_sizes=[4])["loss"]
    assert math.isfinite(loss_half) and abs(loss_half - loss_full) <= 0.05 * abs(loss_full)
    after = half.model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # master weights fp32
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_float16_uses_a_gradient_scaler(cohort: Path) -> None:
    x, m = _volumes(cohort, 2)
    trainer = _trainer(cohort, {"amp": "float16", "batch_size": 2})
    assert trainer.scaler.is_enabled()
    loss = trainer.run_epoch([(x, m)], epoch=2, train=True, global_sizes=[2])["loss"]
    assert math.isfinite(loss)
    assert trainer.scaler.get_scale() > 0
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


def test_cache_on_device_trains_like_the_data_loader(cohort: Path, tmp_path: Path) -> None:
    config = {**TINY, "epochs": 2}
    loader, log_loader = _train(cohort, tmp_path / "loader", {**config, "cache_on_device": False},
                                deterministic=True)
    cached, log_cached = _train(cohort, tmp_path / "cached", {**config, "cache_on_device": True},
                                deterministic=True)
    assert cached["cache_on_device"] and not loader["cache_on_device"]
    pd.testing.assert_frame_equal(log_loader[["train_loss", "val_loss"]], log_cached[["train_loss", "val_loss"]])
    assert log_loader["loader_wait_fraction"].between(0, 1).all()


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_with_a_clear_message() -> None:
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    problems = device_problems({"model vae_big": ("cuda", 1), "model vae_cpu": ("auto", 0)})
    assert len(problems) == 1 and problems[0].startswith("model vae_big:") and "no usable CUDA GPU" in problems[0]


def test_device_problems_do_not_start_torch_without_a_cuda_request() -> None:
    assert device_problems({"a": ("auto", 2), "b": ("cpu", 0)}, python="/nonexistent/python") == []


def test_gpus_and_nodes_of_the_run_options() -> None:
    assert gpus_per_node({"device": "cuda", "gpus": "auto"}) == 1
    assert gpus_per_node({"device": "auto", "gpus": "auto"}) == 0
    assert training_processes({"device": "auto", "gpus": 4, "nodes": 2}) == (4, 2)
    assert training_processes({"device": "cpu", "gpus": "auto", "nodes": 1}) == (1, 1)
    assert run_problems({"device": "cpu", "gpus": 2, "nodes": 1})
    assert run_problems({"device": "auto", "gpus": 0, "nodes": 2})
    assert run_problems({"device": "cuda:1", "gpus": 2, "nodes": 1})
    assert run_problems({"device": "cuda", "gpus": 2, "nodes": 2}) == []


def test_launch_commands() -> None:
    one = launch_command(["brainvae.vae.trainer.launch", "a.json"], processes_per_node=2, python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m",
                   "brainvae.vae.trainer.launch", "a.json"]
    many = launch_command(["m"], processes_per_node=4, nodes=3, port=29999, python="py")
    assert many[0] == "srun" and "--nodes=3" in many and "--ntasks-per-node=1" in many and "--nnodes=3" in many
    assert "--nproc-per-node=4" in many and any(a.startswith("--rdzv-endpoint=") and a.endswith(":29999")
                                                   for a in many)


# ------------------------------------------------------------------------------------------------ the workflow
def _config(tmp_path: Path, **training) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["training"].update(training)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _dry_run(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(config), "--cores", "8", "--dry-run"],
                          capture_output=True, text=True, timeout=600)


def test_training_jobs_ask_for_the_gpus_cpus_and_memory_of_every_process(tmp_path: Path) -> None:
    result = _dry_run(tmp_path, _config(tmp_path, gpus=2, threads=3))
    assert result.returncode == 0, result.stderr
    blocks = (result.stdout + result.stderr).split("rule ")
    train = [b for b in blocks if b.startswith("train_vae:")]
    assert train
    for block in train:
        resources = next(line for line in block.splitlines() if "resources:" in line)
        assert "gpu=2" in resources and "cpus_per_gpu=3" in resources and "tasks_per_gpu=0" in resources
        assert "mem_mb=16000" in resources and "nodes=1" in resources
        assert "threads: 6" in block  # 3 threads for each of the 2 processes
    evaluate = [b for b in blocks if b.startswith("evaluate_vae:")]
    assert evaluate and all("gpu=1" in b for b in evaluate)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_stops_the_workflow_before_its_first_job(tmp_path: Path) -> None:
    config = _config(tmp_path, device="cuda")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                             str(tmp_path), "--configfile", str(config), "--cores", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "asks for GPUs this machine does not have" in output and "no usable CUDA GPU" in output
    assert "model vae_dense (training.device)" in output
    assert not (tmp_path / "results" / "demo_cohort").exists()  # no job ran, not even the first


def test_contradicting_gpu_settings_are_refused_at_start_up(tmp_path: Path) -> None:
    result = _dry_run(tmp_path, _config(tmp_path, device="cpu", gpus=2))
    assert result.returncode != 0 and "gpus is 2 but device is cpu" in result.stdout + result.stderr


def test_skull_stripping_asks_for_a_gpu_only_when_declared(tmp_path: Path) -> None:
    def skullstrip_resources(device: str) -> list[str]:
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config["preprocess"]["skullstrip"]["device"] = device
        path = tmp_path / f"config_{device}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = _dry_run(tmp_path / device, path)
        assert result.returncode == 0, result.stderr
        blocks = (result.stdout + result.stderr).split("rule ")
        return [next(line for line in b.splitlines() if "resources:" in line)
                for b in blocks if b.startswith("skullstrip:")]

    declared, default = skullstrip_resources("cuda"), skullstrip_resources("auto")
    assert declared and all("gpu=1" in line for line in declared)
    assert default and all("gpu=0" in line or "gpu=" not in line for line in default)


def test_cuda_problem_names_what_is_missing() -> None:
    from brainvae.runtime import cuda_problem

    assert "no usable CUDA GPU" in cuda_problem("cuda", 1, 0, "torch x, a CPU-only build")
    assert "only 2 CUDA GPU(s) are visible" in cuda_problem("cuda:2", 1, 2, "torch x")
    assert "4 GPUs were asked for" in cuda_problem("cuda", 4, 2, "torch x")
    assert cuda_problem("cuda:1", 1, 2, "torch x") is None and cuda_problem("cuda", 2, 2, "torch x") is None
