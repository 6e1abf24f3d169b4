"""Latents Parquet: explicit schema, provenance metadata, deterministic encoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainvae.vae.cohort import make_splits, read_index, select_training
from brainvae.vae.latents import export_latents, latent_schema, read_latents
from synthetic_brains import write_synthetic_cohort
from brainvae.vae.train import config_sha256, train_vae

TINY = {"model": {"latent_dim": 6, "widths": [4, 8]}, "epochs": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latents")
    paths = write_synthetic_cohort(root, 10, shape=(16, 16, 16), seed=1, subjects_with_two_sessions=2)
    index = read_index(paths["index"])
    splits = make_splits(select_training(index), seed=0)
    splits.to_csv(root / "splits.tsv", sep="\t", index=False)
    train_vae(TINY, paths["array"], paths["mask"], paths["index"], root / "splits.tsv",
              root / "model", checkpoint_dir=root / "ckpt", device="cpu", threads=1, progress=False)
    return {**paths, "splits": root / "splits.tsv", "model": root / "model"}


def _export(trained: dict[str, Path], out: Path) -> pa.Table:
    return export_latents(trained["model"], trained["array"], trained["mask"], trained["index"],
                          trained["splits"], out, model_name="demo-vae", device="cpu")


def test_schema_and_metadata(trained: dict[str, Path], tmp_path: Path) -> None:
    _export(trained, tmp_path / "latents.parquet")
    schema = pq.read_schema(tmp_path / "latents.parquet")
    expected = latent_schema(6, ["age", "sex"])
    assert schema.remove_metadata().equals(expected.remove_metadata())
    assert schema.names[:9] == ["dataset", "participant", "session", "run", "scan", "label",
                                "split", "age", "sex"]
    assert schema.field("mu_0").type == pa.float32() and schema.field("logvar_5").type == pa.float32()
    assert schema.field("run").type == pa.string()  # all-empty column keeps its type
    assert schema.field("age").type == pa.float64()

    df, meta = read_latents(tmp_path / "latents.parquet")
    index = read_index(trained["index"])
    assert df["scan"].tolist() == index["scan"].tolist()  # every scan, in array order
    assert df["run"].isna().all() and df["session"].notna().all()
    assert set(df["split"]) <= {"train", "val", "test", "none"}
    assert set(df.loc[df["label"] == "DS", "split"]) == {"none"}  # never trained on
    assert df["ssim_mask"].between(-1, 1).all() and (df["mse_mask"] > 0).all()

    config_text = (trained["model"] / "config.json").read_text()
    assert meta["brainvae.config_sha256"] == config_sha256(json.loads(config_text))
    assert meta["brainvae.checkpoint_sha256"] == hashlib.sha256(
        (trained["model"] / "model.pt").read_bytes()).hexdigest()
    assert meta["brainvae.model_name"] == "demo-vae" and meta["brainvae.version"]
    assert meta["brainvae.latent_dim"] == "6"


def test_encoding_is_deterministic(trained: dict[str, Path], tmp_path: Path) -> None:
    a = _export(trained, tmp_path / "a.parquet")
    b = _export(trained, tmp_path / "b.parquet")
    assert a.equals(b)
    mu = np.stack([a.column(f"mu_{i}").to_numpy() for i in range(6)], axis=1)
    assert np.isfinite(mu).all() and mu.std(axis=0).max() > 0  # scans get different codes


def test_deviation_scores_use_the_models_own_reference_scans(trained: dict[str, Path], tmp_path: Path) -> None:
    from brainvae.deviation import mahalanobis_scores
    from brainvae.vae.latents import deviation_columns

    _export(trained, tmp_path / "latents.parquet")
    df, _meta = read_latents(tmp_path / "latents.parquet")
    mu = df[[f"mu_{i}" for i in range(6)]].to_numpy(np.float64)
    train = (df["split"] == "train").to_numpy()
    np.testing.assert_allclose(df["latent_mahalanobis"], mahalanobis_scores(mu, mu[train]), rtol=1e-6)
    held_out = df["split"].isin(["val", "test"]).to_numpy()
    z = df["recon_error_z"].to_numpy(np.float64)
    assert held_out.sum() >= 2 and abs(z[held_out].mean()) < 1e-9 and abs(z[held_out].std(ddof=1) - 1) < 1e-9
    # Only the reference scans define the reference: moving a scan outside it changes no other scan's score.
    moved = mu.copy()
    outside = np.flatnonzero(~train & ~held_out)[0]
    moved[outside] += 100.0
    errors = df["mse_mask"].to_numpy().copy()
    errors[outside] *= 10
    again = deviation_columns(moved, errors.tolist(), df["split"].tolist())
    others = np.arange(len(df)) != outside
    np.testing.assert_allclose(np.array(again["latent_mahalanobis"])[others], df["latent_mahalanobis"][others])
    np.testing.assert_allclose(np.array(again["recon_error_z"], dtype=float)[others], z[others])
    assert again["latent_mahalanobis"][outside] > 10 * df["latent_mahalanobis"][others].max()
    # Without two reference scans the scores are null, not made up.
    none = deviation_columns(mu, errors.tolist(), ["none"] * len(df))
    assert none["latent_mahalanobis"] == [None] * len(df) and none["recon_error_z"] == [None] * len(df)
