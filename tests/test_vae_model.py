"""VAE architecture: shapes on the named grids, options, loss terms."""

from __future__ import annotations

import pytest
import torch

from brainvae.vae.model import VAE, VAEConfig, kl_divergence, to_channels_last_3d, vae_loss

NORM_LAYERS = {"group": torch.nn.GroupNorm, "batch": torch.nn.BatchNorm3d, "instance": torch.nn.InstanceNorm3d,
               "none": None}
ACTIVATION_LAYERS = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU, "leaky_relu": torch.nn.LeakyReLU,
                     "gelu": torch.nn.GELU}


@pytest.mark.parametrize(("shape", "widths"), [((40, 48, 40), (4, 8, 8)),  # demo grid, 3 levels
                                               ((16, 24, 16), (4, 8)),
                                               ((32, 32, 48), (2, 4, 4, 8))])
def test_output_shape_matches_input(shape: tuple[int, int, int], widths: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(in_shape=shape, widths=widths, latent_dim=5))
    x = torch.randn(2, 1, *shape)
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 5)
    assert model.decode(torch.zeros(3, 5)).shape == (3, 1, *shape)


def test_bottleneck_of_named_grids() -> None:
    assert VAEConfig(in_shape=(80, 96, 80), widths=(8, 16, 32, 64)).bottleneck_shape == (5, 6, 5)
    assert VAEConfig(in_shape=(160, 192, 160), widths=(8,) * 5).bottleneck_shape == (5, 6, 5)


def test_indivisible_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        VAEConfig(in_shape=(40, 48, 40), widths=(8, 16, 32, 64))  # 40 / 16 is not an integer


@pytest.mark.parametrize("norm", ["group", "batch", "instance", "none"])
@pytest.mark.parametrize("activation", ["silu", "relu", "leaky_relu", "gelu"])
def test_norms_and_activations(norm: str, activation: str) -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(in_shape=(16, 16, 16), widths=(4, 8), latent_dim=3, norm=norm,
                          activation=activation, blocks=2))
    # The options must reach the layers: a finite loss alone also holds when they are ignored.
    layer_types = {type(module) for module in model.modules()}
    chosen_norm, other_norms = NORM_LAYERS[norm], set(NORM_LAYERS.values()) - {NORM_LAYERS[norm]}
    assert chosen_norm is None or chosen_norm in layer_types
    assert not layer_types & (other_norms - {None})
    activations = [m for m in model.modules() if isinstance(m, tuple(ACTIVATION_LAYERS.values()))]
    assert activations and all(type(m) is ACTIVATION_LAYERS[activation] for m in activations)
    if activation == "leaky_relu":
        assert all(m.negative_slope == pytest.approx(0.2) for m in activations)
    # Convolutions carry a bias only where no norm layer follows to absorb it.
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert all((m.bias is not None) == (norm == "none") for m in convs[:-1])  # the head always has one
    x = torch.randn(2, 1, 16, 16, 16)
    recon, mu, logvar = model(x)
    loss, _, _ = vae_loss(recon, x, mu, logvar, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    head = model.decoder[-1]
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0  # gradients reach the output layer
    with pytest.raises(ValueError, match="norm must be one of"):
        VAEConfig(norm="layer")
    with pytest.raises(ValueError, match="activation must be one of"):
        VAEConfig(activation="tanh")


def test_eval_mode_is_deterministic_and_uses_mu() -> None:
    model = VAE(VAEConfig(in_shape=(16, 16, 16), widths=(4, 8), latent_dim=3)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        a, mu, _ = model(x)
        b, _, _ = model(x)
        assert torch.equal(a, b) and torch.equal(a, model.decode(mu))


def test_channels_last_3d_gives_same_result() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(in_shape=(16, 16, 16), widths=(4, 8), latent_dim=3)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref = model(x)[0]
        fast = to_channels_last_3d(model)(x.contiguous(memory_format=torch.channels_last_3d))[0]
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_loss_terms() -> None:
    mu, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    assert torch.equal(kl_divergence(mu, logvar), torch.zeros(2))
    assert kl_divergence(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)
    x = torch.zeros(2, 1, 2, 2, 2)
    recon = torch.ones_like(x)
    recon[:, :, 0] = 3.0  # error 3 on half the voxels, 1 on the others
    mask = torch.zeros_like(x)
    mask[:, :, 1] = 1.0
    total, rec, kl = vae_loss(recon, x, torch.ones(2, 4), logvar, beta=0.5, mask=mask)
    assert rec.item() == pytest.approx(1.0)  # only the masked (error 1) voxels count
    assert kl.item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(1.0 + 0.5 * 2.0 / 4)  # KL per scored voxel
    _, rec_all, _ = vae_loss(recon, x, mu, logvar, beta=1.0, kind="l1")
    assert rec_all.item() == pytest.approx(2.0)


def test_a_fresh_model_reconstructs_its_mean_image() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(in_shape=(16, 16, 16), widths=(4, 8), latent_dim=3)).eval()
    mean = torch.rand(16, 16, 16)
    model.set_mean_image(mean)
    with torch.no_grad():
        recon, _, _ = model(torch.randn(2, 1, 16, 16, 16))
    torch.testing.assert_close(recon, mean.expand(2, 1, 16, 16, 16))  # the output layer starts at zero
    assert torch.equal(model.state_dict()["mean_image"][0, 0], mean)  # saved with the weights
