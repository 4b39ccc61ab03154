"""Latent-space tools: interpolation paths, manifold spacing, projections, drawings, and the CLI pictures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaedraw import latent, plots
from vaedraw.cli import main
from vaedraw.config import build_config
from vaedraw.errors import VaedrawError
from vaedraw.models import build_model
from vaedraw.run import Run



def _run(latent_dim: int, n_classes: int = 0, image_shape=(1, 28, 28)) -> Run:
    """An untrained run in memory: enough for shapes and plumbing."""
    cfg = build_config("default", overrides={"model.latent_dim": latent_dim, "model.n_classes": n_classes,
                                             "model.channels": 4, "model.hidden": 16})
    torch.manual_seed(0)
    model = build_model(cfg.model, image_shape=image_shape).eval()
    return Run(run_dir=None, config=cfg, model=model, step=0, metrics={})


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
    path = latent.interpolate(run, x[0], x[1], frames=7, y0=2, y1=5)
    assert path.linear.shape == path.spherical.shape == (7, 1, 28, 28)
    mu, _ = run.encode(x, torch.tensor([2, 5]))
    torch.testing.assert_close(path.z["linear"][0], mu[0])
    torch.testing.assert_close(path.z["spherical"][-1], mu[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path.linear[0:1], run.decode(mu[:1], torch.tensor([2])))
    with pytest.raises(VaedrawError, match="conditional"):
        latent.interpolate(run, x[0], x[1], frames=3)
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


def test_manifold_spans_where_the_codes_are_not_only_the_prior():
    """Codes far from the prior's centre (as a 2-d latent's 1s and 7s are) are inside the data-spaced grid,
    outside the prior-spaced one."""
    g = torch.Generator().manual_seed(0)
    mu = torch.cat([torch.randn(500, 2, generator=g) * 0.3 + torch.tensor([3.0, -2.5]),
                    torch.randn(500, 2, generator=g) * 0.3 + torch.tensor([-0.5, 0.5])])
    basis = latent.Basis.axes(2)
    data = latent.manifold_positions(10, basis, mu, "data")
    prior = latent.manifold_positions(10, basis, mu, "prior")
    torch.testing.assert_close(prior[:, 0], latent.normal_quantiles(10))
    assert prior[:, 0].max() < 1.7 and prior[:, 1].min() > -1.7  # the old grid stops short of the far cluster
    assert data[-1, 0] > 2.8 and data[0, 1] < -2.3  # the new one reaches into it, on both axes
    want = torch.quantile(mu.double(), torch.tensor([latent.DATA_EDGE, 1 - latent.DATA_EDGE], dtype=torch.float64), 0)
    torch.testing.assert_close(data[[0, -1]], want.float())
    assert (data.diff(dim=0) > 0).all()
    z = latent.manifold_codes(10, basis, data).view(10, 10, 2)
    torch.testing.assert_close(z[0, :, 0], data[:, 0])  # columns along axis 0, left to right
    torch.testing.assert_close(z[:, 0, 1], data[:, 1].flip(0))  # rows along axis 1, top = largest
    # no codes at hand: the prior's spacing
    torch.testing.assert_close(latent.manifold_positions(10, basis, None, "data"), prior)
    with pytest.raises(VaedrawError, match="spacing"):
        latent.manifold_positions(10, basis, mu, "uniform")


def test_data_spacing_of_principal_coordinates_and_a_flat_axis():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(3000, 5, generator=g) * torch.tensor([4.0, 0.1, 1.0, 0.1, 0.1]) + 1.0
    basis = latent.Basis.principal(mu, 2)
    pos = latent.manifold_positions(8, basis, mu)
    c = basis.coords(mu)
    assert pos[0, 0] < torch.quantile(c[:, 0], 0.02) and pos[-1, 0] > torch.quantile(c[:, 0], 0.98)
    flat = torch.stack([torch.linspace(-1, 1, 50), torch.full((50,), 0.7)], 1)
    q = latent.data_quantiles(flat, 4)
    torch.testing.assert_close(q[:, 1], latent.normal_quantiles(4))  # no extent: the prior's spacing
    with pytest.raises(VaedrawError, match="non-finite"):
        latent.data_quantiles(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), 4)


def test_sizes_are_bounded():
    for bad in (1, latent.MAX_GRID + 1, 100_000):
        with pytest.raises(VaedrawError, match="--grid"):
            latent.manifold_codes(bad, latent.Basis.axes(2))
    for bad in (1, latent.MAX_FRAMES + 1, 10**9):
        with pytest.raises(VaedrawError, match="--frames"):
            latent.interpolation_codes(torch.zeros(2), torch.ones(2), bad)
    plots.check_picture(100 * 100, (28, 28), nrow=100, pad=0, scale=plots.DEFAULT_SCALE)  # the largest grid fits
    with pytest.raises(VaedrawError, match="pixels"):
        plots.check_picture(100 * 100, (28, 28), nrow=100, pad=0, scale=plots.MAX_SCALE)
    with pytest.raises(VaedrawError, match="--scale"):
        plots.check_picture(4, (28, 28), scale=0)


def test_pictures_take_any_size_and_rgb():
    run = _run(2, image_shape=(3, 12, 20))
    x = latent.manifold(run, 3, spacing="prior")
    assert x.shape == (9, 3, 12, 20)
    img = plots.image_grid(x, nrow=3, pad=0, scale=2)
    assert img.mode == "RGB" and img.size == (3 * 20 * 2, 3 * 12 * 2)
    a = np.asarray(img)
    np.testing.assert_array_equal(a[::2, ::2][:12, 20:40], plots.to_uint8(x[1:2])[0])  # tile 1, nearest neighbour
    assert plots.to_uint8(torch.full((2, 1, 5, 7), 0.5)).shape == (2, 5, 7)
    assert plots.to_uint8(torch.rand(2, 3, 5, 7)).shape == (2, 5, 7, 3)
    with pytest.raises(VaedrawError, match="channels"):
        plots.to_uint8(torch.rand(2, 2, 5, 7))
    path = latent.interpolate(run, torch.rand(3, 12, 20), torch.rand(3, 12, 20), frames=4)
    assert path.linear.shape == (4, 3, 12, 20)
    frames = plots.animation_frames([path.linear, path.spherical], scale=4)
    assert frames[0].size == ((2 * 22 + 2) * 4, (14 + 2) * 4)


def test_latent_map_colours_any_number_of_classes(tmp_path):
    import matplotlib.pyplot as plt

    for k in (3, 10, 15, 40):
        colours = plots.class_colours(k, plt)
        assert len(set(colours)) == k
    pts = np.random.default_rng(0).normal(size=(200, 2))
    out = plots.plot_latent_map(pts, np.arange(200) % 40, tmp_path / "m.png", legend_title="label")
    assert Image.open(out).size[0] > 300
    assert Image.open(plots.plot_latent_map(pts, None, tmp_path / "u.png")).size[0] > 300  # unlabelled


def test_progress_gif_shows_each_step_and_holds_the_last_frame(tmp_path):
    pics = []
    for step in (500, 1000, 1500):
        p = tmp_path / f"step_{step:07d}.png"
        plots.save_grid(torch.full((4, 1, 28, 28), 0.5), p, nrow=2)
        pics.append(p)
    out = plots.save_progress_gif(pics, tmp_path / "progress.gif")
    with Image.open(pics[0]) as first:
        size = first.size
    with Image.open(out) as gif:
        assert gif.n_frames == 3  # identical pictures, yet three frames: the captions differ
        assert gif.size[0] == size[0] and gif.size[1] > size[1]
        durations, bands = [], []
        for i in range(3):
            gif.seek(i)
            durations.append(gif.info["duration"])
            bands.append(np.asarray(gif.convert("L"))[: gif.size[1] - size[1]])
    assert durations == [plots.PROGRESS_MS, plots.PROGRESS_MS, plots.PROGRESS_LAST_MS]
    assert durations[0] >= 150 and durations[-1] >= 1000
    assert all(b.max() > 200 for b in bands)  # text drawn in white on the band
    assert not np.array_equal(bands[0], bands[1]) and not np.array_equal(bands[1], bands[2])
    assert plots.save_progress_gif([], tmp_path / "none.gif") is None and not (tmp_path / "none.gif").exists()


# ----------------------------------------------------------------------------- the CLI on a real run
def test_cli_pictures(tiny_conditional_run, mnist_dir, tmp_path, capsys):
    run, d = str(tiny_conditional_run), ["--data-dir", str(mnist_dir)]
    s = plots.DEFAULT_SCALE
    out = tmp_path / "interp.png"
    gif = tmp_path / "interp.gif"
    assert main(["interpolate", run, "--from-digit", "1", "--to-digit", "7", "--frames", "6",
                 "--out", str(out), "--gif", str(gif), *d]) == 0
    assert Image.open(out).size == ((6 * 30 + 2) * s, (2 * 30 + 2) * s)  # 2 rows of 6, 28 px + 2 px gaps, scaled
    with Image.open(gif) as img:
        assert img.n_frames == 10 and img.size == ((2 * 30 + 2) * s, (30 + 2) * s)
    assert main(["interpolate", run, "--from-index", "0", "--to-index", "5", "--out", str(out), "--scale", "1",
                 *d]) == 0
    assert Image.open(out).size == (10 * 30 + 2, 2 * 30 + 2)  # 10 frames by default, unscaled
    assert main(["interpolate", run, "--from-index", "0", "--to-index", "99999", *d]) == 2
    capsys.readouterr()
    # the old spelling still works, with a note
    assert main(["interpolate", run, "--steps", "4", "--out", str(out), "--scale", "1", *d]) == 0
    assert "--frames" in capsys.readouterr().err
    assert Image.open(out).size == (4 * 30 + 2, 2 * 30 + 2)

    m = tmp_path / "map.png"
    assert main(["latent-map", run, "-n", "300", "--out", str(m), *d]) == 0
    assert Image.open(m).size[0] > 300

    g = tmp_path / "manifold.png"
    assert main(["manifold", run, "--grid", "6", "--digit", "4", "--out", str(g), *d]) == 0
    img = np.asarray(Image.open(g))
    assert img.shape == (6 * 28 * s, 6 * 28 * s) and img.std() > 0
    tiles = img[::s, ::s]  # nearest neighbour: every model pixel is an s x s block
    np.testing.assert_array_equal(np.repeat(np.repeat(tiles, s, 0), s, 1), img)
    p = tmp_path / "prior.png"
    assert main(["manifold", run, "--grid", "6", "--spacing", "prior", "--scale", "1", "--out", str(p), *d]) == 0
    assert np.asarray(Image.open(p)).shape == (6 * 28, 6 * 28)


def _bad_picture_inputs(run, tmp: Path) -> dict[str, tuple[int, list]]:
    """case -> (exit status, argv) for the picture commands; all refused before anything is written."""
    x = str(tmp / "x.png")
    return {
        "manifold --grid 1": (2, ["manifold", run, "--grid", "1", "--out", x]),
        "manifold 100,000 cells": (2, ["manifold", run, "--grid", "317", "--out", x]),
        "manifold --grid word": (2, ["manifold", run, "--grid", "ten", "--out", x]),
        "manifold --scale 0": (2, ["manifold", run, "--scale", "0", "--out", x]),
        "manifold --scale 17": (2, ["manifold", run, "--scale", "17", "--out", x]),
        "manifold too many pixels": (2, ["manifold", run, "--grid", "100", "--scale", "16", "--out", x]),
        "manifold --spacing odd": (2, ["manifold", run, "--spacing", "uniform", "--out", x]),
        "manifold --digit 12": (2, ["manifold", run, "--digit", "12", "--out", x]),
        "manifold -n 10^9": (2, ["manifold", run, "-n", str(10**9), "--out", x]),
        "manifold --out .jpg": (2, ["manifold", run, "--out", str(tmp / "x.jpg")]),
        "manifold --out folder": (6, ["manifold", run, "--out", str(tmp / "pics.png")]),
        "interpolate --frames 10^9": (2, ["interpolate", run, "--frames", str(10**9), "--out", x]),
        "interpolate --steps 10^9": (2, ["interpolate", run, "--steps", str(10**9), "--out", x]),
        "interpolate --frames 1": (2, ["interpolate", run, "--frames", "1", "--out", x]),
        "interpolate --frames and --steps": (2, ["interpolate", run, "--frames", "5", "--steps", "5", "--out", x]),
        "interpolate --gif .png": (2, ["interpolate", run, "--out", x, "--gif", str(tmp / "y.png")]),
        "interpolate --out .gif": (2, ["interpolate", run, "--out", str(tmp / "x.gif")]),
        "interpolate --gif in a file": (6, ["interpolate", run, "--out", x, "--gif", str(tmp / "file" / "a.gif")]),
        "interpolate one index": (2, ["interpolate", run, "--from-index", "3", "--out", x]),
        "latent-map -n 10^9": (2, ["latent-map", run, "-n", str(10**9), "--out", x]),
        "latent-map --seed 2^64": (2, ["latent-map", run, "--seed", str(2**64), "--out", x]),
        "latent-map --method isomap": (2, ["latent-map", run, "--method", "isomap", "--out", x]),
        "latent-map --out .svg": (2, ["latent-map", run, "--out", str(tmp / "x.svg")]),
    }


@pytest.mark.parametrize("case", list(_bad_picture_inputs("r", Path("t"))))
def test_bad_picture_input_is_one_line_before_any_work(case, tiny_conditional_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "pics.png").mkdir()
    monkeypatch.setattr(Run, "load_split", lambda *a, **k: pytest.fail("loaded data before refusing"))
    expected, argv = _bad_picture_inputs(str(tiny_conditional_run), tmp_path)[case]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == expected, err
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "pics.png"]
    assert not any((tmp_path / "pics.png").iterdir())
