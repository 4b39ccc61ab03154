"""Tests for vaedraw.export: every preset's architecture exports to ONNX graphs that onnxruntime runs with
PyTorch's outputs at any batch size, model.json describes them, the command writes them, refusals are clear,
and the README's example draws digits with onnxruntime and numpy alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from vaedraw import export  # noqa: E402
from vaedraw.cli import main  # noqa: E402
from vaedraw.config import PRESETS, build_config  # noqa: E402
from vaedraw.errors import VaedrawError  # noqa: E402
from vaedraw.models import build_model  # noqa: E402
from vaedraw.models.conv import ConvVAE  # noqa: E402
from vaedraw.objectives import pixel_mean  # noqa: E402
from vaedraw.sample import GaussianMixture, decode_means  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
TOL = 1e-4
# Small networks of each preset's architecture (the seed network has the article's fixed sizes), with
# dropout on so that eval mode is what is exported.
CASES = {
    "seed": ("seed", {}),
    "default": ("default", {"model.conv.channels": 8, "model.conv.hidden": 32, "model.dropout": 0.3}),
    "conditional": ("conditional", {"model.conv.channels": 8, "model.conv.hidden": 32, "model.dropout": 0.3}),
    "logistic_mixture": ("default", {"model.conv.channels": 8, "model.conv.hidden": 32,
                                     "model.likelihood": "logistic_mixture", "data.binarize": "none"}),
}
if "hierarchical" in PRESETS:
    CASES["hierarchical"] = ("hierarchical", {"model.hierarchical.channels": 8, "model.hierarchical.hidden": 32,
                                              "model.hierarchical.latent_channels": 4, "model.latent_dim": 6})


def _reference(model, inputs: dict[str, torch.Tensor]):
    """PyTorch's pixel means and code posterior for the graphs' inputs, dropout off, float32."""
    y = inputs.get("label")
    eps = [inputs[k] for k in sorted(inputs) if k.startswith("eps_")] or None
    with torch.no_grad():
        x_mean = pixel_mean(model.decode(inputs["code"], y, eps).float(), model.likelihood, model.image_shape[0])
        mu, logvar = model.encode(inputs["image"], y)
    return x_mean.numpy(), mu.numpy(), logvar.numpy()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    preset, overrides = CASES[request.param]
    cfg = build_config(preset, overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28)).eval()
    out = tmp_path_factory.mktemp(f"onnx-{request.param}") / "export"
    paths = export.export_model(model, out, preset=cfg.preset, arch=cfg.model.arch, temperature=0.8)
    return request.param, cfg, model, out, paths


@pytest.mark.parametrize("n", [5, 1, 7])  # 5 as traced; others prove the batch dimension is dynamic
def test_the_graphs_compute_what_pytorch_computes(exported, n):
    _, _, model, out, _ = exported
    meta = json.loads((out / "model.json").read_text())
    g = torch.Generator().manual_seed(n)
    inputs = {"code": torch.randn(n, model.code_dim, generator=g), "image": torch.rand(n, *model.image_shape,
                                                                                      generator=g)}
    if model.n_classes:
        inputs["label"] = torch.arange(n) % model.n_classes
    for i, shape in enumerate(model.lower_shapes):
        inputs[f"eps_{i}"] = 0.7 * torch.randn(n, *shape, generator=g)
    x_mean, mu, logvar = _reference(model, inputs)

    def feeds(graph):
        return {i["name"]: inputs[i["name"]].numpy() for i in meta[graph]["inputs"]}

    (got,) = export.run_onnx(out / "decoder.onnx", feeds("decoder"))
    assert got.shape == (n, *model.image_shape) and got.dtype == np.float32
    assert np.abs(got - x_mean).max() < TOL
    assert got.min() >= 0 and got.max() <= 1
    got_mu, got_logvar = export.run_onnx(out / "encoder.onnx", feeds("encoder"))
    assert got_mu.shape == got_logvar.shape == (n, model.code_dim)
    assert np.abs(got_mu - mu).max() < TOL and np.abs(got_logvar - logvar).max() < TOL


def test_zero_noise_is_the_lower_groups_at_their_prior_means(exported):
    """What every picture of the package shows for a code (decode_means) is the decoder graph with eps = 0."""
    _, _, model, out, _ = exported
    meta = json.loads((out / "model.json").read_text())
    z = torch.randn(4, model.code_dim, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2, 3, 4]) if model.n_classes else None
    feeds = {"code": z.numpy()}
    for inp in meta["decoder"]["inputs"][1:]:
        feeds[inp["name"]] = y.numpy() if inp["name"] == "label" else np.zeros((4, *inp["shape"][1:]), np.float32)
    (got,) = export.run_onnx(out / "decoder.onnx", feeds)
    if model.likelihood != "logistic_mixture":  # decode_means shows sigmoid means of the other likelihoods
        assert np.abs(got - decode_means(model, z, y, precision="fp32").numpy()).max() < TOL


def test_the_graphs_hold_no_random_or_dropout_node(exported):
    _, _, _, out, _ = exported
    for name in ("decoder.onnx", "encoder.onnx"):
        graph = onnx.load(str(out / name))
        assert not {n.op_type for n in graph.graph.node} & export.RANDOM_OPS
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named (dynamic) batch dimension


def test_model_json_describes_the_graphs(exported):
    case, cfg, model, out, paths = exported
    assert paths == [out / "decoder.onnx", out / "encoder.onnx", out / "model.json"]
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]  # no temp left
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "vaedraw-onnx" and meta["preset"] == cfg.preset and meta["arch"] == cfg.model.arch
    assert meta["image_shape"] == [1, 28, 28] and meta["latent_dim"] == model.code_dim
    assert meta["n_classes"] == model.n_classes and meta["likelihood"] == cfg.model.likelihood
    names = [i["name"] for i in meta["decoder"]["inputs"]]
    expected = ["code"] + (["label"] if model.n_classes else []) + [f"eps_{i}" for i in range(len(model.lower_shapes))]
    assert names == expected
    assert [i["name"] for i in meta["encoder"]["inputs"]] == ["image"] + (["label"] if model.n_classes else [])
    assert [o["name"] for o in meta["decoder"]["outputs"]] == ["x_mean"]
    assert [o["name"] for o in meta["encoder"]["outputs"]] == ["mu", "logvar"]
    assert meta["lower_shapes"] == [list(s) for s in model.lower_shapes]
    if case == "hierarchical":
        assert meta["lower_shapes"]  # the hierarchy's lower groups are inputs of the decoder
    assert meta["sampler"] == {"default": "prior", "prior": {"temperature": 0.8}, "gmm": None}
    for graph, name in (("decoder", "decoder.onnx"), ("encoder", "encoder.onnx")):
        session_inputs = [i.name for i in onnx.load(str(out / name)).graph.input]
        assert session_inputs == [i["name"] for i in meta[graph]["inputs"]]


# ----------------------------------------------------------------------------- the command on a trained run
@pytest.fixture(scope="module")
def exported_run(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-run") / "exported"
    assert main(["export", str(tiny_run), "--onnx", str(out)]) == 0
    return tiny_run, out


def test_the_command_exports_a_trained_run_with_its_mixture(exported_run, capsys):
    run_dir, out = exported_run
    meta = json.loads((out / "model.json").read_text())
    gmm = GaussianMixture.load(run_dir / "gmm.safetensors")
    mix = meta["sampler"]["gmm"]
    assert meta["sampler"]["default"] == "gmm" and meta["step"] == 6 and meta["preset"] == "default"
    assert sum(mix["weights"]) == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(mix["weights"], gmm.weights.numpy(), atol=1e-6)
    assert np.allclose(mix["means"], gmm.means.numpy(), atol=1e-6)
    cov = np.asarray(mix["covariances"])
    tril = gmm.scale_tril.double().numpy()
    assert cov.shape == (len(gmm.weights), meta["latent_dim"], meta["latent_dim"])
    assert np.allclose(cov, tril @ tril.transpose(0, 2, 1), atol=1e-6) and np.allclose(cov, cov.transpose(0, 2, 1))
    assert mix["labels"] is None


def test_exporting_again_replaces_the_files_in_place(exported_run, tmp_path):
    run_dir, first = exported_run
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.json").write_text("old")
    assert main(["export", str(run_dir), "--onnx", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json", "notes.txt"]
    assert json.loads((out / "model.json").read_text()) == json.loads((first / "model.json").read_text())


@pytest.mark.parametrize("run_fixture", ["tiny_run", "tiny_conditional_run"])
def test_the_readme_example_draws_digits_without_torch(run_fixture, request, tmp_path):
    """The README's example, run as written in a folder holding export/, with torch made unimportable."""
    from PIL import Image

    out = tmp_path / "export"
    assert main(["export", str(request.getfixturevalue(run_fixture)), "--onnx", str(out)]) == 0
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lacks the ONNX example block after <!-- onnx-example -->"
    code = match.group(1)
    assert "torch" not in code and len(code.strip().splitlines()) <= 14
    no_torch = "import sys; sys.modules['torch'] = None; sys.modules['vaedraw'] = None\n"
    done = subprocess.run([sys.executable, "-c", no_torch + code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "digits.png") as im:
        assert im.size == (10 * 28, 28) and im.mode == "L"
        assert 0 < np.asarray(im).mean() < 255


# ----------------------------------------------------------------------------- refusals
class NoisyDecoder(ConvVAE):
    """Draws its noise inside decode: not a deterministic graph."""

    def decode(self, z, y=None, eps=None):
        return super().decode(z + 0.1 * torch.randn_like(z), y, eps)


class BranchingDecoder(ConvVAE):
    """A branch on the data's values, which a traced graph cannot hold."""

    def decode(self, z, y=None, eps=None):
        out = super().decode(z, y, eps)
        return out if z.sum() > 0 else -out


@pytest.mark.parametrize("cls,message", [
    (NoisyDecoder, r"model.arch=noisy cannot be exported to ONNX: its decoder draws random numbers .*RandomNormal"),
    (BranchingDecoder, r"model.arch=noisy cannot be exported to ONNX: the exporter failed on its decoder \(\w+: "),
])
def test_a_network_that_cannot_be_exported_is_refused_and_nothing_is_written(cls, message, tmp_path):
    cfg = build_config("default", overrides={"model.conv.channels": 4, "model.conv.hidden": 8})
    model = cls(cfg.model, (1, 28, 28))
    out = tmp_path / "out"
    with pytest.raises(VaedrawError, match=message) as refused:
        export.export_model(model, out, preset="default", arch="noisy")
    assert "\n" not in str(refused.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_without_the_packages_export_is_a_usage_error_naming_the_extra(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "out"
    assert main(["export", str(tiny_run), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "pip install 'vaedraw[onnx]'" in err and err.count("\n") == 1
    assert not out.exists()


def test_an_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["export", str(tmp_path / "no-such-run"), "--onnx", str(target)]) == 6
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "decoder.onnx").mkdir()
    assert main(["export", str(tmp_path / "no-such-run"), "--onnx", str(tmp_path / "dir")]) == 6
    assert "is a folder" in capsys.readouterr().err
