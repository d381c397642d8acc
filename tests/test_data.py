"""Datasets: readers on tiny files in each dataset's real format, search/errors, loaders."""

from __future__ import annotations

import gzip
import io
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from gkp import data
from gkp.data import (
    DatasetNotFoundError,
    TensorLoader,
    example_input,
    get_dataset_spec,
    list_datasets,
    load_data,
    random_crop_flip,
    stratified_subset,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _pixels(x: torch.Tensor, spec: data.DatasetSpec) -> torch.Tensor:
    """Undo normalisation back to 0..255 uint8."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- registry


def test_registry_names_specs_and_errors():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "imagenet", "synthetic"]
    fm = get_dataset_spec("Fashion_MNIST")
    assert (fm.name, fm.num_classes, fm.in_channels, fm.image_size) == ("fashion-mnist", 10, 1, 28)
    assert get_dataset_spec("cifar100").num_classes == 100
    assert get_dataset_spec("imagenet").image_size == 224
    assert example_input("cifar10", batch=2).shape == (2, 3, 32, 32)
    assert example_input("fashion-mnist").shape == (1, 1, 28, 28)
    with pytest.raises(ValueError, match="cifar10, cifar100, fashion-mnist, imagenet, synthetic"):
        get_dataset_spec("mnist")
    with pytest.raises(ValueError, match="mnist"):
        load_data("mnist")
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(
            "cifar10", num_classes=1, in_channels=1, image_size=1, mean=(0,), std=(1,)
        )(lambda spec, opts: (None, None))
    assert get_dataset_spec("cifar10").num_classes == 10  # the failed duplicate changed nothing


# ---------------------------------------------------------------- CIFAR


def _cifar_batch(ids: range, labels_key: bytes, num_classes: int) -> dict[bytes, object]:
    """A batch in CIFAR's pickle layout; image ``i`` has pixel 0 = i and label i % classes."""
    rng = np.random.default_rng(len(ids))
    x = rng.integers(0, 256, (len(ids), 3072), dtype=np.uint8)
    x[:, 0] = list(ids)
    return {b"batch_label": b"x", b"data": x, labels_key: [i % num_classes for i in ids]}


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote ``str`` (BINSTRING opcodes, no ``_codecs.encode``)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        op = (
            pickle.SHORT_BINSTRING + bytes([n])
            if n < 256
            else pickle.BINSTRING + n.to_bytes(4, "little")
        )
        self.write(op + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _py2_style(obj) -> bytes:
    """A pickle laid out as the real CIFAR files: protocol 2, Python 2 strings, numpy < 2 names."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, protocol=None) -> Path:
    """CIFAR-10's files; ``protocol`` is a pickle protocol, or "py2" for real files' layout."""

    def dumps(obj) -> bytes:
        if protocol == "py2":
            return _py2_style(obj)
        return pickle.dumps(obj, protocol=protocol)

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        ids = range(b * per_batch, (b + 1) * per_batch)
        (folder / f"data_batch_{b + 1}").write_bytes(dumps(_cifar_batch(ids, b"labels", 10)))
    test = _cifar_batch(range(100, 100 + n_test), b"labels", 10)
    (folder / "test_batch").write_bytes(dumps(test))
    (folder / "batches.meta").write_bytes(dumps({b"label_names": [b"a"] * 10}))
    return folder


def test_cifar10_pickles_load_with_pixels_labels_and_normalisation(tmp_path):
    folder = _write_cifar10(tmp_path)
    test = pickle.loads((folder / "test_batch").read_bytes())
    for where in (tmp_path, folder):  # the root holding the folder, or the folder itself
        train, test_loader, spec = load_data(
            "cifar10", data_dir=where, augment=False, batch_size=8, eval_batch_size=4
        )
        assert (len(train), train.num_samples, len(test_loader)) == (3, 20, 2)
        x, y = _collect(test_loader)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (6, 3, 32, 32)
        expected = torch.from_numpy(test[b"data"]).view(6, 3, 32, 32)
        assert torch.equal(_pixels(x, spec), expected)
        assert torch.allclose(x[0, 1], (expected[0, 1] / 255 - 0.4822) / 0.2435, atol=1e-5)
        assert y.tolist() == test[b"labels"]
        xt, yt = _collect(train)  # shuffled: every image once, still with its own label
        ids = _pixels(xt, spec)[:, 0, 0, 0].long()
        assert sorted(ids.tolist()) == list(range(20)) and ids.tolist() != list(range(20))
        assert torch.equal(yt, ids % 10)


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_batch(range(200), b"fine_labels", 100)
    train[b"coarse_labels"] = [0] * 200
    (folder / "train").write_bytes(pickle.dumps(train))
    (folder / "test").write_bytes(pickle.dumps(_cifar_batch(range(50), b"fine_labels", 100)))
    tr, te, spec = load_data("cifar100", data_dir=tmp_path, subset=100, test_subset=20)
    assert (spec.num_classes, tr.num_samples, te.num_samples) == (100, 100, 20)
    _, y = _collect(tr)
    assert torch.bincount(y, minlength=100).tolist() == [1] * 100  # stratified subset
    x, y = _collect(te)
    assert torch.equal(y, _pixels(x, spec)[:, 0, 0, 0].long())  # label == id for ids < 100


@pytest.mark.parametrize("protocol", [0, 2, "py2", 4, 5])
def test_cifar_pickles_of_every_protocol_load_through_the_restricted_unpickler(tmp_path, protocol):
    folder = _write_cifar10(tmp_path, protocol=protocol)
    if protocol == "py2":
        blob = (folder / "test_batch").read_bytes()
        assert b"cnumpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob
    tr, te, spec = load_data("cifar10", data_dir=tmp_path, augment=False)
    x, y = _collect(te)
    assert (tr.num_samples, te.num_samples) == (20, 6)
    assert _pixels(x, spec)[:, 0, 0, 0].tolist() == list(range(100, 106))
    assert y.tolist() == [i % 10 for i in range(100, 106)]


class _Hostile:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins

        return builtins.open, (str(self.marker), "w")  # pickled as io.open


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_refuses_a_pickle_that_would_run_code(tmp_path, protocol):
    folder = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = _cifar_batch(range(4), b"labels", 10)
    batch[b"batch_label"] = _Hostile(marker)
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(ValueError, match=r"data_batch_3: refused to load the global io\.open"):
        load_data("cifar10", data_dir=tmp_path)
    assert not marker.exists()  # refused before anything ran
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Hostile(marker), protocol=protocol))
    with pytest.raises(ValueError, match=r"data_batch_3: refused .* io\.open "):
        load_data("cifar10", data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_labels_out_of_range_are_refused_naming_file_and_range(tmp_path):
    folder = _write_cifar10(tmp_path)
    batch = _cifar_batch(range(4), b"labels", 10)
    for bad in (10, -1):
        batch[b"labels"] = [0, 1, bad, 3]
        (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
        with pytest.raises(ValueError, match=rf"data_batch_2: label {bad} .*range 0\.\.9 "):
            load_data("cifar10", data_dir=tmp_path)
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    (c100 / "train").write_bytes(pickle.dumps(_cifar_batch(range(200), b"fine_labels", 100)))
    test = _cifar_batch(range(10), b"fine_labels", 100)
    test[b"fine_labels"][4] = 100
    (c100 / "test").write_bytes(pickle.dumps(test))
    with pytest.raises(ValueError, match=r"test: label 100 at position 4 .*range 0\.\.99 "):
        load_data("cifar100", data_dir=c100)


def test_cifar_missing_lists_paths_and_fixes(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_data("cifar10", data_dir=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"  - {tmp_path / 'cifar-10-batches-py'}\n  - {tmp_path}\n" in msg
    assert "download=True" in msg and "cifar-10-python.tar.gz" in msg


def test_cifar_download_failure_is_chained_and_success_is_read(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def offline(root, train, download):
        calls.append((root, train, download))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DatasetNotFoundError, match="download into .* failed") as info:
        load_data("cifar10", data_dir=tmp_path, download=True)
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert calls == [(str(tmp_path), True, True)]
    monkeypatch.setattr(tvd, "CIFAR10", lambda root, train, download: _write_cifar10(Path(root)))
    assert load_data("cifar10", data_dir=tmp_path, download=True).train.num_samples == 20


# ---------------------------------------------------------------- Fashion-MNIST


def _idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, n_train=20, n_test=10, gz=True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[split] = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        for kind, arr, magic in (
            ("images-idx3", arrays[split][0], 2051),
            ("labels-idx1", arrays[split][1], 2049),
        ):
            raw = _idx(arr, magic)
            name = f"{split}-{kind}-ubyte"
            path = folder / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("layout,gz", [("", True), ("FashionMNIST/raw", False)])
def test_fashion_idx_files_load(tmp_path, layout, gz):
    arrays = _write_fashion(tmp_path / layout, gz=gz)
    tr, te, spec = load_data("fashion-mnist", data_dir=tmp_path, eval_batch_size=3)
    assert (tr.num_samples, te.num_samples, len(te)) == (20, 10, 4)
    x, y = _collect(te)
    assert x.shape == (10, 1, 28, 28)
    assert torch.equal(_pixels(x, spec)[:, 0], torch.from_numpy(arrays["t10k"][0]).to(torch.uint8))
    assert x[3, 0, 5, 7].item() == pytest.approx(
        (arrays["t10k"][0][3, 5, 7] / 255 - 0.286) / 0.353, abs=1e-5
    )
    assert y.tolist() == arrays["t10k"][1].tolist()


def test_fashion_corrupt_files_raise_naming_the_file(tmp_path):
    _write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated gzip
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*gzip"):
        load_data("fashion-mnist", data_dir=tmp_path)
    raw = gzip.decompress(good)
    path.write_bytes(gzip.compress(raw[:-28]))  # header promises 20 images, 19.96 are there
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_data("fashion-mnist", data_dir=tmp_path)
    path.write_bytes((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())  # labels as images
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        load_data("fashion-mnist", data_dir=tmp_path)


def test_fashion_label_out_of_range_is_refused_at_load_time(tmp_path):
    _write_fashion(tmp_path)
    labels = np.arange(20) % 10
    labels[7] = 12
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels, 2049)))
    with pytest.raises(ValueError) as info:
        load_data("fashion-mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'train-labels-idx1-ubyte.gz'}: label 12 at position 7")
    assert "valid range 0..9 (10 classes)" in msg


def test_oversized_subsets_name_the_option_and_the_maximum(tmp_path):
    _write_fashion(tmp_path)  # 20 training and 10 test images
    with pytest.raises(ValueError) as info:
        load_data("fashion-mnist", data_dir=tmp_path, subset=21)
    assert str(info.value) == (
        "--subset 21 is larger than fashion-mnist's 20 training images; use at most 20"
    )
    with pytest.raises(ValueError) as info:
        load_data("fashion-mnist", data_dir=tmp_path, test_subset=11)
    assert str(info.value) == (
        "--test-subset 11 is larger than fashion-mnist's 10 test images; use at most 10"
    )
    exact = load_data("fashion-mnist", data_dir=tmp_path, subset=20, test_subset=10)
    assert (exact.train.num_samples, exact.test.num_samples) == (20, 10)
    _write_cifar10(tmp_path / "c10")
    with pytest.raises(ValueError, match="--test-subset 7 is larger than cifar10's 6 test images"):
        load_data("cifar10", data_dir=tmp_path / "c10", test_subset=7)
    big = load_data("synthetic", subset=600, test_subset=300)  # synthetic has no fixed size
    assert (big.train.num_samples, big.test.num_samples) == (600, 300)


def test_fashion_missing_in_explicit_dir_lists_search_and_fixes(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_data("fashion-mnist", data_dir=tmp_path)
    msg = str(info.value)
    for searched in (tmp_path, tmp_path / "fashion-mnist", tmp_path / "FashionMNIST" / "raw"):
        assert f"  - {searched}\n" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert f"  - {DEBIAN_FASHION}\n" not in msg  # an explicit data_dir is not second-guessed


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_default_path_real_data_and_its_normalisation(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./data here: the Debian path must be found by default
    tr, te, spec = load_data("fashion-mnist", eval_batch_size=1000)
    assert (tr.num_samples, te.num_samples, len(tr), len(te)) == (60000, 10000, 469, 10)
    assert torch.bincount(tr.labels).tolist() == [6000] * 10
    pixels = tr.images.float() / 255  # the spec's mean and std are the train set's, to 3 decimals
    assert round(pixels.mean().item(), 3) == spec.mean[0]
    assert round(pixels.std().item(), 3) == spec.std[0]
    x, y = _collect(te)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert torch.bincount(y).tolist() == [1000] * 10
    with pytest.raises(ValueError) as info:
        load_data("fashion-mnist", subset=100000)
    assert str(info.value) == (
        "--subset 100000 is larger than fashion-mnist's 60000 training images; use at most 60000"
    )


# ---------------------------------------------------------------- augmentation and loaders


def _find_transform(out: torch.Tensor, img: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) under which ``out`` is a crop of the zero-padded ``img``."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (pad,) * 4)
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[..., dy : dy + h, dx : dx + w]
            hits += [
                (dy, dx, f) for f in (False, True) if torch.equal(out, crop.flip(-1) if f else crop)
            ]
    return hits


def test_random_crop_flip_is_a_shift_of_the_padded_image_and_flips_half():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (400, 2, 8, 8), dtype=torch.uint8)  # no zeros: padding is visible
    out = random_crop_flip(x, 4, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    found = [_find_transform(out[i], x[i], 4) for i in range(len(x))]
    assert all(len(f) == 1 for f in found)  # each output is exactly one shifted (flipped) crop
    offsets = {f[0][:2] for f in found}
    assert len(offsets) > 60  # of the 81 offsets
    assert 0.42 < sum(f[0][2] for f in found) / len(x) < 0.58
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)  # one sample, by hand
    out = random_crop_flip(img, 1, torch.Generator().manual_seed(3))
    ((dy, dx, flip),) = _find_transform(out[0], img[0], 1)
    expected = torch.nn.functional.pad(img, (1, 1, 1, 1))[0, :, dy : dy + 4, dx : dx + 4]
    assert torch.equal(out[0], expected.flip(-1) if flip else expected)


def test_tensor_loader_epochs_seeds_and_lengths():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(50) % 5

    def make(seed, augment=True, shuffle=True):
        return TensorLoader(
            x,
            y,
            batch_size=16,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            shuffle=shuffle,
            augment=augment,
            seed=seed,
        )

    a, b = make(0), make(0)
    epoch0 = list(a)
    assert len(a) == 4 and [len(yb) for _, yb in epoch0] == [16, 16, 16, 2]
    assert all(xb.shape[1:] == (3, 8, 8) and xb.dtype == torch.float32 for xb, _ in epoch0)
    for (xa, ya), (xb, yb) in zip(epoch0, b, strict=True):  # same seed, same batches
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch1 = list(a)
    assert not torch.equal(epoch0[0][1], epoch1[0][1])  # a new order each epoch
    a.set_epoch(0)
    assert torch.equal(next(iter(a))[0], epoch0[0][0])  # resumable
    assert not torch.equal(next(iter(make(1)))[1], epoch0[0][1])
    plain = make(0, augment=False, shuffle=False)
    xs, ys = _collect(plain)
    assert torch.equal(ys, y) and torch.allclose(xs, (x / 255 - 0.5) / 0.25, atol=1e-6)
    assert torch.equal(_collect(plain)[0], xs)


def test_stratified_subset_sizes_and_determinism():
    labels = torch.arange(1000) % 10
    idx = stratified_subset(labels, 50, seed=0)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert torch.bincount(labels[idx]).tolist() == [5] * 10
    assert torch.equal(idx, stratified_subset(labels, 50, seed=0))
    assert not torch.equal(idx, stratified_subset(labels, 50, seed=1))
    skewed = (torch.arange(1000) >= 900).long()  # 900 of class 0, 100 of class 1
    assert torch.bincount(skewed[stratified_subset(skewed, 100, seed=2)]).tolist() == [90, 10]
    with pytest.raises(ValueError, match="subset size 1001"):
        stratified_subset(labels, 1001, seed=0)


# ---------------------------------------------------------------- synthetic and ImageNet


def test_synthetic_shapes_determinism_stats_and_learnability():
    tr, te, spec = load_data("synthetic", batch_size=64)
    assert (tr.num_samples, te.num_samples, len(tr)) == (512, 256, 8)
    xb, yb = next(iter(tr))
    assert xb.shape == (64, 3, 32, 32) and yb.dtype == torch.int64
    again = load_data("synthetic", batch_size=64).train
    assert torch.equal(next(iter(again))[0], xb)
    assert load_data("synthetic", subset=100, test_subset=30).train.num_samples == 100
    raw = tr.images.float() / 255  # the spec's normalisation is this split's, to 3 decimals
    assert [round(v, 3) for v in raw.mean((0, 2, 3)).tolist()] == list(spec.mean)
    assert [round(v, 3) for v in raw.std((0, 2, 3)).tolist()] == list(spec.std)
    means = torch.stack([raw[tr.labels == c].mean(0) for c in range(10)]).flatten(1)
    test_x = te.images.float().flatten(1) / 255
    accuracy = (torch.cdist(test_x, means).argmin(1) == te.labels).float().mean()
    assert accuracy > 0.9  # nearest class mean already separates the classes


def _write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagenet_image_folder(tmp_path):
    _write_image_folder(tmp_path / "imagenet")
    tr, te, spec = load_data(
        "imagenet", data_dir=tmp_path, batch_size=3, eval_batch_size=4, num_workers=0
    )
    assert (len(tr), len(te), tr.num_samples) == (2, 1, 4)
    x, y = _collect(te)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1]
    xt, yt = _collect(tr)
    assert xt.shape == (4, 3, 224, 224) and sorted(yt.tolist()) == [0, 0, 1, 1]
    sub = load_data("imagenet", data_dir=tmp_path / "imagenet", subset=3, num_workers=0)
    assert sub.train.num_samples == 3 and sub.spec is spec
    with pytest.raises(ValueError, match="--subset 5 is larger than imagenet's 4 training images"):
        load_data("imagenet", data_dir=tmp_path, subset=5, num_workers=0)


def test_imagenet_missing_explains_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_data("imagenet", data_dir=tmp_path)
    msg = str(info.value)
    assert f"  - {tmp_path}\n  - {tmp_path / 'imagenet'}\n" in msg
    assert "train/n01440764" in msg and "val/n01440764" in msg


# ---------------------------------------------------------------- module layout


DATA_MODULES = ("data", "loaders", "_datasets", "cifar", "imagenet", "registry")


@pytest.mark.parametrize("module", DATA_MODULES)
def test_data_modules_are_small_and_import_only_public_names(module):
    import ast

    path = Path(data.__file__).with_name(f"{module}.py")
    source = path.read_text()
    assert len(source.splitlines()) <= 300, f"{path} has grown past 300 lines: split it"
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gkp")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
