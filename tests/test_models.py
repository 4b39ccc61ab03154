"""Tests for vaedraw.models: the article's network (sizes, TensorFlow 'same' padding, init, dropout) and ours."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaedraw import fastpath, models
from vaedraw.config import ConvOptions, ModelConfig, build_config
from vaedraw.errors import ConfigError
from vaedraw.models import ConvVAE, SameCrop, SamePad, SeedVAE, build_model, count_parameters
from vaedraw.objectives import kl_to_standard_normal, reconstruction_loss

from toy_arch import ToyVAE


@pytest.fixture(scope="module")
def seed_model() -> SeedVAE:
    torch.manual_seed(0)
    model = build_model(build_config("seed").model)
    assert isinstance(model, SeedVAE)
    return model


def _tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding (before, after) for a conv over `size` pixels."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _effective_pads(seq: nn.Sequential, size: int) -> list[tuple[type, int, int, tuple[int, int], int]]:
    """Walk a Sequential and report, for each (transposed) conv: its type, stride, input size, the padding it
    applies (its own plus a preceding SamePad / following SameCrop) and its output size."""
    out, pending_pad = [], None
    modules = list(seq)
    for i, m in enumerate(modules):
        if isinstance(m, SamePad):
            pending_pad = (1, 2)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            own = m.padding[0]
            assert m.padding[0] == m.padding[1]
            pads = pending_pad if pending_pad is not None else (own, own)
            if isinstance(m, nn.ConvTranspose2d) and i + 1 < len(modules) and isinstance(modules[i + 1], SameCrop):
                assert own == 0
                pads = (1, 2)
            if isinstance(m, nn.Conv2d):
                new = (size + pads[0] + pads[1] - m.kernel_size[0]) // m.stride[0] + 1
            else:
                new = (size - 1) * m.stride[0] + m.kernel_size[0] - pads[0] - pads[1]
            out.append((type(m), m.stride[0], size, pads, new))
            size, pending_pad = new, None
    return out


# ----------------------------------------------------------------------------- sizes
def test_seed_parameter_counts(seed_model):
    m = seed_model
    encoder = count_parameters(m.encoder) + count_parameters(m.to_mu) + count_parameters(m.to_logvar)
    decoder = count_parameters(m.decoder_dense) + count_parameters(m.decoder_conv)
    assert encoder == 182_480
    assert decoder == 9_969_009
    assert count_parameters(m) == 10_151_489
    final = m.decoder_conv[-1]
    assert isinstance(final, nn.Linear) and (final.in_features, final.out_features) == (12544, 784)
    assert count_parameters(final) == 9_835_280


def test_seed_shapes_through_every_layer(seed_model):
    m = seed_model.eval()
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: seen.append((name, tuple(o.shape))))
             for name, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        x = torch.rand(3, 1, 28, 28)
        with torch.no_grad():
            mu, logvar = m.encode(x)
            logits = m.decode(mu)
    finally:
        for h in hooks:
            h.remove()
    # in call order: the encoder convs, the two heads, the decoder's dense and (transposed) convs
    assert seen == [
        ("encoder.0", (3, 64, 14, 14)), ("encoder.3", (3, 64, 7, 7)), ("encoder.7", (3, 64, 7, 7)),
        ("to_mu", (3, 8)), ("to_logvar", (3, 8)),
        ("decoder_dense.0", (3, 24)), ("decoder_dense.2", (3, 49)),
        ("decoder_conv.0", (3, 64, 14, 14)),
        ("decoder_conv.3", (3, 64, 17, 17)),  # stride-1 transposed convs give 17x17 before their SameCrop
        ("decoder_conv.7", (3, 64, 17, 17)),
        ("decoder_conv.11", (3, 784)),
    ]
    assert mu.shape == logvar.shape == (3, 8)
    assert logits.shape == (3, 1, 28, 28)
    # the layer sequence as a whole: 28 -> 14 -> 7 -> 7 and 7 -> 14 -> 14 -> 14
    enc = _effective_pads(m.encoder, 28)
    dec = _effective_pads(m.decoder_conv, 7)
    assert [(s, n) for _, _, s, _, n in enc] == [(28, 14), (14, 7), (7, 7)]
    assert [(s, n) for _, _, s, _, n in dec] == [(7, 14), (14, 14), (14, 14)]


# ----------------------------------------------------------------------------- TensorFlow 'same'
def test_every_seed_conv_pads_like_tensorflow_same(seed_model):
    """Stride 2 pads 1/1, stride 1 pads 1 before and 2 after, as TensorFlow computes it."""
    for _, stride, size, pads, new in _effective_pads(seed_model.encoder, 28):
        assert pads == _tf_same_pads(size, 4, stride)
        assert new == math.ceil(size / stride)
    for _, stride, size, pads, new in _effective_pads(seed_model.decoder_conv, 7):
        # a 'same' transposed conv is the adjoint of the 'same' conv from its output size back to its input
        assert new == size * stride
        assert pads == _tf_same_pads(new, 4, stride)
    assert _tf_same_pads(7, 4, 1) == (1, 2) and _tf_same_pads(14, 4, 2) == (1, 1)


def test_same_pad_and_crop_are_asymmetric():
    x = torch.arange(49.0).view(1, 1, 7, 7)
    padded = SamePad()(x)
    assert padded.shape == (1, 1, 10, 10)
    assert torch.equal(padded[..., 1:8, 1:8], x)
    assert padded[..., 0, :].abs().sum() == 0 and padded[..., 8:, :].abs().sum() == 0
    assert padded[..., :, 0].abs().sum() == 0 and padded[..., :, 8:].abs().sum() == 0
    y = torch.arange(17.0 * 17).view(1, 1, 17, 17)
    assert torch.equal(SameCrop()(y), y[..., 1:15, 1:15])


def test_stride1_same_conv_matches_a_direct_tensorflow_correlation():
    """out[i] = sum_k x[i - 1 + k] w[k] (pad 1 before), checked against a loop over a 1-d delta image."""
    w = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 1, 4, 4)
    for p in range(7):
        x = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
        x[0, 0, p, p] = 1.0
        out = F.conv2d(SamePad()(x), w)[0, 0]
        expected = torch.zeros(7, 7, dtype=torch.float64)
        for i in range(7):
            for j in range(7):
                ki, kj = p - i + 1, p - j + 1
                if 0 <= ki < 4 and 0 <= kj < 4:
                    expected[i, j] = w[0, 0, ki, kj]
        assert torch.equal(out, expected)


def test_stride1_same_transposed_conv_is_the_adjoint_of_the_same_conv():
    """<conv(x), y> = <x, convT(y)> with one weight: pad (1, 2) and crop (1, 2) are the matching pair."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)  # conv: 3 -> 5 channels
    x = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 7, 7, generator=g, dtype=torch.float64)
    conv_x = F.conv2d(SamePad()(x), w)
    convT_y = SameCrop()(F.conv_transpose2d(y, w))
    assert conv_x.shape == y.shape and convT_y.shape == x.shape
    lhs, rhs = (conv_x * y).sum(), (x * convT_y).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-10)
    # the symmetric alternative (PyTorch padding=1 on both) is a different operator: 7 -> 6, not 'same'
    assert F.conv2d(x, w, padding=1).shape[-1] == 6


def test_stride2_layers_of_the_seed_model_are_adjoint_pairs(seed_model):
    """The stride-2 conv (14 -> 7, pad 1/1) and transposed conv (7 -> 14, padding=1) are adjoints."""
    conv, convT = seed_model.encoder[3], seed_model.decoder_conv[0]
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert isinstance(convT, nn.ConvTranspose2d) and convT.stride == (2, 2) and convT.padding == (1, 1)
    g = torch.Generator().manual_seed(1)
    w = conv.weight.detach().double()
    x = torch.randn(2, 64, 14, 14, generator=g, dtype=torch.float64)
    y = torch.randn(2, 64, 7, 7, generator=g, dtype=torch.float64)
    lhs = (F.conv2d(x, w, stride=2, padding=1) * y).sum()
    rhs = (x * F.conv_transpose2d(y, w, stride=2, padding=1)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-9)


def test_hwc_flatten_matches_tensorflow_order(seed_model):
    flatten = seed_model.encoder[-1]
    x = torch.arange(2 * 3 * 2 * 2.0).view(2, 3, 2, 2)  # [B, C, H, W]
    out = flatten(x)
    assert out.shape == (2, 12)
    # NHWC: channel varies fastest
    assert torch.equal(out[0, :3], x[0, :, 0, 0]) and torch.equal(out[0, 3:6], x[0, :, 0, 1])


# ----------------------------------------------------------------------------- init and dropout
def test_seed_init_is_glorot_uniform_with_zero_biases(seed_model):
    layers = [m for m in seed_model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert len(layers) == 11
    for m in layers:
        w = m.weight.detach().double()
        receptive = w[0, 0].numel() if w.dim() > 2 else 1
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        a = math.sqrt(6.0 / (fan_in + fan_out))  # U(-a, a) has variance a^2 / 3 = 2 / (fan_in + fan_out)
        assert w.abs().max() <= a + 1e-12
        var = w.pow(2).mean()  # the mean is 0 by symmetry; E[w^2] estimates the variance
        se = math.sqrt(4 / 45) * a * a / math.sqrt(w.numel())  # sd of w^2 for U(-a, a) is sqrt(4/45) a^2
        assert abs(var - 2.0 / (fan_in + fan_out)) < 5 * se, m
        assert torch.count_nonzero(m.bias) == 0


def test_dropout_is_on_in_training_and_off_in_eval(seed_model):
    m = seed_model
    assert [mod.p for mod in m.modules() if isinstance(mod, nn.Dropout)] == [0.2] * 5
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.train()
        mu1, _ = m.encode(x)
        mu2, _ = m.encode(x)
        d1, d2 = m.decode(z), m.decode(z)
        m.eval()
        mu3, lv3 = m.encode(x)
        mu4, lv4 = m.encode(x)
        d3, d4 = m.decode(z), m.decode(z)
    assert not torch.equal(mu1, mu2) and not torch.equal(d1, d2)
    assert torch.equal(mu3, mu4) and torch.equal(lv3, lv4) and torch.equal(d3, d4)


def test_forward_reparameterizes_around_the_mean(seed_model):
    m = seed_model.eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        logits, mu, logvar, z = m(x)
        mu_e, logvar_e = m.encode(x)
        assert torch.equal(mu, mu_e) and torch.equal(logvar, logvar_e)
        assert torch.allclose(logits, m.decode(z), atol=1e-5)
    assert z.shape == mu.shape and not torch.equal(z, mu)


# ----------------------------------------------------------------------------- our model
@pytest.mark.parametrize("latent_dim,channels,hidden", [(2, 4, 16), (16, 8, 32)])
def test_conv_model_shapes(latent_dim, channels, hidden):
    torch.manual_seed(0)
    conv = ConvOptions(channels=channels, hidden=hidden)
    m = build_model(ModelConfig(arch="conv", latent_dim=latent_dim, conv=conv)).eval()
    assert isinstance(m, ConvVAE) and m.latent_dim == latent_dim and m.n_classes == 0
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        logits = m.decode(torch.randn(7, latent_dim))
        out = m(x)
    assert mu.shape == logvar.shape == (5, latent_dim)
    assert logits.shape == (7, 1, 28, 28)
    assert [t.shape for t in out] == [(5, 1, 28, 28), (5, latent_dim), (5, latent_dim), (5, latent_dim)]


def test_conditional_model_depends_on_the_label():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="conv", latent_dim=4, conv=ConvOptions(4, 16), n_classes=10)).eval()
    assert m.n_classes == 10
    x, z = torch.rand(3, 1, 28, 28), torch.randn(3, 4)
    y0, y1 = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        mu0, _ = m.encode(x, y0)
        mu1, _ = m.encode(x, y1)
        d0, d1 = m.decode(z, y0), m.decode(z, y1)
        d0_again = m.decode(z, y0)
    assert mu0.shape == (3, 4) and d0.shape == (3, 1, 28, 28)
    assert not torch.allclose(mu0, mu1) and not torch.allclose(d0, d1)
    assert torch.equal(d0, d0_again)
    with pytest.raises(ValueError, match="labels"):
        m.decode(z)


def test_unconditional_model_ignores_labels():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="conv", latent_dim=4, conv=ConvOptions(channels=4, hidden=16))).eval()
    z = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(m.decode(z), m.decode(z, torch.tensor([3, 4])))


def test_build_model_with_an_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(ModelConfig(arch="mlp"))


# ----------------------------------------------------------------------------- shapes from the data
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 16, 24), (2, 8, 8)])
def test_conv_model_is_built_for_the_data_shape(shape):
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="conv", latent_dim=3, conv=ConvOptions(channels=4, hidden=16)), shape).eval()
    assert m.image_shape == shape
    x = torch.rand(2, *shape)
    with torch.no_grad():
        mu, logvar = m.encode(x)
        logits = m.decode(mu)
    assert mu.shape == logvar.shape == (2, 3) and logits.shape == (2, *shape)


def test_the_default_model_keeps_its_size_on_mnist():
    m = build_model(build_config("default").model, (1, 28, 28))
    assert count_parameters(m) == 1_688_289 and m.image_shape == (1, 28, 28)


@pytest.mark.parametrize("shape,match", [((1, 30, 30), "multiples of 4"), ((1, 28), "image shape"),
                                         ((0, 28, 28), "image shape"), ((1, 10 ** 6, 28), "image shape")])
def test_conv_model_refuses_shapes_it_cannot_halve_twice(shape, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(arch="conv", latent_dim=3, conv=ConvOptions(channels=4, hidden=16)), shape)


def test_the_seed_network_refuses_any_other_image_shape():
    with pytest.raises(ConfigError, match="1x28x28"):
        build_model(build_config("seed").model, (3, 32, 32))
    assert build_model(build_config("seed").model, (1, 28, 28)).image_shape == (1, 28, 28)


# ----------------------------------------------------------------------------- the objective a model owns
def _tiny_conv(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="conv", latent_dim=3, conv=ConvOptions(4, 16), **kw)).eval()


def test_elbo_terms_use_the_callers_noise_per_image():
    m = _tiny_conv()
    x = torch.rand(5, 1, 28, 28)
    eps = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        recon, kl, logits = m.elbo_terms(x, None, lambda t: eps)
        mu, logvar = m.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        expected_logits = m.decode(z)
    assert recon.shape == kl.shape == (5,) and logits.shape == (5, 1, 28, 28)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    torch.testing.assert_close(recon, reconstruction_loss(x, expected_logits, "bernoulli"), rtol=0, atol=0)
    torch.testing.assert_close(kl, kl_to_standard_normal(mu, logvar), rtol=0, atol=0)
    with torch.no_grad():  # zero noise decodes the mean: the terms then differ from a noisy draw
        recon0, _, logits0 = m.elbo_terms(x, None, torch.zeros_like)
        torch.testing.assert_close(logits0, m.decode(mu), rtol=0, atol=0)
    assert not torch.equal(recon0, recon)


def test_log_weights_have_one_row_per_sample_and_follow_the_generator():
    m = _tiny_conv()
    x = torch.bernoulli(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        a = m.log_weights(x, None, 7, generator=torch.Generator().manual_seed(3), chunk=3)
        b = m.log_weights(x, None, 7, generator=torch.Generator().manual_seed(3), chunk=3)
        c = m.log_weights(x, None, 7, generator=torch.Generator().manual_seed(4), chunk=3)
    assert a.shape == (7, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prior_codes_are_standard_normal_scaled_by_the_temperature():
    m = _tiny_conv()
    z = m.prior_codes(20000, 0.5, torch.Generator().manual_seed(0))
    assert z.shape == (20000, m.code_dim) and m.code_dim == m.latent_dim == 3
    assert abs(z.std().item() - 0.5) < 0.01 and abs(z.mean().item()) < 0.01
    assert torch.equal(m.prior_codes(4, 0.0, torch.Generator().manual_seed(0)), torch.zeros(4, 3))


# ----------------------------------------------------------------------------- adding a model
@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(models.ARCHS, "toy", ToyVAE)  # the one registry line of "add a model"
    return ModelConfig(arch="toy", latent_dim=2, dropout=0.1)


def test_a_toy_architecture_in_one_file_trains_and_evaluates(toy_registered):
    from vaedraw.evaluate import heldout_loss, iwae
    from vaedraw.run import Run
    from vaedraw.sample import decode_means, encode_means

    cfg = build_config("default", overrides={"train.batch_size": 16})
    cfg.model = toy_registered
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 12))
    assert isinstance(model, ToyVAE) and model.image_shape == (1, 8, 12)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fastpath.choose_plan(cfg.train, "toy", torch.device("cpu"))
    assert "no fast-path row" in plan.describe()
    fastpath.prepare_model(model, plan, fastpath.Noise())
    step = fastpath.FastStep(model, fastpath.make_optimizer(model, cfg, torch.device("cpu"), plan), cfg, plan)
    x = torch.rand(16, 1, 8, 12)
    stats = [step(x, None, 1e-2) for _ in range(5)]
    assert stats[-1][0] < stats[0][0]  # the loss goes down on a fixed batch
    for k, v in model.state_dict().items():
        assert not torch.equal(v, init[k]), k  # every weight moved
    model.eval()
    xb = torch.bernoulli(x)
    ev = heldout_loss(model, xb, None)
    assert ev["loss"] == pytest.approx(ev["recon"] + ev["kl"]) and ev["kl"] > 0
    assert iwae(model, xb, None, k=8).shape == (16,)
    codes = encode_means(model, (x[:, 0] * 255).to(torch.uint8))
    assert codes.shape == (16, 2)
    assert decode_means(model, codes).shape == (16, 1, 8, 12)
    run = Run(run_dir=None, config=cfg, model=model, step=0, metrics={})
    assert run.image_shape == (1, 8, 12) and run.latent_dim == 2 and run.n_classes == 0 and run.data_source is None
    assert run.sample(5, sampler="prior", seed=0).shape == (5, 1, 8, 12)
    assert run.reconstruct(x[:3]).shape == (3, 1, 8, 12)


def test_a_toy_architecture_runs_through_the_real_training_loop(toy_registered, mnist_dir, tmp_path, capsys):
    from vaedraw.run import load_run
    from vaedraw.train import train

    cfg = build_config("default", overrides={
        "model.arch": "toy", "model.latent_dim": 2, "train.steps": 4, "train.batch_size": 16, "train.eval_images": 50,
        "train.log_every": 2, "train.eval_every": 2, "train.picture_every": 2, "train.checkpoint_every": 2,
        "sample.fit_gmm": False, "sample.sampler": "prior"})
    out = train(cfg, tmp_path / "toy", device="cpu", data_dir=mnist_dir, progress=False, argv=["test"])
    assert "no fast-path row for" in capsys.readouterr().err
    run = load_run(out, "cpu")
    assert isinstance(run.model, ToyVAE) and run.image_shape == (1, 28, 28) and run.step == 4
    assert run.sample(3, seed=0).shape == (3, 1, 28, 28)


# ----------------------------------------------------------------------------- checkpoints remember the shape
def test_checkpoints_rebuild_the_model_for_its_image_shape(tmp_path):
    from vaedraw import checkpoint as ckpt_io
    from vaedraw.errors import CheckpointError

    cfg = build_config("default", overrides={"model.latent_dim": 3, "model.conv.channels": 4, "model.conv.hidden": 16})
    torch.manual_seed(0)
    colour = build_model(cfg.model, (3, 32, 32))
    path = tmp_path / "c.safetensors"
    ckpt_io.save(path, ckpt_io.Checkpoint(config=cfg, model_state=colour.state_dict(), image_shape=colour.image_shape))
    assert ckpt_io.read_header(path)["image_shape"] == [3, 32, 32]
    again = ckpt_io.model_from_checkpoint(ckpt_io.load(path), path)
    assert again.image_shape == (3, 32, 32)
    for k, v in colour.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # a checkpoint saved before shapes were recorded holds a 1x28x28 model
    grey = build_model(cfg.model)
    ckpt_io.save(path, ckpt_io.Checkpoint(config=cfg, model_state=grey.state_dict()))
    assert "image_shape" not in ckpt_io.read_header(path)
    assert ckpt_io.model_from_checkpoint(ckpt_io.load(path), path).image_shape == (1, 28, 28)
    for bad in ([3, 30, 32], [1, -28, 28], "28x28", [1, 28]):
        ckpt = ckpt_io.load(path)
        ckpt.image_shape = bad
        with pytest.raises(CheckpointError, match="does not describe a model"):
            ckpt_io.model_from_checkpoint(ckpt, path)
