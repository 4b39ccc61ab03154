"""Figures with their uncertainty and `vaedraw report`: standard errors of the likelihoods, the FD's bootstrap
interval, RUN_DIR/eval.json, and the comparison page in markdown and HTML, on the suite's tiny trained runs."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from vaedraw import evaluate
from vaedraw.cli import main
from vaedraw.evaluate import FrechetReference, format_report, frechet_distance, plus_minus, standard_error

QUICK = ["--iwae-k", "5", "--n-images", "40", "--n-samples", "200", "--device", "cpu"]


def _copy(run, folder):
    """A private copy of a shared run (those are read-only), without any figures saved in it."""
    shutil.copytree(run, folder)
    (folder / "eval.json").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def evaluated(tiny_run, tiny_conditional_run, mnist_dir, tmp_path_factory):
    """Two runs, an unconditional and a conditional one, each evaluated once by `vaedraw eval` (which saves
    RUN_DIR/eval.json), with the per-image values its likelihoods came from."""
    root = tmp_path_factory.mktemp("evaluated")
    runs = {"default-run": _copy(tiny_run, root / "default-run"),
            "conditional-run": _copy(tiny_conditional_run, root / "conditional-run")}
    per_image: dict[str, dict] = {}
    for name, run in runs.items():
        seen = per_image.setdefault(name, {})
        real_loss, real_iwae = evaluate.heldout_loss, evaluate.iwae

        def loss_spy(*args, **kwargs):
            out = real_loss(*args, **kwargs)
            seen["elbo"] = -out["loss"]
            return out

        def iwae_spy(*args, **kwargs):
            out = real_iwae(*args, **kwargs)
            seen["iwae"] = out
            return out

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(evaluate, "heldout_loss", loss_spy)
            mp.setattr(evaluate, "iwae", iwae_spy)
            assert main(["eval", str(run), *QUICK, "--data-dir", str(mnist_dir)]) == 0
    return runs, per_image


def _result(run) -> dict:
    return json.loads((run / "eval.json").read_text())


# ----------------------------------------------------------------------------- standard errors
def test_standard_error_is_the_standard_deviation_over_the_root_of_n():
    assert standard_error(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert standard_error(torch.tensor([7.0])) is None  # one image: no spread to speak of
    assert plus_minus(-84.1234, 0.2311) == "-84.12 +- 0.23" and plus_minus(1.5, None) == "1.50"


def test_heldout_loss_per_image_has_the_means_of_the_summed_call(tiny_run):
    from vaedraw import load_run

    run = load_run(tiny_run, "cpu")
    x = evaluate.eval_inputs(run.load_split("test", progress=False).images[:30], True)
    means = evaluate.heldout_loss(run.model, x, None, batch_size=7)
    per = evaluate.heldout_loss(run.model, x, None, batch_size=7, per_image=True)
    assert isinstance(means["loss"], float) and per["loss"].shape == (30,) and per["loss"].dtype == torch.float64
    for key in ("loss", "recon", "kl"):
        assert per[key].mean().item() == pytest.approx(means[key], rel=1e-6)  # float32 sums vs float64
    torch.testing.assert_close(per["loss"], per["recon"] + per["kl"])


def test_eval_standard_errors_equal_a_direct_computation_from_the_per_image_values(evaluated):
    runs, per_image = evaluated
    for name, run in runs.items():
        r, seen = _result(run), per_image[name]
        assert r["n_images"] == 40
        for key in ("elbo", "iwae"):
            values = seen[key].numpy()
            assert len(values) == 40
            assert r[key] == pytest.approx(values.mean(), rel=1e-9)
            assert r[f"{key}_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)), rel=1e-9)
            assert r[f"{key}_bpd_se"] == pytest.approx(r[f"{key}_se"] / (784 * math.log(2)), rel=1e-9)
        text = format_report(r)
        assert plus_minus(r["elbo"], r["elbo_se"]) in text and plus_minus(r["iwae"], r["iwae_se"]) in text
        assert "standard error of the mean over the 40 images" in text


# ----------------------------------------------------------------------------- FD bootstrap
def test_fd_bootstrap_interval_contains_the_point_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    ref_features = torch.randn(2000, 32, generator=g)
    f = torch.randn(500, 32, generator=g) * 1.2 + 0.3
    ref = FrechetReference(ref_features)
    point = ref.distance(f)
    assert point == pytest.approx(frechet_distance(f, ref_features), rel=1e-9)  # the reference's root serves
    b1, b2, b3 = ref.bootstrap(f, 20, seed=3), ref.bootstrap(f, 20, seed=3), ref.bootstrap(f, 20, seed=4)
    assert b1 == b2 and b1["fds"] != b3["fds"]
    lo, hi = b1["interval"]
    assert lo < point < hi
    fds = np.array(b1["fds"])
    assert hi - lo == pytest.approx(np.quantile(fds, 0.975) - np.quantile(fds, 0.025), rel=1e-9)
    # resamples repeat rows, so their FDs sit above the point: the reason the interval is moved onto it
    assert b1["shift"] == pytest.approx(np.median(fds) - point) and b1["shift"] > 0


def test_eval_reports_the_fd_interval_and_per_class_label_accuracy(evaluated):
    runs, _ = evaluated
    for run in runs.values():
        s = _result(run)["samples"]
        lo, hi = s["fd_ci"]
        assert lo <= s["fd"] <= hi
        assert {k: s["fd_bootstrap"][k] for k in ("n", "seed", "level")} == {"n": 20, "seed": 0, "level": 0.95}
        assert 0 <= s["recognizable_se"] <= 0.5
    r = _result(runs["conditional-run"])
    acc = r["samples"]["label_accuracy"]
    assert set(acc) == {str(d) for d in range(10)} and r["samples"]["label_accuracy_mean_se"] is not None
    text = format_report(r)
    assert "label accuracy per requested digit" in text and "FD 95% interval" in text


# ----------------------------------------------------------------------------- eval.json
def test_eval_saves_its_figures_in_the_run_unless_told_not_to(evaluated, tiny_run, tmp_path, monkeypatch, capsys):
    runs, _ = evaluated
    canned = _result(runs["default-run"])
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *args, **kwargs: canned)
    run = _copy(tiny_run, tmp_path / "run")
    assert main(["eval", str(run), "--no-save", "--device", "cpu"]) == 0
    assert not (run / "eval.json").exists()
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert _result(run) == canned and "read by `vaedraw report`" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the report
def _tables(text: str) -> list[list[str]]:
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def test_a_markdown_report_compares_two_runs_with_their_intervals_and_pictures(evaluated, tmp_path, capsys):
    runs, _ = evaluated
    out = tmp_path / "paper" / "report.md"
    assert main(["report", *map(str, runs.values()), "--out", str(out)]) == 0
    assert "report of 2 runs" in capsys.readouterr().out
    text = out.read_text()
    for name, run in runs.items():
        r = _result(run)
        assert name in text
        for key in ("elbo", "iwae"):
            assert plus_minus(r[key], r[f"{key}_se"]) in text
            assert plus_minus(r[f"{key}_bpd"], r[f"{key}_bpd_se"], 4) in text
        s = r["samples"]
        assert f"{s['fd']:.2f} [{s['fd_ci'][0]:.2f}, {s['fd_ci'][1]:.2f}]" in text
        # the full MNIST test set is comparable; the bundled subset's test part is not, and the page says why
        assert (f"{name}: NOT comparable: {r['comparable_reason']}" if not r["comparable"]
                else f"{name}: comparable with published figures") in text
    assert torch.__version__ in text
    acc = _result(runs["conditional-run"])["samples"]["label_accuracy"]
    assert "requested class" in text and f"{acc['3']:.3f}" in text
    # pictures: linked relative to the report, each one there
    links = re.findall(r"!\[[^\]]*\]\(<?([^)>]+)>?\)", text)
    assert len(links) == 4 and not any(link.startswith("/") for link in links)
    assert {(out.parent / link).resolve() for link in links} == {
        (run / name).resolve() for run in runs.values() for name in ("samples.png", "curves.png")}
    # tables read as tables in plain text: every line of a table as wide as the others
    tables = _tables(text)
    assert len(tables) >= 3 and all(len({len(line) for line in table}) == 1 for table in tables)


def test_an_html_report_is_one_self_contained_file(evaluated, tmp_path):
    runs, _ = evaluated
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs.values()), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 4 and all(src.startswith("data:image/png;base64,") for src in sources)
    first = base64.b64decode(sources[0].split(",", 1)[1])
    assert first == (runs["default-run"] / "samples.png").read_bytes()
    r = _result(runs["default-run"])
    assert plus_minus(r["elbo"], r["elbo_se"]).replace(" +- ", " &plusmn; ") in page


def test_a_run_without_eval_json_is_refused_with_the_command_and_eval_makes_a_quick_one(evaluated, tiny_run,
                                                                                         mnist_dir, tmp_path, capsys):
    runs, _ = evaluated
    bare = _copy(tiny_run, tmp_path / "bare")
    out = tmp_path / "report.md"
    assert main(["report", str(runs["default-run"]), str(bare), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"`vaedraw eval {bare}`" in err and "--eval" in err
    assert not out.exists()
    assert main(["report", str(bare), "--out", str(tmp_path / "report.txt")]) == 2
    assert "writes .md or .html" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --eval: a quick evaluation of the runs without figures, saved in them, then the page
    assert main(["report", str(runs["default-run"]), str(bare), "--eval", "--iwae-k", "2", "--n-images", "20",
                 "-n", "100", "--device", "cpu", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    r = _result(bare)
    assert r["iwae_k"] == 2 and r["n_images"] == 20 and r["samples"]["n"] == 100
    assert "quick evaluation of" in capsys.readouterr().out
    text = out.read_text()
    assert "k differs" in text and plus_minus(r["iwae"], r["iwae_se"]) in text


def test_figures_older_than_the_checkpoint_and_incomparable_ones_are_flagged(evaluated, tmp_path):
    runs, _ = evaluated
    run = tmp_path / "resumed"
    shutil.copytree(runs["default-run"], run)
    r = _result(run)
    reason = "evaluated on the run's own training split"
    (run / "eval.json").write_text(json.dumps({**r, "step": r["step"] - 1, "comparable": False,
                                               "comparable_reason": reason}))
    out = tmp_path / "report.md"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"eval.json is of step {r['step'] - 1}, the checkpoint is at step {r['step']}" in text
    assert "NO (see below)" in text and f"resumed: NOT comparable: {reason}" in text
