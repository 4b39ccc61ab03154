"""Latent-space tools: interpolation paths, manifold spacing, projections, drawings, and the CLI pictures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vaedraw import latent
from vaedraw.cli import main
from vaedraw.config import build_config
from vaedraw.errors import VaedrawError
from vaedraw.models import build_model
from vaedraw.run import Run



def _run(latent_dim: int, n_classes: int = 0) -> Run:
    """An untrained run in memory: enough for shapes and plumbing."""
    cfg = build_config("default", overrides={"model.latent_dim": latent_dim, "model.n_classes": n_classes,
                                             "model.channels": 4, "model.hidden": 16})
    torch.manual_seed(0)
    return Run(run_dir=None, config=cfg, model=build_model(cfg.model).eval(), step=0, metrics={})


# ----------------------------------------------------------------------------- interpolation
def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    z1 = z1 * z0.norm() / z1.norm()  # equal norms
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s, l = latent.slerp(z0, z1, t), latent.lerp(z0, z1, t)
    torch.testing.assert_close(s[0], z0)
    torch.testing.assert_close(s[-1], z1)
    torch.testing.assert_close(l[0], z0)
    torch.testing.assert_close(l[-1], z1)
    # slerp keeps the common norm all along; lerp cuts inside the sphere in the middle
    torch.testing.assert_close(s.norm(dim=1), torch.full((11,), float(z0.norm()), dtype=torch.float64))
    assert l[5].norm() < 0.99 * z0.norm()
    # and slerp moves at a constant angular speed
    ang = torch.arccos((s[:-1] * s[1:]).sum(1) / (s[:-1].norm(dim=1) * s[1:].norm(dim=1)))
    torch.testing.assert_close(ang, ang.mean().expand_as(ang), atol=1e-9, rtol=0)


def test_slerp_falls_back_to_lerp_for_parallel_or_zero_codes():
    t = torch.linspace(0, 1, 5)
    z0 = torch.tensor([1.0, 2.0, 0.0])
    torch.testing.assert_close(latent.slerp(z0, 3 * z0, t), latent.lerp(z0, 3 * z0, t))
    torch.testing.assert_close(latent.slerp(torch.zeros(3), z0, t), latent.lerp(torch.zeros(3), z0, t))
    assert torch.isfinite(latent.slerp(z0, -z0, t)).all()


def test_interpolation_labels_switch_at_the_midpoint():
    assert latent.interpolation_labels(3, 8, 6).tolist() == [3, 3, 3, 8, 8, 8]
    assert latent.interpolation_labels(1, 7, 5).tolist() == [1, 1, 7, 7, 7]
    with pytest.raises(VaedrawError):
        latent.interpolation_codes(torch.zeros(2), torch.ones(2), 1)


def test_interpolate_decodes_both_paths_between_the_encoder_means():
    run = _run(4, n_classes=10)
    x = torch.rand(2, 1, 28, 28)
    path = latent.interpolate(run, x[0], x[1], steps=7, y0=2, y1=5)
    assert path.linear.shape == path.spherical.shape == (7, 1, 28, 28)
    mu, _ = run.encode(x, torch.tensor([2, 5]))
    torch.testing.assert_close(path.z["linear"][0], mu[0])
    torch.testing.assert_close(path.z["spherical"][-1], mu[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path.linear[0:1], run.decode(mu[:1], torch.tensor([2])))
    with pytest.raises(VaedrawError, match="conditional"):
        latent.interpolate(run, x[0], x[1], steps=3)
    frames = latent.there_and_back(path.linear)
    assert len(frames) == 12 and torch.equal(frames[7], path.linear[5])


# ----------------------------------------------------------------------------- manifold
def test_normal_quantiles_have_equal_prior_mass_between_neighbours():
    q = latent.normal_quantiles(9).double()
    cdf = 0.5 * (1 + torch.erf(q / math.sqrt(2)))
    torch.testing.assert_close(cdf, torch.linspace(0.05, 0.95, 9, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(q, -q.flip(0), atol=1e-6, rtol=0)  # symmetric about 0
    gaps = q.diff()
    assert gaps[0] > gaps[4] and gaps[-1] > gaps[4]  # denser near the centre, as the prior is


def test_manifold_codes_layout_for_a_2d_latent():
    z = latent.manifold_codes(5, latent.Basis.axes(2)).view(5, 5, 2)
    q = latent.normal_quantiles(5)
    torch.testing.assert_close(z[0, :, 0], q)  # columns: z1 increasing left to right
    torch.testing.assert_close(z[:, 0, 1], q.flip(0))  # rows: z2 decreasing top to bottom
    assert torch.all(z[:, :, 0] == z[0:1, :, 0])


def test_manifold_over_principal_directions_of_a_larger_latent():
    g = torch.Generator().manual_seed(0)
    # codes stretched along two known directions
    mu = torch.randn(2000, 6, generator=g) * torch.tensor([0.1, 3.0, 0.1, 0.1, 1.0, 0.1]) + 2.0
    basis = latent.Basis.principal(mu, 2)
    assert torch.allclose(basis.directions[0].abs(), torch.tensor([0, 1.0, 0, 0, 0, 0]), atol=0.05)
    assert torch.allclose(basis.directions[1].abs(), torch.tensor([0, 0, 0, 0, 1.0, 0]), atol=0.05)
    assert torch.allclose(basis.scale, torch.tensor([3.0, 1.0]), rtol=0.1)
    z = latent.manifold_codes(4, basis)
    c = basis.coords(z)
    q = latent.normal_quantiles(4)
    torch.testing.assert_close(c.view(4, 4, 2)[0, :, 0], q, atol=1e-4, rtol=0)
    torch.testing.assert_close(z.mean(0), basis.mean, atol=1e-4, rtol=0)  # centred on the mean code
    x = latent.manifold(_run(6), 4, mu)
    assert x.shape == (16, 1, 28, 28) and 0 <= x.min() and x.max() <= 1


# ----------------------------------------------------------------------------- projections and drawings
@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_projection_shapes(method):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 5, generator=g)
    proj = latent.Projection.fit(z, method)
    assert proj.points.shape == (60, 2) and np.isfinite(proj.points).all()
    if method == "pca":
        np.testing.assert_allclose(proj.transform(z[:7]), proj.points[:7], atol=1e-6)
    else:
        with pytest.raises(VaedrawError):
            proj.transform(z[:7])


def test_a_2d_latent_is_its_own_map():
    z = torch.randn(10, 2)
    proj = latent.Projection.fit(z, "tsne")
    assert proj.method == "plane"
    np.testing.assert_allclose(proj.points, z.numpy(), atol=1e-6)
    with pytest.raises(VaedrawError, match="unknown projection"):
        latent.Projection.fit(torch.randn(10, 4), "isomap")


def test_mnist_like_scales_and_centres_the_ink():
    a = np.zeros((90, 90), dtype=np.float32)
    a[5:65, 70:80] = 1.0  # a tall bar near the top right corner
    x = latent.mnist_like(a)[0].numpy()
    rows, cols = np.nonzero(x > 0.05)
    assert rows.max() - rows.min() + 1 == 20  # the longer side fits the 20-pixel box
    cy, cx = (x.sum(1) @ np.arange(28)) / x.sum(), (x.sum(0) @ np.arange(28)) / x.sum()
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1
    assert latent.mnist_like(np.zeros((40, 40))).sum() == 0


# ----------------------------------------------------------------------------- the CLI on a real run
def test_cli_pictures(tiny_conditional_run, mnist_dir, tmp_path):
    run, d = str(tiny_conditional_run), ["--data-dir", str(mnist_dir)]
    out = tmp_path / "interp.png"
    gif = tmp_path / "interp.gif"
    assert main(["interpolate", run, "--from-digit", "1", "--to-digit", "7", "--steps", "6",
                 "--out", str(out), "--gif", str(gif), *d]) == 0
    assert Image.open(out).size == ((6 * 30 + 2) * 2, (2 * 30 + 2) * 2)  # 2 rows of 6, 28 px + 2 px gaps, x2
    assert Image.open(gif).n_frames == 10
    assert main(["interpolate", run, "--from-index", "0", "--to-index", "5", "--out", str(out), *d]) == 0
    assert main(["interpolate", run, "--from-index", "0", "--to-index", "99999", *d]) == 2

    m = tmp_path / "map.png"
    assert main(["latent-map", run, "-n", "300", "--out", str(m), *d]) == 0
    assert Image.open(m).size[0] > 300

    g = tmp_path / "manifold.png"
    assert main(["manifold", run, "--grid", "6", "--digit", "4", "--out", str(g), *d]) == 0
    img = np.asarray(Image.open(g))
    assert img.shape == (6 * 28, 6 * 28) and img.std() > 0
