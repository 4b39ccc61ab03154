"""Tests for the user's own images: `--dataset folder` (data/images.py) and `--dataset array` (data/arrays.py),
their pixel conversion (data/pixels.py), the cache (data/cache.py), provenance and reload (data/own.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_ARGS
from PIL import Image

from vaedraw import data
from vaedraw.config import build_config
from vaedraw.data import images as images_mod
from vaedraw.data import own, pixels
from vaedraw.errors import ConfigError, DataError

N_TRAIN, N_TEST = 9_000, 1_000  # MNIST digits written as PNG files (the bundled subset's sizes)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEDRAW_DATA_DIR", raising=False)
    data._reset_state()
    yield
    data._reset_state()


def _png(path: Path, pixels_: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels_, mode).save(path) if mode else Image.fromarray(pixels_).save(path)
    return path


def _noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _folder(root: Path, n_per_class: dict[str, int], shape=(8, 8, 3), seed: int = 0) -> Path:
    for k, (cls, n) in enumerate(n_per_class.items()):
        for i in range(n):
            _png(root / cls / f"{i:03d}.png", _noise(seed + 1000 * k + i, shape))
    return root


@pytest.fixture(scope="session")
def mnist_pngs(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The first 9,000 training and 1,000 test digits of `mnist_dir` as DIR/{train,test}/<label>/NNNNN.png,
    NNNNN the digit's index in its split; and those digits, as the built-in loader gives them."""
    root = tmp_path_factory.mktemp("mnist-png")
    want = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        s = data.load_split("mnist", split, mnist_dir, download=False)
        images, labels = s.images[:n].numpy(), s.labels[:n].numpy()
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(images[i]).save(root / split / str(labels[i]) / f"{i:05d}.png")
        want[split] = (images, labels)
    return root, want


# --- the folder layout against the built-in loader ----------------------------------------------------------


def test_mnist_written_as_png_class_folders_loads_the_same_pixels_and_labels(mnist_pngs) -> None:
    root, want = mnist_pngs
    train, test = data.load_dataset("folder", root, progress=False)
    for got, split in ((train, "train"), (test, "test")):
        images, labels = want[split]
        order = np.argsort(labels, kind="stable")  # the defined order: class folder, then file name
        assert got.images.dtype == torch.uint8 and got.images.shape == (len(labels), 28, 28)
        assert np.array_equal(got.images.numpy(), images[order])
        assert np.array_equal(got.labels.numpy(), labels[order])
        assert (got.shape, got.n_classes, got.name) == ((1, 28, 28), 10, f"folder/{split}")
    prov = train.provenance
    assert (prov["dataset"], prov["split"], prov["source"], prov["path"], prov["subset"]) == \
        ("folder", "train", "folder", str(root), False)
    assert prov["layout"] == "train/ and test/" and prov["classes"] == [str(d) for d in range(10)]
    assert prov["files"] == {"pixels": own.digest(train.images.numpy(), train.labels.numpy())}
    assert not data.overlaps(prov, test.provenance) and data.overlaps(prov, prov)


def test_the_second_load_reads_the_cache_and_decodes_nothing(tmp_path, monkeypatch) -> None:
    root = _folder(tmp_path / "imgs", {"a": 15, "b": 15})
    first = data.load_dataset("folder", root)
    entries = list((tmp_path / "cache" / "images").glob("*.npz"))
    assert len(entries) == 1
    data._reset_state()  # a new process: only the cache on disk is left

    def no_decoding(*args):  # noqa: ANN002, ANN202
        raise AssertionError("decoded although the cache holds the images")

    monkeypatch.setattr(images_mod, "decode_files", no_decoding)
    again = data.load_dataset("folder", root)
    for a, b in zip(first, again):
        assert a.images.equal(b.images) and a.labels.equal(b.labels) and a.provenance == b.provenance
    # a touched file changes the key: decoded again, to the same digest; the older entry is replaced
    monkeypatch.undo()
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    data._reset_state()
    os.utime(root / "a" / "000.png", ns=(1, 1))
    calls = []
    real = images_mod.decode_files
    monkeypatch.setattr(images_mod, "decode_files", lambda *a: calls.append(1) or real(*a))
    touched = data.load_dataset("folder", root)
    assert calls and touched[0].provenance["files"] == first[0].provenance["files"]
    assert [p.name for p in (tmp_path / "cache" / "images").glob("*.npz")] != [p.name for p in entries]
    assert len(list((tmp_path / "cache" / "images").glob("*.npz"))) == 1


def test_a_damaged_cache_entry_is_decoded_again(tmp_path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 6, "b": 6})
    first = data.load_dataset("folder", root)
    (entry,) = (tmp_path / "cache" / "images").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    data._reset_state()
    again = data.load_dataset("folder", root)
    assert again[0].images.equal(first[0].images)


def test_without_train_and_test_folders_a_fixed_tenth_is_held_out(tmp_path) -> None:
    root = _folder(tmp_path / "imgs", {"cat": 30, "dog": 25})
    train, test = data.load_dataset("folder", root)
    assert (len(train), len(test), train.n_classes, train.provenance["layout"]) == (50, 5, 2, "held out")
    everything = np.concatenate([np.asarray(Image.open(root / c / f"{i:03d}.png"))[None]
                                 for c, n in (("cat", 30), ("dog", 25)) for i in range(n)])
    mask = own.held_out(55, "x")
    assert mask.sum() == 5 and np.array_equal(mask, own.held_out(55, "y"))  # fixed: seed 0
    assert np.array_equal(test.images.numpy(), everything[mask])
    assert np.array_equal(train.images.numpy(), everything[~mask])
    assert own.held_out(200_000, "x").sum() == own.TEST_CAP
    assert own.held_out(2, "x").sum() == 1


def test_unlabelled_images_and_a_single_class_folder(tmp_path, capsys) -> None:
    flat = tmp_path / "flat"
    for i in range(12):
        _png(flat / f"{i}.png", _noise(i, (8, 8)))
    train, _ = data.load_dataset("folder", flat)
    assert train.n_classes == 0 and not train.labels.any()
    one = _folder(tmp_path / "one", {"only": 12})
    train, _ = data.load_dataset("folder", one)
    assert train.n_classes == 0 and not train.labels.any() and train.provenance["classes"] == []
    assert "one class folder (only)" in capsys.readouterr().err


# --- pixels: size, channels, modes ---------------------------------------------------------------------------


def test_resize_of_the_short_side_and_centre_crop(tmp_path) -> None:
    wide = _noise(1, (20, 40, 3))  # H 20, W 40: the centre square is columns 10..29
    tall = _noise(2, (30, 10, 3))
    _png(tmp_path / "imgs" / "wide.png", wide)
    _png(tmp_path / "imgs" / "tall.png", tall)
    with pytest.raises(DataError, match=r"wide\.png is 40x20 pixels but .*tall\.png is 10x30.*data\.image_size"):
        data.load_split("folder", "train", tmp_path / "imgs")
    both = np.concatenate([s.images.numpy() for s in data.load_dataset("folder", tmp_path / "imgs",
                                                                       options={"image_size": 8})])
    lanczos = Image.Resampling.LANCZOS
    # the short side resized to 8 (the long one in proportion), then the centre 8x8
    expect = {"tall": np.asarray(Image.fromarray(tall).resize((8, 24), lanczos).crop((0, 8, 8, 16))),
              "wide": np.asarray(Image.fromarray(wide).resize((16, 8), lanczos).crop((4, 0, 12, 8)))}
    assert both.shape == (2, 8, 8, 3)
    assert {a.tobytes() for a in both} == {a.tobytes() for a in expect.values()}


def test_grey_and_colour_conversion(tmp_path) -> None:
    grey = _noise(3, (8, 8))
    _png(tmp_path / "g" / "a.png", grey)
    _png(tmp_path / "g" / "b.png", np.repeat(grey[..., None], 3, axis=2))  # RGB whose channels agree: grey
    train, test = data.load_dataset("folder", tmp_path / "g")
    assert train.shape == (1, 8, 8) and train.images[0].equal(torch.from_numpy(grey))
    colour = _noise(4, (8, 8, 3))
    _png(tmp_path / "g" / "c.png", colour)
    images = torch.cat([s.images for s in data.load_dataset("folder", tmp_path / "g")]).numpy()
    assert images.shape == (3, 8, 8, 3)  # one colour image: all RGB, grey ones repeated
    assert any(np.array_equal(a, colour) for a in images)
    assert sum(np.array_equal(a, np.repeat(grey[..., None], 3, axis=2)) for a in images) == 2
    as_grey = torch.cat([s.images for s in data.load_dataset("folder", tmp_path / "g", options={"channels": 1})])
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    assert as_grey.shape == (3, 8, 8) and any(np.array_equal(a, luma) for a in as_grey.numpy())
    assert np.array_equal(pixels.luma(colour), luma)
    rgb = data.load_dataset("folder", tmp_path / "g", options={"channels": 3})[0]
    assert rgb.shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="data.channels=2"):
        data.load_split("folder", "train", tmp_path / "g", options={"channels": 2})


def test_palette_alpha_and_16_bit_images_convert_correctly(tmp_path) -> None:
    rgba = _noise(5, (6, 6, 4))
    _png(tmp_path / "rgba.png", rgba)
    expect = (rgba[..., :3].astype(int) * rgba[..., 3:] + 127) // 255  # composited on black
    assert np.array_equal(pixels.decode_file(str(tmp_path / "rgba.png"), pixels.Options()), expect)
    la = _noise(6, (6, 6, 2))
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(pixels.decode_file(str(tmp_path / "la.png"), pixels.Options()),
                          (la[..., 0].astype(int) * la[..., 1] + 127) // 255)
    deep = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    assert pixels.decode_file(str(tmp_path / "deep.png"), pixels.Options()).tolist() == [[0, 1, 128, 255]]
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    pal.putdata([0, 1, 2, 1] * 4)
    pal.save(tmp_path / "pal.gif", transparency=2)  # index 2 (blue) transparent: black
    got = pixels.decode_file(str(tmp_path / "pal.gif"), pixels.Options())
    assert got.shape == (4, 4, 3) and got[0].tolist() == [[0, 0, 0], [255, 0, 0], [0, 0, 0], [255, 0, 0]]
    Image.fromarray(_noise(7, (8, 8, 3))).save(tmp_path / "photo.jpg", quality=90)
    assert pixels.decode_file(str(tmp_path / "photo.jpg"), pixels.Options(image_size=4)).shape == (4, 4, 3)


# --- arrays -------------------------------------------------------------------------------------------------


def test_an_npz_with_its_test_split_round_trips(tmp_path) -> None:
    x, x_test = _noise(8, (50, 12, 12, 3)), _noise(9, (10, 12, 12, 3))
    y, y_test = np.arange(50) % 4, np.arange(10) % 4
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x_test, y_test=y_test)  # keras' layout
    train, test = data.load_dataset("array", tmp_path / "d.npz")
    assert np.array_equal(train.images.numpy(), x) and np.array_equal(test.images.numpy(), x_test)
    assert train.labels.tolist() == y.tolist() and test.labels.tolist() == y_test.tolist()
    assert (train.shape, train.n_classes, train.provenance["source"], train.provenance["layout"]) == \
        ((3, 12, 12), 4, "array", "x_test")
    assert data.load_recorded(test.provenance, "test").images.equal(test.images)


def test_an_npy_is_unlabelled_with_a_held_out_split_in_its_own_order(tmp_path) -> None:
    x = _noise(10, (40, 8, 8, 1))
    np.save(tmp_path / "d.npy", x)
    train, test = data.load_dataset("array", tmp_path / "d.npy", options={"image_size": 4})
    mask = own.held_out(40, "x")
    assert (len(train), len(test), train.n_classes, train.shape) == (36, 4, 0, (1, 4, 4))
    assert np.array_equal(test.images.numpy()[0], pixels.resize(x[mask][0, ..., 0], 4))
    np.savez(tmp_path / "rgba.npz", images=_noise(11, (20, 4, 4, 4)))
    assert data.load_split("array", "train", tmp_path / "rgba.npz").shape == (3, 4, 4)


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.zeros((5, 8, 8), np.float32)}, ["d.npz: x is float32", "uint8", "astype"]),
    ({"x": np.zeros((5, 64), np.uint8)}, ["d.npz: x has shape (5, 64)", "(N, H, W)"]),
    ({"x": np.zeros((5, 3, 8, 8), np.uint8)}, ["d.npz: x is (5, 3, 8, 8), channels first", "transpose"]),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(4, np.int64)}, ["d.npz: y has shape (4,)", "5 images"]),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.zeros(5, np.float32)}, ["d.npz: y is float32", "integers"]),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": -np.ones(5, np.int64)}, ["d.npz: y holds the label -1"]),
    ({"pictures": np.zeros((5, 8, 8), np.uint8)}, ["d.npz: no array of images", "x, images, x_train"]),
    ({"x": np.zeros((5, 8, 8), np.uint8), "images": np.zeros((5, 8, 8), np.uint8)}, ["d.npz: holds x and images"]),
    ({"x": np.zeros((5, 8, 8), np.uint8), "y": np.arange(5), "x_test": np.zeros((2, 8, 8), np.uint8)},
     ["d.npz: x_test has no labels", "y_test"]),
    ({"x": np.array([None] * 5, dtype=object)}, ["d.npz: x is object"]),
])
def test_a_bad_array_file_is_one_error_naming_the_file_and_key(tmp_path, arrays, words) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as refused:
        data.load_split("array", "train", tmp_path / "d.npz")
    assert all(w in str(refused.value) for w in words), str(refused.value)


def test_array_paths_that_are_no_array_file(tmp_path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "d.txt").write_text("1 2 3")
    for path, words in ((tmp_path / "junk.npz", "junk.npz: not a readable .npz"), (tmp_path, "is a folder"),
                        (tmp_path / "nope.npz", "nope.npz does not exist"), (tmp_path / "d.txt", "d.txt: expected")):
        with pytest.raises(DataError, match=words):
            data.load_split("array", "train", path)
    with pytest.raises(DataError, match="--dataset array needs --data-dir FILE"):
        data.load_split("array", "train")


# --- bad folders --------------------------------------------------------------------------------------------


def test_unreadable_files_are_skipped_and_counted_but_none_readable_is_an_error(tmp_path, capsys) -> None:
    root = _folder(tmp_path / "imgs", {"a": 10, "b": 10})
    good = (root / "a" / "000.png").read_bytes()
    (root / "a" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "b" / "text.jpg").write_text("hello")  # not an image at all
    (root / "b" / "notes.txt").write_text("not an image by its name")
    train, test = data.load_dataset("folder", root)
    assert len(train) + len(test) == 20
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s) of 22" in err and str(root / "a" / "cut.png") in err
    assert "ignored 1 file(s)" in err and "notes.txt" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"none of its 1 image files could be read \(first: .*bad/cut\.png"):
        data.load_split("folder", "train", bad)


def test_empty_and_misshapen_folders_are_errors_naming_them(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty} holds no image files"):
        data.load_split("folder", "train", empty)
    (empty / "README.txt").write_text("hi")
    with pytest.raises(DataError, match=r"holds no image files .*README\.txt"):
        data.load_split("folder", "train", empty)
    with pytest.raises(DataError, match="nope does not exist"):
        data.load_split("folder", "train", tmp_path / "nope")
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"a\.npy is not a folder.*--dataset array"):
        data.load_split("folder", "train", tmp_path / "a.npy")
    with pytest.raises(DataError, match="--dataset folder needs --data-dir DIR"):
        data.load_split("folder", "train")
    half = _folder(tmp_path / "half" / "train", {"a": 3, "b": 3}).parent
    with pytest.raises(DataError, match=f"{half} has train/ but no test/"):
        data.load_split("folder", "train", half)
    loose = _folder(tmp_path / "loose", {"a": 3, "b": 3})
    _png(loose / "stray.png", _noise(0, (8, 8, 3)))
    with pytest.raises(DataError, match=r"loose/stray\.png: an image beside the class folders"):
        data.load_split("folder", "train", loose)
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    _folder(tmp_path / "hollow", {"b": 3})
    with pytest.raises(DataError, match=r"hollow/a: a class folder without images"):
        data.load_split("folder", "train", tmp_path / "hollow")
    one = tmp_path / "single"
    _png(one / "x.png", _noise(0, (8, 8)))
    with pytest.raises(DataError, match="single: holds 1 usable image"):
        data.load_split("folder", "train", one)


def test_a_test_class_the_training_split_lacks_is_an_error(tmp_path) -> None:
    _folder(tmp_path / "d" / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "d" / "test", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"test/zebra: a class folder that .*train does not have"):
        data.load_split("folder", "train", tmp_path / "d")


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch) -> None:
    root = _folder(tmp_path / "imgs", {"a": 3, "b": 3}, shape=(32, 32))  # 1,024 pixels each
    for limit in (600, 300):  # over the limit: Pillow warns (an error here); over twice the limit: it refuses
        data._reset_state()
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(DataError, match=r"imgs/a/000\.png: decompression bomb.*shrink or remove it"):
            data.load_split("folder", "train", root)


def test_a_symbolic_link_loop_is_followed_once(tmp_path, capsys) -> None:
    root = _folder(tmp_path / "imgs", {"a": 5, "b": 5})
    (root / "a" / "again").symlink_to(root / "a")
    (root / "b" / "up").symlink_to(root)
    train, test = data.load_dataset("folder", root)
    assert len(train) + len(test) == 10
    assert "skipped 2 symbolic link(s) back to a folder already read" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_files_and_folders_without_permission(tmp_path, capsys) -> None:
    root = _folder(tmp_path / "imgs", {"a": 5, "b": 5})
    (root / "a" / "000.png").chmod(0)
    train, test = data.load_dataset("folder", root)
    assert len(train) + len(test) == 9 and "000.png: permission denied" in capsys.readouterr().err
    (root / "b").chmod(0)
    try:
        data._reset_state()
        with pytest.raises(DataError, match=r"cannot read the folder .*imgs/b"):
            data.load_split("folder", "train", root)
    finally:
        (root / "b").chmod(0o755)


def test_a_data_set_too_big_for_memory_is_refused_up_front(tmp_path, monkeypatch) -> None:
    root = _folder(tmp_path / "imgs", {"a": 5, "b": 5})
    monkeypatch.setattr(own, "available_memory", lambda: 1000)
    monkeypatch.setattr(images_mod, "decode_files", lambda *a: pytest.fail("decoded before the memory check"))
    with pytest.raises(DataError, match=r"imgs: 10 images of 3x8x8 would take .* more than half of the .*available"):
        data.load_split("folder", "train", root)
    np.save(tmp_path / "big.npy", np.zeros((100, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"big\.npy: 100 images of 1x8x8"):
        data.load_split("array", "train", tmp_path / "big.npy")


# --- provenance and later commands ----------------------------------------------------------------------------


def test_load_recorded_reads_the_same_images_and_refuses_changed_or_missing_ones(tmp_path) -> None:
    root = _folder(tmp_path / "imgs", {"a": 10, "b": 10})
    train, test = data.load_dataset("folder", root, options={"image_size": 4, "channels": 1})
    record = json.loads(json.dumps({"train": train.provenance, "test": test.provenance}))  # as data.json
    data._reset_state()
    again = data.load_recorded(record["train"], "train")
    assert again.images.equal(train.images) and again.shape == (1, 4, 4)  # the recorded conversion
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert data.load_recorded(record["test"], "test", copy).images.equal(test.images)
    _png(root / "a" / "003.png", _noise(99, (8, 8, 3)))  # another picture under the same name
    data._reset_state()
    with pytest.raises(DataError, match=r"imgs holds other train images than the run was trained on.*restore"):
        data.load_recorded(record["train"], "train")
    shutil.rmtree(root)
    with pytest.raises(DataError, match=r"this run was trained on the images in .*imgs, which cannot be read now"):
        data.load_recorded(record["train"], "train")


def test_an_array_file_that_changed_is_refused(tmp_path) -> None:
    np.save(tmp_path / "d.npy", _noise(1, (30, 4, 4)))
    train = data.load_split("array", "train", tmp_path / "d.npy")
    time.sleep(0.01)
    np.save(tmp_path / "d.npy", _noise(2, (30, 4, 4)))
    with pytest.raises(DataError, match=r"d\.npy holds other train images"):
        data.load_recorded(train.provenance, "train")


def test_the_registry_and_config_know_the_new_data_sets() -> None:
    for name in ("folder", "array"):
        spec = data.DATASETS[name]
        assert (spec.shape, spec.n_classes, spec.own_data, spec.likelihood) == (None, None, True, "logistic_mixture")
    cfg = build_config("default", overrides={"data.dataset": "folder", "data.image_size": "32", "data.channels": "3"})
    assert (cfg.data.dataset, cfg.data.image_size, cfg.data.channels) == ("folder", 32, 3)
    assert data.Options.of(cfg.data) == data.Options(32, 3)
    with pytest.raises(DataError, match=r"mnist, fashion-mnist; or, for your own images, folder or array"):
        data.load_split("cifar", "train")


# --- end to end -----------------------------------------------------------------------------------------------


def _coloured_digits(root: Path, mnist_dir: Path) -> Path:
    """40 MNIST digits, each in a random colour on a random-colour 32x32 background, in two class folders."""
    digits = data.load_split("mnist", "test", mnist_dir, download=False)
    rng = np.random.default_rng(0)
    for i in range(40):
        ink, paper = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        a = np.zeros((32, 32), np.float64)
        a[2:30, 2:30] = digits.images[i].numpy() / 255
        img = (a[..., None] * ink + (1 - a[..., None]) * paper).round().astype(np.uint8)
        _png(root / ("small" if digits.labels[i] < 5 else "large") / f"{i:02d}.png", img)
    return root


def test_train_three_steps_on_a_colour_folder(tmp_path, mnist_dir, capsys) -> None:
    from vaedraw.cli import main
    from vaedraw.run import load_run

    root = _coloured_digits(tmp_path / "colour", mnist_dir)
    out = tmp_path / "run"
    args = [a for a in TINY_RUN_ARGS if a not in ("--steps", "6")]
    code = main(["train", "--dataset", "folder", "--data-dir", str(root), "--out", str(out), "--steps", "3",
                 "--set", "model.arch=conv", "--set", "sample.fit_gmm=false", "--set", "sample.sampler=prior", *args])
    err = capsys.readouterr().err
    assert code == 0, err
    run = load_run(out, device="cpu")
    assert run.model.image_shape == (3, 32, 32)
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["train"]["source"] == "folder" and recorded["train"]["path"] == str(root)
    assert run.load_split("test").images.shape == (4, 32, 32, 3)
    assert run.sample(2, seed=0).shape == (2, 3, 32, 32)


def test_data_image_size_from_the_command_line_resizes(tmp_path, mnist_dir, capsys) -> None:
    from vaedraw.cli import main
    from vaedraw.run import load_run

    root = _coloured_digits(tmp_path / "colour", mnist_dir)
    args = [a for a in TINY_RUN_ARGS if a not in ("--steps", "6")]
    code = main(["train", "--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--set", "data.image_size=16", "--set", "sample.fit_gmm=false",
                 "--set", "sample.sampler=prior", *args])
    assert code == 0, capsys.readouterr().err
    assert load_run(tmp_path / "run", device="cpu").model.image_shape == (3, 16, 16)
