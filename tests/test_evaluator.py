"""The shipped evaluator classifier: it loads, says what it is, and classifies real test digits as well
as its metadata claims."""

from __future__ import annotations

import math

import pytest
import torch

from vaedraw import data as data_mod
from vaedraw.errors import VaedrawError
from vaedraw.data import to_float as as_float
from vaedraw.evaluator import FEATURES, load_evaluator, weights_path


def test_the_mnist_evaluator_is_shipped_small_and_described():
    path = weights_path("mnist")
    assert path.is_file() and path.stat().st_size < 500_000
    ev = load_evaluator("mnist")
    assert ev.dataset == "mnist" and ev.test_accuracy >= 0.993
    assert {"script_version", "seed", "epochs", "storage"} <= set(ev.metadata)


def test_the_evaluator_classifies_real_test_digits_at_its_recorded_accuracy(full_mnist_dir):
    ev = load_evaluator("mnist")
    test = data_mod.load_split("mnist", "test", full_mnist_dir, progress=False)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(3))[:2000]
    x, y = as_float(test.images[idx]), test.labels[idx]
    p = ev.predict_proba(x)
    assert p.shape == (2000, 10)
    torch.testing.assert_close(p.sum(1), torch.ones(2000), rtol=0, atol=1e-5)
    acc = (p.argmax(1) == y).float().mean().item()
    # A subset's accuracy scatters around the full test set's with this binomial standard error.
    se = math.sqrt(ev.test_accuracy * (1 - ev.test_accuracy) / len(y))
    assert abs(acc - ev.test_accuracy) < 4 * se + 1e-3
    f = ev.features(x[:64])
    assert f.shape == (64, FEATURES) and (f >= 0).all()  # ReLU features


def test_the_fashion_evaluator_is_shipped_for_its_own_dataset():
    ev = load_evaluator("fashion-mnist")
    assert ev.dataset == "fashion-mnist" and 0.88 <= ev.test_accuracy < 0.99


def test_an_unshipped_dataset_is_a_clear_error(monkeypatch, tmp_path):
    import vaedraw.evaluator as evaluator_mod

    monkeypatch.setattr(evaluator_mod, "BUNDLED_DIR", tmp_path)
    with pytest.raises(VaedrawError, match="fashion-mnist"):
        load_evaluator("fashion-mnist")


def test_the_evaluator_refuses_wrong_shapes():
    with pytest.raises(VaedrawError, match=r"\[N, 1, 28, 28\]"):
        load_evaluator("mnist").predict_proba(torch.zeros(3, 28, 28))


def test_features_and_proba_in_one_pass_match_the_separate_calls():
    ev = load_evaluator("mnist")
    x = torch.rand(2500, 1, 28, 28)  # more than one batch of the evaluator
    f, p = ev.features_and_proba(x)
    assert torch.equal(f, ev.features(x))
    torch.testing.assert_close(p, ev.predict_proba(x))
