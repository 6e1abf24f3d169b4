"""The VAE family (brainvae.vae.nn / optim / trainer): every variant learns, the KL warm-up starts at 0,
a perceptual term without local weights fails at start-up, adversarial training resumes exactly with
both optimisers, spatial latents are exported flattened in C order, and the diagnostics flag a
collapsed posterior."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from brainvae.vae.cohort import make_splits, read_index
from brainvae.vae.config import resolve_config
from brainvae.vae.diagnostics import summarise_latents
from brainvae.vae.evaluate import evaluate_vae
from brainvae.vae.latents import export_latents, read_latents
from brainvae.vae.nn import build_model, load_model
from brainvae.vae.nn.losses import PerceptualLoss
from brainvae.vae.nn.spatial import fold, unfold
from brainvae.vae.optim import beta_at
from synthetic_brains import synthetic_brains, write_synthetic_cohort
from brainvae.vae.trainer import CHECKPOINT_NAME, Trainer, train_vae

SHAPE = (16, 16, 16)
DENSE = {"model": {"latent_dim": 4, "widths": [4, 8]}}
SPATIAL = {"architecture": "spatial", "spatial": {"downsample": 4, "patch": 2, "channels": [8, 16]}}
VARIANTS = {
    "dense": DENSE,
    "spatial": SPATIAL,
    "dense_adversarial": {**DENSE, "adversarial_weight": 0.005, "adversarial_start_epoch": 1},
    "spatial_adversarial": {**SPATIAL, "adversarial_weight": 0.005, "adversarial_start_epoch": 1},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = tmp_path_factory.mktemp("family")
    paths = write_synthetic_cohort(data, 12, shape=SHAPE, seed=3)
    index = read_index(paths["index"])
    return {**paths, "index_df": index, "splits": make_splits(index, seed=1), "dir": data}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_trains_a_few_steps_and_lowers_its_loss(name: str) -> None:
    torch.manual_seed(0)
    vols, masks = synthetic_brains(4, SHAPE, seed=0)
    x = torch.from_numpy(vols).unsqueeze(1)
    m = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    cfg = resolve_config({**VARIANTS[name], "lr": 3e-3, "warmup_epochs": 0, "center": False}, SHAPE)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=1, mean_image=None)
    recon = [float(trainer.step(x, m, beta=0.0, epoch=1)["recon"]) for _ in range(12)]
    assert recon[-1] < 0.8 * recon[0], recon
    if "adversarial" in name:
        terms = trainer.step(x, m, beta=0.0, epoch=1)
        assert {"adv", "disc"} <= set(terms) and trainer.opt_d is not None


def test_kl_warmup_starts_at_zero(cohort: dict, tmp_path: Path) -> None:
    cfg = {"beta": 0.1, "beta_warmup_epochs": 2}
    assert beta_at(1, cfg, 0, 5) == 0.0  # the very first step
    assert 0.0 < beta_at(1, cfg, 1, 5) < beta_at(2, cfg, 0, 5) < 0.1
    assert beta_at(3, cfg, 0, 5) == beta_at(9, cfg, 4, 5) == 0.1
    assert beta_at(1, {"beta": 0.1, "beta_warmup_epochs": 0}, 0, 5) == 0.1
    train_vae({**DENSE, "epochs": 3, "beta": 0.1, "beta_warmup_epochs": 2}, cohort["array"], cohort["mask"],
              cohort["index_df"], cohort["splits"], tmp_path / "m", checkpoint_dir=tmp_path / "ck", device="cpu",
              threads=1, progress=False)
    log = pd.read_csv(tmp_path / "m" / "training_log.tsv", sep="\t")
    assert log["beta"].iloc[0] == 0.0 and log["beta"].is_monotonic_increasing


def test_perceptual_without_weights_fails_at_startup(cohort: dict, tmp_path: Path) -> None:
    msg = "perceptual_weight > 0 needs perceptual_weights"
    with pytest.raises(ValueError, match=msg):
        resolve_config({"perceptual_weight": 0.1}, SHAPE)
    with pytest.raises(ValueError, match=msg):
        train_vae({**DENSE, "perceptual_weight": 0.1}, cohort["array"], cohort["mask"], cohort["index_df"],
                  cohort["splits"], tmp_path / "m", checkpoint_dir=tmp_path / "ck", device="cpu", progress=False)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "m").exists()  # nothing ran
    with pytest.raises(ValueError, match="is not a file"):
        resolve_config({"perceptual_weight": 0.1, "perceptual_weights": str(tmp_path / "missing.pth")}, SHAPE)


def test_perceptual_term_with_local_weights(tmp_path: Path) -> None:
    from monai.networks.nets import resnet10

    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                   bias_downsample=False, conv1_t_stride=2)
    weights = tmp_path / "resnet10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, weights)  # MedicalNet layout
    loss = PerceptualLoss(weights)
    x = torch.rand(1, 1, *SHAPE)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x + 0.5 * torch.rand_like(x), x)) > 0
    cfg = resolve_config({**DENSE, "perceptual_weight": 0.1, "perceptual_weights": str(weights)}, SHAPE)
    trainer = Trainer(cfg, torch.device("cpu"), steps_per_epoch=1, mean_image=None)
    assert "perceptual" in trainer.step(x, torch.ones_like(x), beta=0.0, epoch=1)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


def test_adversarial_training_resumes_from_a_checkpoint_with_both_optimisers(cohort: dict, tmp_path: Path) -> None:
    cfg = {**DENSE, "epochs": 3, "adversarial_weight": 0.05, "adversarial_start_epoch": 2, "patience": 100,
           "seed": 5}
    args = (cohort["array"], cohort["mask"], cohort["index_df"], cohort["splits"])
    train_vae(cfg, *args, tmp_path / "ref", checkpoint_dir=tmp_path / "ref_ck", device="cpu", deterministic=True,
              threads=1, progress=False)

    class Stop(Exception):
        pass

    def stop_after_2(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise Stop

    ckpt_dir = tmp_path / "run_ck"
    with pytest.raises(Stop):
        train_vae(cfg, *args, tmp_path / "run", checkpoint_dir=ckpt_dir, device="cpu", deterministic=True,
                  threads=1, progress=False, on_epoch_end=stop_after_2)
    ckpt = torch.load(ckpt_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
    assert ckpt["discriminator"] and ckpt["optimizer_d"]["state"]  # the discriminator has trained
    assert ckpt["optimizer"]["state"]
    metrics = train_vae(cfg, *args, tmp_path / "run", checkpoint_dir=ckpt_dir, device="cpu", deterministic=True,
                        threads=1, progress=False)
    assert metrics["sessions"] == 2
    ref, run = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert ref.keys() == run.keys() and all(torch.equal(ref[k], run[k]) for k in ref)
    log = pd.read_csv(tmp_path / "run" / "training_log.tsv", sep="\t")
    assert log["train_adv"].isna().tolist() == [True, False, False]  # the term starts at its epoch


def test_spatial_model_evaluates_and_exports_flattened_latents(cohort: dict, tmp_path: Path) -> None:
    model_dir = tmp_path / "spatial"
    metrics = train_vae({**SPATIAL, "epochs": 1}, cohort["array"], cohort["mask"], cohort["index_df"],
                        cohort["splits"], model_dir, checkpoint_dir=tmp_path / "ck", device="cpu", threads=1,
                        progress=False)
    assert metrics["architecture"] == "spatial" and metrics["latent_shape"] == [2, 4, 4, 4]
    result = evaluate_vae(model_dir, cohort["array"], cohort["mask"], cohort["index_df"], cohort["splits"],
                          tmp_path / "eval", device="cpu", n_boot=20)
    assert {"vae", "pca", "mean_image"} <= set(result["summary"]["method"])
    diag = json.loads((tmp_path / "eval" / "diagnostics.json").read_text())
    assert diag["latent_dim"] == 128 and 0 <= diag["active_units"] <= 128
    assert len(pd.read_csv(tmp_path / "eval" / "kl_per_dimension.tsv", sep="\t")) == 128

    out = tmp_path / "latents.parquet"
    export_latents(model_dir, cohort["array"], cohort["mask"], cohort["index_df"], cohort["splits"], out,
                   device="cpu")
    table, meta = read_latents(out)
    assert meta["brainvae.architecture"] == "spatial" and json.loads(meta["brainvae.latent_shape"]) == [2, 4, 4, 4]
    mu_cols = [c for c in table.columns if c.startswith("mu_")]
    assert len(mu_cols) == 128
    model = load_model(model_dir)
    x = torch.from_numpy(np.load(cohort["array"])[:1]).float().unsqueeze(1)
    with torch.no_grad():
        mu = model.encode(x)[0][0]  # (C, x, y, z)
    row = table.iloc[0]  # row 0 of the cohort array (the table is in row order)
    c, i, j, k = 1, 2, 3, 1
    assert row[f"mu_{((c * 4 + i) * 4 + j) * 4 + k}"] == pytest.approx(float(mu[c, i, j, k]), abs=1e-6)


def test_fold_and_unfold_are_inverse() -> None:
    x = torch.randn(2, 1, 8, 12, 4)
    folded = fold(x, 2)
    assert folded.shape == (2, 8, 4, 6, 2)
    assert torch.equal(unfold(folded, 2), x)
    assert torch.equal(folded[0, :, 0, 0, 0], x[0, 0, :2, :2, :2].reshape(-1))  # a 2x2x2 block -> channels


def test_build_model_from_config_dicts() -> None:
    dense = build_model(resolve_config(DENSE, SHAPE)["model"])
    spatial = build_model(resolve_config(SPATIAL, SHAPE)["model"])
    assert dense.latent_shape == (4,) and spatial.latent_shape == (2, 4, 4, 4)
    x = torch.zeros(1, 1, *SHAPE)
    for model in (dense, spatial):
        recon, mu, logvar = model.eval()(x)
        assert recon.shape == x.shape and mu.shape == logvar.shape == (1, *model.latent_shape)
        assert torch.equal(recon, x)  # the head starts at zero: the mean image (here 0) exactly


def test_diagnostics_flag_posterior_collapse() -> None:
    rng = np.random.default_rng(0)
    collapsed = summarise_latents(np.zeros((20, 8)) + 1e-3 * rng.standard_normal((20, 8)), np.zeros((20, 8)))
    assert collapsed["posterior_collapse"] and collapsed["active_units"] == 0 and "posterior collapse" in collapsed["warning"]
    healthy = summarise_latents(rng.standard_normal((20, 8)), np.full((20, 8), -2.0))
    assert not healthy["posterior_collapse"] and healthy["active_units"] == 8 and healthy["warning"] is None
    assert healthy["kl_per_dim_mean"] > 0.1


def test_workflow_refuses_a_perceptual_term_without_weights_before_any_job(tmp_path: Path) -> None:
    from test_workflow import REPO, snakemake

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"] = {"vae_perceptual": {"perceptual_weight": 0.1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, path, "--dry-run", check=False)
    assert result.returncode != 0
    assert "models.vae_perceptual: perceptual_weight > 0 needs perceptual_weights" in result.stdout + result.stderr
