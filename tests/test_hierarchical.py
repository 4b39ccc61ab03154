"""The hierarchical VAE: its bound, its per-group terms, training, checkpoints, sampling and the CLI on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vaedraw import data as data_mod
from vaedraw import fastpath
from vaedraw.cli import main
from vaedraw.config import build_config
from vaedraw.evaluate import binarize_fixed, heldout_loss, latent_usage
from vaedraw.models import HierarchicalVAE, build_model
from vaedraw.objectives import iwae_bound, log_normal
from vaedraw.run import load_run
from vaedraw.sample import decode_means
from vaedraw.train import kl_weight

SMALL = {"model.hierarchical.channels": 8, "model.hierarchical.latent_channels": 2,
         "model.hierarchical.hidden": 32, "model.latent_dim": 4}


def _model(seed: int = 0, **overrides) -> HierarchicalVAE:
    torch.manual_seed(seed)
    model = build_model(build_config("hierarchical", overrides={**SMALL, **overrides}).model)
    # away from the zero initialisation, so every group's prior and posterior differ
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)


@pytest.fixture(scope="module")
def batch(mnist_dir):
    return binarize_fixed(data_mod.load_split("mnist", "test", mnist_dir, progress=False).images[:8])


def test_the_groups_span_two_resolutions_below_the_code():
    model = _model()
    assert model.group_names == ("code", "7x7.1", "7x7.2", "14x14.1", "14x14.2")
    assert model.lower_shapes == ((2, 7, 7), (2, 7, 7), (1, 14, 14), (1, 14, 14))
    assert model.code_dim == 4


@torch.no_grad()
def test_iwae_with_one_sample_is_the_elbo_of_the_same_noise(batch):
    model = _model()
    recon, kl, _ = model.elbo_terms(batch, None, _noise(3))
    log_px, log_ratio = model.log_weight_terms(batch, None, 1, _noise(3))
    # the same z in every group: the image term is identical ...
    torch.testing.assert_close(-log_px[0], recon, rtol=0, atol=1e-3)
    # ... and L_1 = log p(x|z) - (log q - log p) is the one-sample ELBO with a Monte Carlo KL, whose mean is
    # the analytic KL's: over many draws of the noise they agree within a few standard errors
    x = batch[:2].repeat(100, 1, 1, 1)  # 100 draws for each of two images, in one batch
    draws = model.log_weight_terms(x, None, 1, _noise(4))[1][0].view(100, 2)
    analytic = model.elbo_terms(x, None, _noise(5))[1].view(100, 2)
    diff = (-draws).mean(0) - analytic.mean(0)
    se = ((-draws).var(0) / 100 + analytic.var(0) / 100).sqrt()
    assert (diff.abs() < 4 * se + 1e-3).all(), (diff, se)
    assert (se > 0).all()
    # and the bound of one sample is that one-sample estimate itself
    log_w = model.log_weights(batch, None, 1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iwae_bound(log_w), log_px[0] + log_ratio[0], rtol=0, atol=1e-3)


@torch.no_grad()
def test_each_group_kl_matches_its_monte_carlo_estimate(batch):
    model = _model()
    x = batch[:2].repeat(300, 1, 1, 1)  # 300 posterior draws of each of two images
    _, terms = model._posterior_pass(x, None, _noise(5))
    for name, t in zip(model.group_names, terms):
        analytic = model._group_kl(t)
        z, mu, logvar = t["z"].flatten(1), t["mu"].flatten(1), t["logvar"].flatten(1)
        mu_p = torch.zeros_like(z) if t["mu_p"] is None else t["mu_p"].flatten(1)
        logvar_p = torch.zeros_like(z) if t["logvar_p"] is None else t["logvar_p"].flatten(1)
        mc = log_normal(z, mu, logvar) - log_normal(z, mu_p, logvar_p)
        se = math.sqrt(mc.var().item() / len(mc))
        assert abs(mc.mean().item() - analytic.mean().item()) < 4 * se + 1e-4, name
        assert analytic.mean() > 0, name
    # the per-group terms are what the ELBO sums
    per_group = model.group_kl(batch, None, _noise(9))
    assert per_group.shape == (5, len(batch))
    torch.testing.assert_close(per_group.sum(0), model.elbo_terms(batch, None, _noise(9))[1])


@torch.no_grad()
def test_latent_usage_reports_every_group(batch):
    usage = latent_usage(_model(), batch, None)
    assert [u["group"] for u in usage] == ["code", "7x7.1", "7x7.2", "14x14.1", "14x14.2"]
    assert [u["dims"] for u in usage] == [4, 98, 98, 196, 196]
    assert all(0 <= u["active_units"] <= u["dims"] and u["kl"] > 0 for u in usage)
    # a group whose posterior ignores the image has no active unit and no KL
    model = _model()
    for group in model.groups_hi:
        torch.nn.init.zeros_(group.posterior.weight)
        torch.nn.init.zeros_(group.posterior.bias)
    collapsed = latent_usage(model, batch, None)[3:]
    assert all(u["kl"] < 1e-4 and u["active_units"] == 0 for u in collapsed)


def test_a_few_training_steps_change_every_groups_parameters(batch):
    cfg = build_config("hierarchical", overrides={**SMALL, "train.precision": "fp32", "train.grad_clip": 200.0})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fastpath.Plan()
    step = fastpath.FastStep(model, fastpath.make_optimizer(model, cfg, torch.device("cpu"), plan), cfg, plan)
    for i in range(3):
        stats = step(batch, None, 1e-3, kl_weight(i, cfg))
        assert torch.isfinite(stats).all()
    after = model.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    for prefix in ("groups_lo.0.", "groups_lo.1.", "groups_hi.0.", "groups_hi.1."):
        assert any(k.startswith(prefix + "posterior") for k in after)


def test_kl_warmup_rises_linearly_to_one():
    cfg = build_config("hierarchical", overrides={"train.kl_warmup": 4})
    assert [kl_weight(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_weight(0, build_config("default")) == 1.0


@torch.no_grad()
def test_the_importance_weighted_objective_is_the_bound_of_its_noise(batch):
    model = _model()
    cfg = build_config("hierarchical", overrides={**SMALL, "train.iwae_k": 4})
    objective = fastpath.Objective(model, False, fastpath.Plan(), fastpath.Noise(), iwae_k=cfg.train.iwae_k)
    torch.manual_seed(11)
    loss, recon, kl = objective(batch)
    torch.manual_seed(11)
    log_px, log_ratio = model.log_weight_terms(batch, None, 4, fastpath.Noise().normal_like, chunk=4)
    torch.testing.assert_close(loss, -iwae_bound(log_px + log_ratio).mean())
    torch.testing.assert_close(recon, -log_px.mean())
    # L_4 is at least the mean of the four one-sample estimates
    assert -loss >= (log_px + log_ratio).mean() - 1e-4


@torch.no_grad()
def test_pictures_of_codes_are_deterministic_at_temperature_zero():
    model = _model()
    z = torch.randn(6, model.code_dim)
    a = decode_means(model, z, temperature=0.0, generator=torch.Generator().manual_seed(1), precision="fp32")
    b = decode_means(model, z, temperature=0.0, generator=torch.Generator().manual_seed(2), precision="fp32")
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.sigmoid(model.decode(z)))
    # above zero the lower groups are drawn: different noise, different pixels; same noise, same pixels
    c = decode_means(model, z, temperature=0.8, generator=torch.Generator().manual_seed(1), precision="fp32")
    d = decode_means(model, z, temperature=0.8, generator=torch.Generator().manual_seed(2), precision="fp32")
    e = decode_means(model, z, temperature=0.8, generator=torch.Generator().manual_seed(1), precision="fp32")
    assert not torch.equal(c, d) and torch.equal(c, e)


def test_a_conditional_hierarchy_reads_the_label():
    model = _model(**{"model.n_classes": 10})
    z = torch.randn(4, model.code_dim)
    with torch.no_grad():
        zero, seven = model.decode(z, torch.zeros(4, dtype=torch.long)), model.decode(z, torch.full((4,), 7))
    assert not torch.allclose(zero, seven)
    with pytest.raises(ValueError, match="conditional"):
        model.decode(z)


@pytest.fixture(scope="module")
def hierarchical_run(mnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hierarchical") / "run"
    args = ["train", "--preset", "hierarchical", "--out", str(out), "--data-dir", str(mnist_dir), "--steps", "6",
            "--seed", "3", "--no-progress", "--device", "cpu", "--set", "train.batch_size=32",
            "--set", "train.eval_images=200", "--set", "sample.gmm_components=3", "--set", "train.log_every=2",
            "--set", "train.eval_every=3", "--set", "train.picture_every=3", "--set", "train.kl_warmup=4"]
    args += [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 0
    return out


def test_save_and_load_give_the_same_samples_for_a_seed(hierarchical_run):
    first, second = load_run(hierarchical_run, device="cpu"), load_run(hierarchical_run, device="cpu")
    for sampler in ("prior", "gmm"):
        a = first.sample(12, sampler=sampler, seed=5, temperature=0.7)
        b = second.sample(12, sampler=sampler, seed=5, temperature=0.7)
        assert torch.equal(a, b)
        assert not torch.equal(a, first.sample(12, sampler=sampler, seed=6, temperature=0.7))
    # the held-out loss of the loaded model is the one training logged at its last evaluation
    logged = [json.loads(line) for line in (hierarchical_run / "metrics.jsonl").read_text().splitlines()]
    last_test = [r for r in logged if r.get("split") == "test"][-1]
    run = first
    test = run.load_split("test")
    x = binarize_fixed(test.images[:200])
    assert heldout_loss(run.model, x, None)["loss"] == pytest.approx(last_test["loss"], rel=1e-4)


def test_every_command_runs_on_the_hierarchical_preset(hierarchical_run, tmp_path, mnist_dir):
    run = str(hierarchical_run)
    assert main(["sample", run, "-n", "8", "--temperature", "0.8", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["reconstruct", run, "-n", "4", "--out", str(tmp_path / "r.png")]) == 0
    assert main(["interpolate", run, "--frames", "4", "--out", str(tmp_path / "i.png")]) == 0
    assert main(["manifold", run, "--out", str(tmp_path / "m.png")]) == 0
    assert main(["latent-map", run, "-n", "200", "--method", "pca", "--out", str(tmp_path / "l.png")]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", run, "--iwae-k", "3", "--n-images", "50", "--n-samples", "200", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [g["group"] for g in result["latent_groups"]] == ["code", "7x7.1", "7x7.2", "14x14.1", "14x14.2"]
    assert result["active_units"] == sum(g["active_units"] for g in result["latent_groups"])
    assert math.isfinite(result["iwae"]) and result["iwae"] >= result["elbo"] - 5.0
    for name in ("s.png", "r.png", "i.png", "m.png", "l.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_hierarchy_refuses_shapes_and_likelihoods_it_cannot_model():
    from vaedraw.errors import ConfigError

    cfg = build_config("hierarchical")
    with pytest.raises(ConfigError, match="multiples of 4"):
        build_model(cfg.model, (1, 30, 30))
    model = build_model(cfg.model, (3, 32, 32))
    assert model.lower_shapes[0] == (8, 8, 8) and model.lower_shapes[-1] == (4, 16, 16)
