"""`vaedraw train-evaluator` (evaluator.train_evaluator): the evaluator classifier trained on any labelled data
set, stored in the cache, found by `vaedraw eval` for the data it was trained on and for no other; and the
shipped MNIST evaluator unchanged by the network's generalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import toy_dataset

from vaedraw import data
from vaedraw.cli import main
from vaedraw.config import build_config
from vaedraw.errors import EXIT_DATA, EXIT_USAGE, VaedrawError
from vaedraw.evaluate import evaluate_run
from vaedraw.evaluator import (cache_path, load_evaluator, load_evaluator_file, load_training_data,
                               train_evaluator)
from vaedraw.run import load_run

# The shipped MNIST evaluator's class probabilities for the bundled subset's first four test digits,
# as computed before the network took other shapes (adaptive pooling, upsampling of small images).
EXPECTED_MNIST = [
    [0.00046748968, 3.6305707e-08, 1.4389701e-07, 2.4009243e-08, 2.6234562e-05, 1.0286407e-05, 0.99943513,
     3.1373844e-09, 5.8279016e-05, 2.3928212e-06],
    [8.3908258e-09, 5.7095525e-07, 8.2909827e-07, 2.1916851e-07, 5.6448211e-09, 8.0147569e-09, 5.2217835e-12,
     0.99999774, 2.2267552e-09, 6.0617242e-07],
    [3.4833978e-05, 8.9857758e-07, 3.9525953e-06, 2.549612e-05, 0.00013547779, 1.0472721e-05, 2.8507228e-07,
     0.00013999177, 0.00073315052, 0.99891543],
    [0.9999634, 2.1775813e-08, 4.4759245e-06, 2.1833122e-08, 3.6404177e-08, 2.2374181e-07, 1.9408664e-05,
     2.70424e-08, 1.091473e-05, 1.4488635e-06],
]
QUICK = ["--epochs", "4", "--batch-size", "16", "--no-progress"]  # 64 steps: about a second on one core


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEDRAW_DATA_DIR", raising=False)
    monkeypatch.setitem(data.DATASETS, toy_dataset.SPEC.name, toy_dataset.SPEC)
    data._reset_state()
    yield
    data._reset_state()


def _labelled_npz(path, seed: int, n: int = 40, labels: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    np.savez(path, x=x, **({} if labels is None else {"y": labels}))
    return path


def test_the_shipped_mnist_evaluator_gives_the_same_probabilities_as_before():
    ev = load_evaluator("mnist")
    x = data.to_float(data.mnist._bundled_split("test").images[:4])
    torch.testing.assert_close(ev.predict_proba(x), torch.tensor(EXPECTED_MNIST), rtol=0, atol=1e-5)
    assert ev.shape == (1, 28, 28) and ev.n_classes == 10


def test_train_evaluator_learns_toy_squares_and_stores_it_in_the_cache(tmp_path, capsys):
    assert main(["train-evaluator", "--dataset", "toy-squares", *QUICK]) == 0
    path = cache_path("toy-squares")
    assert path == tmp_path / "cache" / "evaluators" / "evaluator-toy-squares.safetensors" and path.is_file()
    assert str(path) in capsys.readouterr().out
    ev = load_evaluator("toy-squares")
    assert ev.test_accuracy >= 0.95  # an easy task: the square's quadrant
    meta = ev.metadata
    assert meta["shape"] == [3, 16, 16] and meta["n_classes"] == 4 and meta["epochs"] == 4 and meta["seed"] == 0
    assert meta["dataset"] == "toy-squares" and meta["storage"] == "float16"
    # the recorded accuracy is that of the stored weights on the test split
    test = data.load_split("toy-squares", "test")
    p = ev.predict_proba(data.to_float(test.images))
    assert p.shape == (64, 4) and (p.argmax(1) == test.labels).float().mean().item() == ev.test_accuracy
    assert ev.features(data.to_float(test.images[:5])).shape == (5, 128)
    with pytest.raises(VaedrawError, match=r"\[N, 3, 16, 16\]"):
        ev.predict_proba(torch.zeros(2, 1, 28, 28))


def test_training_is_deterministic_and_leaves_torch_as_it_was(tmp_path):
    train, test = load_training_data(dataset="toy-squares")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_evaluator(train, test, epochs=1, batch_size=32, out=tmp_path / "a.safetensors", progress=False)
    b = train_evaluator(train, test, epochs=1, batch_size=32, out=tmp_path / "b.safetensors", progress=False)
    assert torch.equal(torch.get_rng_state(), before) and not torch.are_deterministic_algorithms_enabled()
    sa, sb = (load_evaluator_file(m["out"]).net.state_dict() for m in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_eval_uses_the_trained_evaluator_for_a_run_on_that_data(tmp_path):
    from vaedraw.train import train

    cfg = build_config("default", overrides={
        "data.dataset": "toy-squares", "model.latent_dim": "4", "model.conv.channels": "8",
        "model.conv.hidden": "32", "train.steps": "3", "train.batch_size": "32", "train.log_every": "3",
        "train.eval_every": "3", "train.picture_every": "3", "train.checkpoint_every": "3",
        "train.eval_images": "32", "sample.gmm_components": "2"})
    run_dir = train(cfg, tmp_path / "run", device="cpu", progress=False, argv=["test"])
    before = evaluate_run(load_run(run_dir, "cpu"), iwae_k=2, n_samples=40, n_images=16, progress=False,
                          fd_bootstrap=0)
    assert before["quality_available"] is False and before["samples"] is None
    assert "vaedraw train-evaluator --dataset toy-squares" in before["quality_note"]
    assert main(["train-evaluator", str(run_dir), *QUICK]) == 0  # the data the run recorded
    res = evaluate_run(load_run(run_dir, "cpu"), iwae_k=2, n_samples=40, n_images=16, progress=False,
                       fd_bootstrap=0)
    assert res["quality_available"] is True and "toy-squares" in res["quality_note"]
    assert res["evaluator_accuracy"] == load_evaluator("toy-squares").test_accuracy >= 0.95
    assert res["samples"]["n"] == 40 and len(res["samples"]["class_shares"]) == 4
    assert res["reconstructions"]["n"] == 16 and res["fd_floor"] >= 0


def test_an_evaluator_of_other_images_is_never_used(tmp_path):
    a, b = _labelled_npz(tmp_path / "a.npz", 0, labels=np.arange(40) % 2), \
        _labelled_npz(tmp_path / "b.npz", 1, labels=np.arange(40) % 2)
    assert main(["train-evaluator", "--dataset", "array", "--data-dir", str(a), "--epochs", "1", "--no-progress"]) == 0
    prov_a = data.load_split("array", "train", a).provenance
    prov_b = data.load_split("array", "train", b).provenance
    ev = load_evaluator("array", provenance=prov_a)
    assert ev.metadata["data_digest"] == prov_a["files"]["pixels"] and ev.shape == (3, 8, 8)
    assert cache_path("array", prov_a).name == f"evaluator-array-{prov_a['files']['pixels'][:16]}.safetensors"
    with pytest.raises(VaedrawError, match=f"train-evaluator --dataset array --data-dir {b}"):
        load_evaluator("array", provenance=prov_b)
    # a file under the other data's name still carries its own digest, and is refused
    cache_path("array", prov_b).write_bytes(cache_path("array", prov_a).read_bytes())
    with pytest.raises(VaedrawError, match="no evaluator classifier for these 'array' images"):
        load_evaluator("array", provenance=prov_b)


@pytest.mark.parametrize("labels", [None, np.zeros(40, dtype=np.int64)], ids=["unlabelled", "one class"])
def test_unlabelled_or_single_class_data_is_refused(tmp_path, capsys, labels):
    path = _labelled_npz(tmp_path / "x.npz", 0, labels=labels)
    assert main(["train-evaluator", "--dataset", "array", "--data-dir", str(path), "--no-progress"]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "unlabelled or has a single class" in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "evaluators").exists()


def test_command_line_mistakes_are_one_line_errors(tmp_path, capsys):
    cases = [(["toy-run", "--dataset", "toy-squares"], "RUN_DIR or --dataset, not both"),
             (["--dataset", "toy-squares", "--set", "model.latent_dim=2"], "data.image_size and data.channels only"),
             (["--dataset", "mnist"], "ships an evaluator for mnist"),
             (["--dataset", "toy-squares", "--out", str(tmp_path / "e.pt")], ".safetensors"),
             ([str(tmp_path / "nowhere")], "does not exist")]
    for argv, message in cases:
        assert main(["train-evaluator", *argv]) == EXIT_USAGE, argv
        assert message in capsys.readouterr().err
