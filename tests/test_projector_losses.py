"""Projectors, losses, noise and the training config."""

from __future__ import annotations

import math

import pytest
import torch

from cmcr.errors import ConfigError
from cmcr.trainer.config import TrainConfig, default_config_text, flatten_tables, from_dict, load_config
from cmcr.trainer.losses import add_noise, cmcr_loss, info_nce, intra_mcr_loss
from cmcr.trainer.projector import Projector, make_projector, projector_architecture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_head_layout_and_init():
    p = Projector(512, 1024, 512)
    kinds = [type(m).__name__ for m in p.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert torch.all(p.net[0].bias == 0)
    bound = math.sqrt(6 / (512 + 1024))  # Xavier-uniform bound
    assert p.net[0].weight.abs().max() <= bound and p.net[0].weight.abs().max() > 0.9 * bound
    three_d = Projector(512, 1024, 256, depth=1, final_activation=True)
    assert [type(m).__name__ for m in three_d.net] == ["Linear", "BatchNorm1d", "ReLU"]
    deep = Projector(8, 16, 4, depth=3, batchnorm=False, activation="gelu", dropout=0.1)
    assert [type(m).__name__ for m in deep.net] == ["Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]


def test_output_is_unit_and_batch_of_one_trains():
    p = Projector(16, 32, 8)
    p.train()
    y = p(torch.randn(5, 16))
    assert y.shape == (5, 8)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(5))
    one = p(torch.randn(1, 16))  # BatchNorm would raise on one row in training mode
    assert one.shape == (1, 8) and p.training and all(m.training for m in p.modules())


def test_make_projector_round_trip_and_errors():
    cfg = TrainConfig(hidden_dim=8, out_dim=4, depth=1)
    arch = projector_architecture(6, cfg)
    assert make_projector(arch).in_dim == 6
    with pytest.raises(ConfigError):
        make_projector({**arch, "bogus": 1})
    with pytest.raises(ConfigError):
        Projector(4, 4, 4, activation="swish")


def test_info_nce_values():
    a = torch.eye(4)
    # perfectly aligned, tiny temperature: loss ~ 0; anti-aligned pairs: large
    assert info_nce(a, a, 0.01) < 1e-6
    shuffled = a[[1, 0, 3, 2]]
    assert info_nce(a, shuffled, 0.01) > 50
    # uniform logits -> log(B)
    z = torch.nn.functional.normalize(torch.ones(4, 3), dim=1)
    torch.testing.assert_close(info_nce(z, z, 1.0), torch.tensor(math.log(4)))


def test_intra_loss_and_noise():
    x = torch.nn.functional.normalize(torch.randn(2000, 512), dim=1)
    assert intra_mcr_loss(x, x) == 0
    torch.testing.assert_close(intra_mcr_loss(x, -x), torch.tensor(4.0))
    g = torch.Generator().manual_seed(0)
    noisy = add_noise(x, 0.025, g)
    torch.testing.assert_close(noisy.norm(dim=1), torch.ones(2000))
    cos = (noisy * x).sum(dim=1).mean()
    assert 0.84 < cos < 0.90  # method.md: sigma = 0.025 at D = 512 keeps cos ~ 0.87
    assert add_noise(x, 0.0) is x


def test_cmcr_loss_parts():
    torch.manual_seed(0)
    pa, pb = Projector(8, 16, 4), Projector(8, 16, 4)
    s = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    loss, parts = cmcr_loss(pa, pb, s, s, s, s, temperature=0.1, noise_std=0.0, intra_weight=0.5)
    assert parts["intra"] == pytest.approx(0.0, abs=1e-6)  # pseudo == shared, no noise
    assert parts["loss"] == pytest.approx(parts["inter_shared"] + parts["inter_pseudo"], rel=1e-5)
    loss.backward()
    assert pa.net[0].weight.grad is not None
    _, only = cmcr_loss(pa, pb, s, s, None, None, temperature=0.1, noise_std=0.0, intra_weight=0.5)
    assert only["inter_pseudo"] == 0 and only["loss"] == pytest.approx(only["inter_shared"])


def test_config_defaults_toml_and_overrides(tmp_path):
    cfg = load_config()
    assert (cfg.temperature, cfg.memory_temperature, cfg.noise_std, cfg.intra_weight) == (0.01, 0.01, 0.025, 0.1)
    assert (cfg.hidden_dim, cfg.out_dim, cfg.depth, cfg.batch_size, cfg.lr) == (1024, 512, 2, 4096, 1e-3)
    import tomllib

    bundled = flatten_tables(tomllib.loads(default_config_text()))
    assert from_dict(bundled) == cfg  # the bundled TOML states the defaults
    f = tmp_path / "c.toml"
    f.write_text("[loss]\nnoise_std = 0.05\n[optim]\nepochs = 3\n")
    c = load_config(f, epochs=None, lr=0.01)
    assert (c.noise_std, c.epochs, c.lr) == (0.05, 3, 0.01)
    f.write_text("[loss]\nnoise = 0.05\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(f)
    f.write_text("[a]\nseed = 1\n[b]\nseed = 2\n")
    with pytest.raises(ConfigError, match="twice"):
        load_config(f)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="epochs"):
        from_dict({"epochs": "many"})
