"""Evaluation: the IWAE bound against the ELBO, the Frechet distance, label statistics, the gmm sampler
through a saved run, and `vaedraw eval` end to end on a tiny run trained on real MNIST digits."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from vaedraw import build_config, load_run
from vaedraw import data as data_mod
from vaedraw.cli import main
from vaedraw.evaluate import (
    binarize_fixed, evaluate_run, format_report, frechet_distance, iwae, label_stats,
)
from vaedraw import evaluate
from vaedraw.models import build_model
from vaedraw.objectives import iwae_bound, log_normal, log_px, log_standard_normal
from vaedraw.sample import GMM_NAME, GaussianMixture

TINY = {"model.conv.channels": 8, "model.conv.hidden": 32, "model.latent_dim": 4, "train.steps": 40,
        "train.batch_size": 32,
        "train.log_every": 20, "train.eval_every": 40, "train.picture_every": 40, "train.checkpoint_every": 40,
        "train.eval_images": 200, "sample.gmm_components": 3}


def _write_idx(path, array: np.ndarray) -> None:
    magic = (0x00000803 if array.ndim == 3 else 0x00000801).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(magic + dims + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def small_mnist(mnist_dir, tmp_path_factory):
    """A folder of real MNIST digits in the standard IDX layout: 3,000 training and 500 test images."""
    folder = tmp_path_factory.mktemp("small-mnist")
    for split, n, (img_name, lab_name) in (("train", 3000, data_mod._FILES["train"]),
                                           ("test", 500, data_mod._FILES["test"])):
        s = data_mod.load_split("mnist", split, mnist_dir, progress=False)
        _write_idx(folder / f"{img_name}.gz", s.images[:n].numpy())
        _write_idx(folder / f"{lab_name}.gz", s.labels[:n].numpy())
    return folder


@pytest.fixture(scope="module")
def tiny_run(small_mnist, tmp_path_factory):
    from vaedraw.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(build_config("default", overrides=TINY), out, device="cpu", data_dir=small_mnist, progress=False,
          argv=["test"])
    return out


@pytest.fixture(scope="module")
def batch(mnist_dir):
    test = data_mod.load_split("mnist", "test", mnist_dir, progress=False)
    return binarize_fixed(test.images[:16])


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(build_config("default", overrides={"model.latent_dim": 4, "model.conv.channels": 8,
                                                          "model.conv.hidden": 32}).model).eval()


# ----------------------------------------------------------------------------- likelihood
@torch.no_grad()
def test_iwae_with_one_sample_is_the_one_sample_elbo_for_the_same_noise(batch):
    model = _model()
    log_w = model.log_weights(batch, None, 1, generator=torch.Generator().manual_seed(7))
    mu, logvar = model.encode(batch)
    eps = torch.randn(1, *mu.shape, generator=torch.Generator().manual_seed(7))
    z = (mu + torch.exp(0.5 * logvar) * eps)[0]
    elbo_1 = log_px(batch, model.decode(z), "bernoulli") + log_standard_normal(z) - log_normal(z, mu, logvar)
    assert log_w.shape == (1, len(batch))
    torch.testing.assert_close(iwae_bound(log_w), elbo_1, rtol=0, atol=1e-4)


@torch.no_grad()
def test_iwae_k1_mean_matches_the_analytic_kl_elbo(batch):
    model = _model()
    x = batch[:4]
    draws = iwae(model, x.repeat(500, 1, 1, 1), None, k=1, seed=1).view(500, 4)
    analytic = torch.stack([-evaluate.heldout_loss(model, x, None, seed=s)["loss"] * torch.ones(())
                            for s in range(100)])
    # Both estimate the same ELBO (mean over the 4 images); compare within 4 standard errors.
    a, b = draws.mean(1), analytic.double()
    se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
    assert abs(a.mean().item() - b.mean().item()) < 4 * se + 1e-6
    assert se > 0  # the draws do vary: the comparison is not vacuous


@torch.no_grad()
def test_iwae_bound_grows_with_k(batch):
    model = _model()
    means = []
    for k in (1, 10, 100):
        reps = torch.stack([iwae(model, batch, None, k=k, seed=r) for r in range(8)])  # [R, B]
        means.append(reps.mean().item())
    assert means[0] < means[1] < means[2]
    # and it stays a lower bound of the same quantity: no jump beyond what k=100 adds over k=10
    assert means[2] - means[1] < means[1] - means[0] + 5.0


def test_iwae_is_chunked_without_changing_its_value(batch):
    model = _model()
    a = iwae(model, batch[:3], None, k=50, seed=3, max_decodes=10_000)  # all 3 images, one chunk
    b = iwae(model, batch[:3], None, k=50, seed=3, max_decodes=50)     # one image at a time
    assert a.shape == b.shape == (3,)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # Different batching draws different noise, so compare statistically: both near the same value.
    assert (a - b).abs().max() < 15


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_norm():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g) @ torch.randn(8, 8, generator=g)  # correlated features
    assert frechet_distance(a, a) < 1e-6
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(shift.pow(2).sum().item(), rel=1e-6)
    b = torch.randn(4000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert frechet_distance(a, b) > 1.0  # different covariances are told apart


def test_frechet_distance_matches_the_closed_form_for_isotropic_gaussians():
    # N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d.
    g = torch.Generator().manual_seed(1)
    d, n = 6, 200_000
    a = torch.randn(n, d, generator=g)
    b = 2 * torch.randn(n, d, generator=g) + 1.0
    assert frechet_distance(a, b) == pytest.approx(d * 1.0 + d, rel=0.03)


def test_label_stats_coverage_and_recognizable():
    eye = torch.eye(10)
    uniform = label_stats(eye.repeat(50, 1))
    assert uniform["coverage_bits"] == pytest.approx(math.log2(10))
    assert uniform["recognizable"] == 1.0 and uniform["min_class_share"] == pytest.approx(0.1)
    one = label_stats(torch.full((20, 10), 0.02).index_put_((torch.arange(20), torch.zeros(20, dtype=torch.long)),
                                                            torch.tensor(0.82)))
    assert one["coverage_bits"] == 0.0 and one["recognizable"] == 0.0 and one["max_class_share"] == 1.0
    y = torch.arange(10).repeat(50)
    acc = label_stats(eye.repeat(50, 1), y)
    assert acc["label_accuracy_mean"] == 1.0 and set(acc["label_accuracy"]) == {str(d) for d in range(10)}


# ----------------------------------------------------------------------------- runs
def test_gmm_sampler_round_trips_through_a_saved_run(tiny_run, tmp_path):
    run = load_run(tiny_run, "cpu")
    assert run.gmm is not None and run.gmm.means.shape == (3, 4)
    gmm = GaussianMixture.load(tiny_run / GMM_NAME)
    gmm.save(tmp_path / "copy.safetensors")
    again = GaussianMixture.load(tmp_path / "copy.safetensors")
    for name in ("weights", "means", "scale_tril"):
        torch.testing.assert_close(getattr(again, name), getattr(gmm, name), rtol=0, atol=0)
    z1, z2 = run.codes(20000, sampler="gmm", seed=5), run.codes(20000, sampler="gmm", seed=5)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    # The codes follow the mixture: their mean is the weighted mean of the component means.
    expected = (gmm.weights[:, None] * gmm.means).sum(0)
    spread = z1.std(0) / math.sqrt(len(z1))
    assert ((z1.mean(0) - expected).abs() < 5 * spread).all()
    x = run.sample(8, sampler="gmm", seed=5)
    assert x.shape == (8, 1, 28, 28) and 0 <= x.min() and x.max() <= 1


def test_evaluate_run_without_an_evaluator_still_reports_likelihoods(tiny_run, small_mnist, monkeypatch, tmp_path):
    import vaedraw.evaluator as evaluator_mod

    monkeypatch.setattr(evaluator_mod, "BUNDLED_DIR", tmp_path)
    res = evaluate_run(load_run(tiny_run, "cpu"), iwae_k=5, n_samples=50, data_dir=small_mnist, n_images=20)
    assert res["quality_available"] is False and "'mnist'" in res["quality_note"]
    assert res["samples"] is None and math.isfinite(res["iwae"]) and math.isfinite(res["elbo"])
    assert "unavailable" in format_report(res)


EVAL_KEYS = {"run_dir", "preset", "dataset", "step", "device", "split", "n_images", "likelihood", "protocol",
             "elbo", "recon", "kl", "iwae", "iwae_k", "objective", "comparable", "comparable_reason",
             "trained_on_subset", "data", "quality_available",
             "quality_note", "evaluator_accuracy", "fd_floor", "samples", "reconstructions", "seconds"}
QUALITY_KEYS = {"n", "fd", "recognizable", "coverage_bits", "min_class_share", "max_class_share", "class_shares"}


def test_vaedraw_eval_writes_the_documented_json(tiny_run, small_mnist, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tiny_run), "--iwae-k", "20", "--n-samples", "300", "--n-images", "100",
               "--data-dir", str(small_mnist), "--device", "cpu", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert EVAL_KEYS <= set(res)
    assert res["iwae_k"] == 20 and res["n_images"] == 100 and res["likelihood"] == "bernoulli"
    assert res["elbo"] < 0 and res["iwae"] < 0 and res["kl"] > 0
    # the bound with k = 20 is above the ELBO up to Monte Carlo noise on 100 images
    assert res["iwae"] > res["elbo"] - 2.0
    assert res["quality_available"] is True
    assert QUALITY_KEYS | {"sampler"} <= set(res["samples"]) and QUALITY_KEYS <= set(res["reconstructions"])
    assert res["samples"]["sampler"] == "gmm" and res["samples"]["n"] == 300
    assert 0 <= res["samples"]["recognizable"] <= 1 and 0 <= res["samples"]["coverage_bits"] <= math.log2(10) + 1e-9
    assert res["fd_floor"] >= 0 and res["samples"]["fd"] > res["fd_floor"]
    text = capsys.readouterr().out
    assert "IWAE bound" in text and "binarized once" in text and "floor" in text


def test_vaedraw_eval_refuses_a_missing_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_conditional_run_reports_label_accuracy_per_requested_digit(small_mnist, tmp_path):
    from vaedraw.train import train

    out = train(build_config("conditional", overrides={**TINY, "sample.fit_gmm": False, "sample.sampler": "prior"}),
                tmp_path / "cond", device="cpu", data_dir=small_mnist, progress=False, argv=["test"])
    res = evaluate_run(load_run(out, "cpu"), iwae_k=4, n_samples=200, data_dir=small_mnist, n_images=30)
    acc = res["samples"]["label_accuracy"]
    assert set(acc) == {str(d) for d in range(10)} and all(0 <= v <= 1 for v in acc.values())
    assert res["samples"]["label_accuracy_mean"] == pytest.approx(sum(acc.values()) / 10)  # 20 per digit
    assert "label_accuracy" in res["reconstructions"]
    assert "label accuracy per requested digit" in format_report(res)


def test_class_conditional_mixture_draws_codes_from_the_requested_digit():
    """Components fitted per label: z | y lands in that label's region of code space."""
    import numpy as np

    from vaedraw.sample import GaussianMixture

    rng = np.random.default_rng(0)
    centres = np.arange(10)[:, None] * 10.0 * np.ones((1, 2))
    y = np.repeat(np.arange(10), 200)
    z = centres[y] + rng.normal(size=(2000, 2))
    gmm = GaussianMixture.fit(z, n_components=20, seed=0, y=y)
    assert gmm.labels is not None and sorted(set(gmm.labels.tolist())) == list(range(10))
    want = torch.tensor([3, 7] * 50)
    codes = gmm.sample(100, torch.Generator().manual_seed(0), y=want)
    nearest = torch.cdist(codes.double(), torch.as_tensor(centres)).argmin(1)
    assert torch.equal(nearest, want)


def test_a_run_without_its_mixture_falls_back_to_the_prior_and_refuses_gmm_early(tiny_run, small_mnist, tmp_path):
    import shutil

    from vaedraw.errors import VaedrawError

    run_dir = tmp_path / "no-mixture"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / GMM_NAME).unlink(missing_ok=True)
    run = load_run(run_dir, "cpu")
    assert run.config.sample.sampler == "gmm" and run.default_sampler == "prior"
    res = evaluate_run(run, iwae_k=2, n_samples=50, data_dir=small_mnist, n_images=20)
    assert res["samples"]["sampler"] == "prior"
    with pytest.raises(VaedrawError, match="fit-gmm"):
        # refused before the IWAE work
        evaluate_run(run, iwae_k=evaluate.MAX_IWAE_K, sampler="gmm", data_dir=small_mnist)


# ----------------------------------------------------------------------------- bounds, progress, provenance
def test_eval_refuses_huge_k_and_sample_counts_before_any_work(tiny_run, tmp_path, capsys):
    from vaedraw.errors import VaedrawError

    run = load_run(tiny_run, "cpu")
    missing = tmp_path / "no-data-here"  # loading data first would fail differently
    with pytest.raises(VaedrawError, match="--iwae-k must be between 1 and 100,000"):
        evaluate_run(run, iwae_k=10 ** 9, data_dir=missing)
    with pytest.raises(VaedrawError, match="--n-samples must be between 1 and 1,000,000"):
        evaluate_run(run, iwae_k=10, n_samples=10 ** 7, data_dir=missing)
    with pytest.raises(SystemExit) as e:  # the command line refuses it while parsing
        main(["eval", str(tiny_run), "--iwae-k", str(10 ** 9), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--iwae-k" in err and "Traceback" not in err


def test_progress_off_a_terminal_prints_a_line_about_every_tenth():
    import io

    out = io.StringIO()
    bar = evaluate.Progress(250, "IWAE bound, k=10", "images", label="vaedraw eval", file=out)
    for _ in range(50):
        bar.update(5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("vaedraw eval: IWAE bound, k=10: 25/250 images (10%)") and "left" in lines[0]
    assert "250/250 images (100%)" in lines[-1] and "left" not in lines[-1]
    quiet = io.StringIO()
    bar = evaluate.Progress(10, "x", "images", enabled=False, file=quiet)
    bar.update(10)
    assert quiet.getvalue() == ""


def _recorded_run(tiny_run, small_mnist, **train_changes):
    """The tiny run with the data record training writes (the small folder's provenance), changed as asked."""
    run = load_run(tiny_run, "cpu")
    train, test = (data_mod.load_split("mnist", s, small_mnist, progress=False) for s in ("train", "test"))
    run.data_source = {"train": {**train.provenance, **train_changes}, "test": dict(test.provenance)}
    return run


def test_evaluation_uses_the_recorded_data_and_marks_overlap_never_comparable(tiny_run, small_mnist, monkeypatch,
                                                                              capsys, tmp_path):
    from vaedraw.errors import DataError

    run = _recorded_run(tiny_run, small_mnist)
    res = evaluate_run(run, iwae_k=2, n_samples=50, n_images=20, progress=False)  # no --data-dir: the record says
    assert res["comparable"] is True and res["comparable_reason"] is None
    assert res["trained_on_subset"] is False and res["data"]["eval"]["path"] == str(small_mnist)
    assert res["data"]["train"] == run.data_source["train"]
    with pytest.raises(DataError):  # other files than the run recorded are refused, not scored
        evaluate_run(run, iwae_k=2, n_samples=50, n_images=20, progress=False, data_dir=tmp_path)
    res = evaluate_run(run, split="train", iwae_k=2, n_samples=50, n_images=20, progress=False)
    assert res["comparable"] is False and "training split" in res["comparable_reason"]
    assert "warning: these figures are not comparable" in capsys.readouterr().err
    # a trained-on set whose images may be among the evaluation images (e.g. full MNIST vs the subset's test part)
    monkeypatch.setattr(data_mod, "overlaps", lambda train, ev: True)
    res = evaluate_run(run, iwae_k=2, n_samples=50, n_images=20, progress=False)
    assert res["comparable"] is False and "may include images this run was trained on" in res["comparable_reason"]
    assert "NOT comparable" in format_report(res)
    assert "warning: these figures are not comparable" in capsys.readouterr().err


def test_a_run_trained_on_the_bundled_subset_says_so(tiny_run, small_mnist):
    run = _recorded_run(tiny_run, small_mnist, subset=True)
    res = evaluate_run(run, iwae_k=2, n_samples=50, n_images=20, progress=False)
    assert res["trained_on_subset"] is True and "bundled subset" in format_report(res)


def test_a_damaged_data_record_is_refused_naming_the_file(tiny_run, tmp_path):
    import shutil

    from vaedraw.errors import CheckpointError

    run_dir = tmp_path / "damaged"
    shutil.copytree(tiny_run, run_dir)
    for text in ("{not json", '{"train": 1}', "[]"):
        (run_dir / "data.json").write_text(text)
        with pytest.raises(CheckpointError, match="data.json"):
            load_run(run_dir, "cpu")
    (run_dir / "data.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="data.json"):
        load_run(run_dir, "cpu")


def _write_mixture(path, **tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@pytest.mark.parametrize("case,match", [
    ("nan", "non-finite"), ("negative", "not a distribution"), ("sum", "not a distribution"),
    ("shapes", "inconsistent shapes"), ("huge", "beyond what vaedraw fits"), ("missing", "lacks"),
    ("int", "floating-point"), ("labels", "class indices"), ("garbage", "not a readable mixture"),
])
def test_a_bad_mixture_file_is_refused_naming_it(tmp_path, case, match):
    from vaedraw.errors import CheckpointError

    k, d = 3, 2
    t = {"weights": torch.full((k,), 1 / k), "means": torch.zeros(k, d), "scale_tril": torch.eye(d).repeat(k, 1, 1)}
    path = tmp_path / "gmm.safetensors"
    _write_mixture(path, **t)
    assert GaussianMixture.load(path).means.shape == (k, d)  # the well-formed file loads
    if case == "nan":
        t["means"][1, 0] = float("nan")
    elif case == "negative":
        t["weights"] = torch.tensor([1.5, -0.25, -0.25])
    elif case == "sum":
        t["weights"] = torch.tensor([0.5, 0.2, 0.2])
    elif case == "shapes":
        t["scale_tril"] = torch.eye(d + 1).repeat(k, 1, 1)
    elif case == "huge":
        t = {"weights": torch.full((20_000,), 1 / 20_000), "means": torch.zeros(20_000, 1),
             "scale_tril": torch.ones(20_000, 1, 1)}
    elif case == "missing":
        del t["scale_tril"]
    elif case == "int":
        t["means"] = torch.zeros(k, d, dtype=torch.int64)
    elif case == "labels":
        t["labels"] = torch.tensor([0.0, 1.0, 2.0])
    if case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    else:
        _write_mixture(path, **t)
    with pytest.raises(CheckpointError, match=match) as e:
        GaussianMixture.load(path)
    assert str(path) in str(e.value) and "fit-gmm" in str(e.value)


def test_a_run_without_a_data_record_is_not_comparable_on_the_bundled_subset(tiny_run, small_mnist):
    import dataclasses

    run = load_run(tiny_run, "cpu")
    run.data_source = None  # saved before runs recorded their data
    part = data_mod.load_split("mnist", "test", small_mnist, progress=False)
    assert evaluate._comparability(run, "test", part, "bernoulli") == (True, None)
    part = dataclasses.replace(part, provenance={**part.provenance, "source": "bundled", "subset": True})
    comparable, reason = evaluate._comparability(run, "test", part, "bernoulli")
    assert comparable is False and "recorded no training data" in reason


# ----------------------------------------------------------------------------- the fast IWAE pass
def test_iwae_fast_path_keeps_the_noise_and_the_bound(batch):
    from vaedraw import fastpath

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = iwae(model, batch[:6], None, k=40, seed=5)
    assert torch.equal(exact, iwae(model, batch[:6], None, k=40, seed=5, precision="fp32"))  # fp32 is the default
    fast = iwae(model, batch[:6], None, k=40, seed=5, precision="auto")
    if fastpath.device_class(torch.device("cpu")) == "cpu":  # no native bf16: auto is float32 exactly
        assert torch.equal(fast, exact)
    else:
        # same seeded noise, networks in bf16: per-image bounds a few hundredths of a nat apart, not a
        # different draw (which would move them by nats)
        assert not torch.equal(fast, exact) and (fast - exact).abs().max() < 0.5
    # the model itself is left as it was: weights, layout, mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters()) and not model.training


def test_iwae_fast_path_first_samples_are_those_of_a_smaller_k(batch):
    """The first j of k samples are those of a run with j: one image per batch, k split into chunks."""
    model = _model()
    x = batch[:1]
    g = torch.Generator().manual_seed(11)
    log_w = model.log_weights(x, None, 30, generator=g, chunk=7)
    g = torch.Generator().manual_seed(11)
    first = model.log_weights(x, None, 10, generator=g, chunk=10)
    torch.testing.assert_close(log_w[:10], first, rtol=1e-5, atol=1e-4)


def test_iwae_refuses_an_unknown_precision(batch):
    with pytest.raises(evaluate.VaedrawError, match="precision must be one of auto, fp32"):
        iwae(_model(), batch[:2], None, k=2, precision="fp16")


def test_vaedraw_eval_precision_fp32_is_recorded(tiny_run, small_mnist, tmp_path):
    out = tmp_path / "eval32.json"
    assert main(["eval", str(tiny_run), "--iwae-k", "5", "--n-samples", "50", "--n-images", "20", "--precision",
                 "fp32", "--data-dir", str(small_mnist), "--device", "cpu", "--json", str(out), "--no-save"]) == 0
    res = json.loads(out.read_text())
    assert res["iwae_precision"] == "fp32"
    fast = evaluate_run(load_run(tiny_run, "cpu"), iwae_k=5, n_samples=50, data_dir=small_mnist, n_images=20,
                        progress=False)
    assert fast["iwae_precision"] in ("fp32", "bf16") and abs(fast["iwae"] - res["iwae"]) < 0.5


def test_the_cpu_iwae_pass_keeps_freed_memory_and_its_decode_batch(batch, monkeypatch):
    """On a CPU the pass keeps freed memory in the process (its ~100 MB decode buffers would otherwise be
    page-faulted in anew every batch) and decodes MAX_DECODES at a time; the bound does not depend on it."""
    calls = []
    monkeypatch.setattr(evaluate, "keep_freed_memory", lambda: calls.append(1) or True)
    model = _model()
    lk = iwae(model, batch[:3], None, k=20, seed=5)
    assert calls and lk.shape == (3,) and torch.isfinite(lk).all()
    assert evaluate.decode_batch(model, batch[:3], None, 1000) == evaluate.MAX_DECODES
