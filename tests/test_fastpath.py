"""The fast training step: exact rewrites, plan choice, global noise, agreement with the plain step, resume."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from vaedraw import fastpath
from vaedraw.checkpoint import load as load_checkpoint
from vaedraw.config import apply_overrides, preset
from vaedraw.models import SameCrop, build_model
from vaedraw.train import train


def test_flipped_conv_transpose_is_exact_in_value_and_gradient():
    torch.manual_seed(0)
    convt = torch.nn.ConvTranspose2d(6, 5, 4, stride=1).double()
    x = torch.randn(3, 6, 14, 14, dtype=torch.double, requires_grad=True)
    ref = SameCrop()(convt(x))
    fast = fastpath.FlippedConvTranspose(convt)(x)
    assert fast.shape == ref.shape == (3, 5, 14, 14)
    torch.testing.assert_close(fast, ref)
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, convt.weight), g)
    gx, gw = torch.autograd.grad(fast, (x, convt.weight), g)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_prepare_model_keeps_the_state_dict_and_the_function():
    cfg = preset("seed")
    torch.manual_seed(0)
    plain = build_model(cfg.model).eval()
    fast = build_model(cfg.model)
    fast.load_state_dict(plain.state_dict())
    plan = fastpath.Plan(channels_last=True, conv_as_conv=True)
    fastpath.prepare_model(fast, plan, fastpath.Noise()).eval()
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert any(isinstance(m, fastpath.FlippedConvTranspose) for m in fast.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in fast.modules())
    z = torch.randn(16, cfg.model.latent_dim)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(z), plain.decode(z), rtol=1e-4, atol=1e-4)
        for a, b in zip(fast.encode(x), plain.encode(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_choose_plan_follows_the_table_and_the_flags():
    cpu = torch.device("cpu")
    t = preset("seed").train
    auto = fastpath.choose_plan(t, "seed", cpu)
    row = fastpath.AUTO[(fastpath.device_class(cpu), "seed")]
    assert auto.precision == row["precision"] and auto.channels_last == row["channels_last"]
    assert not auto.cuda_graph  # never on a CPU
    assert auto.keep_memory and "keep_memory" in auto.describe()
    t.precision, t.compile = "fp32", "on"
    asked = fastpath.choose_plan(t, "seed", cpu)
    assert asked.precision == "fp32" and asked.compile and asked.reason == "as asked"
    cuda = fastpath.choose_plan(preset("seed").train, "seed", torch.device("cuda"))
    assert cuda.cuda_graph and not cuda.keep_memory
    assert not fastpath.choose_plan(preset("seed").train, "seed", torch.device("cuda"), distributed=True).cuda_graph
    assert not fastpath.choose_plan(preset("default").train, "conv", cpu).conv_as_conv
    assert "no fast-path row" not in fastpath.choose_plan(preset("default").train, "conv", cpu).describe()
    # an architecture with no row says so in the plan that training announces
    unknown = fastpath.choose_plan(preset("default").train, "newarch", cpu)
    assert "no fast-path row for" in unknown.describe() and "newarch" in unknown.describe()
    assert unknown.precision == "fp32" and not unknown.compile and not unknown.channels_last


def test_noise_rows_of_all_processes_make_the_single_process_draw():
    x = torch.zeros(4, 3)
    torch.manual_seed(5)
    whole_u, whole_n = fastpath.Noise().uniform_like(torch.zeros(8, 3)), fastpath.Noise().normal_like(torch.zeros(8, 3))
    parts_u, parts_n = [], []
    for rank in range(2):
        torch.manual_seed(5)
        noise = fastpath.Noise(rank, 2)
        parts_u.append(noise.uniform_like(x))
        parts_n.append(noise.normal_like(x))
    assert torch.equal(torch.cat(parts_u), whole_u)
    assert torch.equal(torch.cat(parts_n), whole_n)
    y = torch.zeros(3, 5, 7)  # 105 elements per process: not a multiple of the 4 masks per 64-bit draw
    torch.manual_seed(6)
    whole_k = fastpath.Noise().keep_mask(torch.zeros(6, 5, 7), 0.3)
    parts_k = []
    for rank in range(2):
        torch.manual_seed(6)
        parts_k.append(fastpath.Noise(rank, 2).keep_mask(y, 0.3))
    assert parts_k[0].shape == y.shape and parts_k[0].dtype == torch.bool
    assert torch.equal(torch.cat(parts_k), whole_k)
    # channels-last activations get a channels-last mask, split by rows the same way
    cl = torch.zeros(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(7)
    whole_cl = fastpath.Noise().keep_mask(torch.zeros(6, 4, 5, 6).contiguous(memory_format=torch.channels_last), 0.3)
    assert whole_cl.is_contiguous(memory_format=torch.channels_last)
    parts_cl = []
    for rank in range(2):
        torch.manual_seed(7)
        parts_cl.append(fastpath.Noise(rank, 2).keep_mask(cl, 0.3))
    assert torch.equal(torch.cat(parts_cl), whole_cl)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9])
def test_keep_mask_keeps_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    keep = fastpath.Noise().keep_mask(torch.zeros(1000, 1000), p).float()
    assert abs(keep.mean().item() - (1 - p)) < 5 * ((p * (1 - p)) ** 0.5 / 1000 + 1e-6) + 2 ** -16
    # neighbouring elements share a 64-bit draw; they must still be independent
    both = (keep[:, 0::2] * keep[:, 1::2]).mean().item()
    assert abs(both - (1 - p) ** 2) < 0.01


def test_global_dropout_drops_and_rescales_in_training_only():
    drop = fastpath.GlobalDropout(0.25, fastpath.Noise())
    h = torch.ones(200, 50)
    torch.manual_seed(0)
    out = drop(h)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert torch.equal(drop.eval()(h), h)


def _noise_free(name: str):
    """A preset without binarization or dropout noise, so that only eps is random (drawn identically)."""
    cfg = preset(name)
    apply_overrides(cfg, {"model.dropout": 0.0, "data.binarize": "none", "model.likelihood": "gaussian"})
    if name == "default":
        apply_overrides(cfg, {"model.conv.channels": 8, "model.conv.hidden": 32})
    return cfg


def _plain_step(model, opt, x, cfg) -> torch.Tensor:
    """The textbook step: the model's terms with eps from the global RNG, batch means, backward, foreach Adam."""
    opt.zero_grad(set_to_none=True)
    recon, kl, _ = model.elbo_terms(x, None, torch.randn_like)
    recon, kl = recon.mean(), kl.mean()
    loss = recon + kl
    loss.backward()
    opt.step()
    return torch.stack([loss, recon, kl]).detach()


@pytest.mark.parametrize("name", ["default", "seed"])
def test_fp32_fast_step_follows_the_plain_step(name):
    cfg = _noise_free(name)
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    fast = build_model(cfg.model)
    fast.load_state_dict(plain.state_dict())
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    plan = fastpath.Plan(channels_last=True, conv_as_conv=name == "seed")
    fastpath.prepare_model(fast, plan, fastpath.Noise())
    step = fastpath.FastStep(fast, fastpath.make_optimizer(fast, cfg, torch.device("cpu"), plan), cfg, plan)
    t = cfg.train
    opt = torch.optim.Adam(plain.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)
    x = torch.rand(8, 1, 28, 28)
    for _ in range(3):
        torch.manual_seed(1)
        ref = _plain_step(plain, opt, x, cfg)
        torch.manual_seed(1)  # the same eps for both (randn of mu's shape)
        out = step(x, None, cfg.train.lr)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    # Adam moves every weight by about lr per step whatever the gradient's size, so rounding can flip the
    # direction of weights whose gradient is ~0: compare the whole update, not each weight
    for k, w in fast.state_dict().items():
        d_fast, d_plain = w - init[k], plain.state_dict()[k] - init[k]
        assert d_plain.norm() > 0, k
        assert (d_fast - d_plain).norm() <= 0.02 * d_plain.norm(), k


def test_bf16_step_on_cpu_is_finite_and_close_to_fp32():
    cfg = preset("seed")
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        plan = fastpath.Plan(precision=precision, channels_last=True, conv_as_conv=True)
        fastpath.prepare_model(model, plan, fastpath.Noise())
        step = fastpath.FastStep(model, fastpath.make_optimizer(model, cfg, torch.device("cpu"), plan), cfg, plan)
        torch.manual_seed(1)
        x = torch.rand(16, 1, 28, 28)
        losses[precision] = step(x, None, cfg.train.lr)[0].item()
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.01


def test_optimizer_state_keeps_a_tensor_lr_as_a_float():
    model = torch.nn.Linear(3, 2)
    cfg = preset("default")
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    state = fastpath.optimizer_state_for_saving(opt)
    assert isinstance(state["param_groups"][0]["lr"], float)
    fresh = torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg.train.lr))
    opt2 = torch.optim.Adam(model.parameters(), lr=0.5, foreach=True)
    opt2.load_state_dict(state)
    fastpath.restore_optimizer_flags(opt2, fresh)
    assert torch.is_tensor(opt2.param_groups[0]["lr"]) and opt2.param_groups[0]["lr"].item() == pytest.approx(0.01)


def _tiny(steps: int):
    cfg = preset("default")
    apply_overrides(cfg, {"model.conv.channels": 4, "model.conv.hidden": 16, "model.latent_dim": 4,
                          "model.dropout": 0.1,
                          "train.steps": steps, "train.batch_size": 32, "train.log_every": 2,
                          "train.lr_schedule": "constant",  # a shorter first run is then a run stopped early
                          "train.eval_every": 1000, "train.picture_every": 1000, "train.checkpoint_every": 3,
                          "train.eval_images": 100, "sample.fit_gmm": False, "sample.sampler": "prior"})
    return cfg


def test_resume_on_the_cpu_default_path_is_bitwise_exact(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    whole = train(_tiny(6), tmp_path / "whole", device="cpu", data_dir=mnist_dir, progress=False, argv=["t"])
    # stop after 3 steps (a checkpoint), then resume to 6
    train(_tiny(3), tmp_path / "split", device="cpu", data_dir=mnist_dir, progress=False, argv=["t"])
    train(_tiny(6), tmp_path / "split", device="cpu", data_dir=mnist_dir, resume=True, progress=False, argv=["t"])
    a = load_checkpoint(whole / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.safetensors")
    assert a.step == b.step == 6
    for k, v in a.model_state.items():
        assert torch.equal(v, b.model_state[k]), k


def test_training_is_not_a_copy_of_its_initial_weights(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    out = train(_tiny(4), tmp_path / "r", device="cpu", data_dir=mnist_dir, progress=False, argv=["t"])
    torch.manual_seed(0)
    init = build_model(_tiny(4).model).state_dict()
    state = load_checkpoint(out / "checkpoint.safetensors").model_state
    assert set(state) == set(init)
    assert any(not torch.equal(state[k], init[k]) for k in init)
    assert F.mse_loss(state["decoder_conv.2.weight"], init["decoder_conv.2.weight"]).item() > 0


def test_bf16_decoding_stays_close_to_float32():
    from vaedraw.sample import decode_means

    torch.manual_seed(0)
    model = build_model(preset("default").model).eval()
    z = torch.randn(300, model.latent_dim)
    with torch.no_grad():
        ref = torch.sigmoid(model.decode(z))
    fast = decode_means(model, z, batch_size=128)  # several batches, the last one short
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    assert (fast - ref).abs().max() < 2 / 255
    torch.testing.assert_close(decode_means(model, z, precision="fp32"), ref)
    with pytest.raises(ValueError, match="precision"):
        decode_means(model, z, precision="half")
    if fastpath.device_class(torch.device("cpu")) == "cpu-bf16":
        assert not torch.equal(fast, ref)  # bf16 decoding is in use where the CPU has it


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_agrees_to_keep_freed_memory():
    assert fastpath.keep_freed_memory()
