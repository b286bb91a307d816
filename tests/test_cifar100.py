"""data=cifar100 and its generated twin data=fake_cifar100: the generated files are the real
cifar-100-python layout (torchvision's own CIFAR100 class reads them), kdexp reads them through the
same reader with CIFAR-100's normalisation and class names, and bad data gives the same clear errors
as CIFAR-10."""
import os
import pickle

import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR100

from helpers import compose_cfg
from kdexp.data import CIFAR100_LAYOUT, DataError, EvalBatches, load_data, load_splits
from kdexp.data.fake import write_fake_cifar


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake100")
    write_fake_cifar(root, train_size=1000, test_size=300, layout=CIFAR100_LAYOUT)
    return root


def test_generated_cifar100_is_read_by_torchvisions_own_class(root, monkeypatch):
    # the md5s are the official files' (generated ones cannot match): only that check is relaxed
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    train, test = CIFAR100(str(root), train=True), CIFAR100(str(root), train=False)
    assert train.data.shape == (1000, 32, 32, 3) and test.data.shape == (300, 32, 32, 3)
    assert len(train.classes) == 100 and sorted(set(train.targets)) == list(range(100))
    with open(root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # as the original Python 2 pickles load
    assert {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"} == set(raw)
    assert [c // 5 for c in raw[b"fine_labels"]] == raw[b"coarse_labels"]  # 20 superclasses


def test_fake_cifar100_loads_with_its_classes_normalisation_and_a_fixed_val_split(tmp_path):
    cfg = compose_cfg("data=fake_cifar100", "data.fake_train_size=1000", "data.fake_test_size=300",
                      "data.val_size=100", f"paths.data_dir={tmp_path}")
    d = cfg.data
    assert (d.num_classes, cfg.model.num_classes) == (100, 100)
    splits = load_data(d)
    assert (len(splits.train_x), len(splits.val_x), len(splits.test_x)) == (900, 100, 300)
    assert len(splits.classes) == 100 and splits.classes[0] == "grey_horizontal_p3"
    assert splits.layout.mean == (0.5071, 0.4865, 0.4409) and splits.layout.std == (0.2673, 0.2564, 0.2762)
    other_split = load_data(OmegaConf.merge(d, {"split_seed": 99}))
    again = load_data(d)
    assert torch.equal(splits.val_x, again.val_x) and not torch.equal(splits.val_x, other_split.val_x)
    x, _ = next(iter(EvalBatches(splits.test_x, splits.test_y, 300, torch.device("cpu"), layout=splits.layout)))
    assert abs(x.mean().item()) < 0.5  # normalised with CIFAR-100's statistics


def test_missing_cifar100_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="CIFAR-100 not found.*data.download=true") as err:
        load_splits(tmp_path, 0, 1234, layout=CIFAR100_LAYOUT)
    assert "cifar-100-python.tar.gz" in str(err.value)


def test_a_truncated_cifar100_file_is_named_and_md5_rejects_unofficial_files(tmp_path):
    folder = write_fake_cifar(tmp_path, 200, 100, layout=CIFAR100_LAYOUT)
    with pytest.raises(DataError, match="CIFAR-100 batch file is corrupt.*md5"):
        load_splits(tmp_path, 0, 1234, verify_md5=True, layout=CIFAR100_LAYOUT)
    (folder / "test").write_bytes((folder / "test").read_bytes()[:1000])
    with pytest.raises(DataError, match=r"cifar-100-python/test \("):
        load_splits(tmp_path, 0, 1234, verify_md5=False, generated=True, layout=CIFAR100_LAYOUT)


class _Payload:
    """A pickle that creates a file when unpickled: what a tampered batch file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_batch_file_that_fails_its_md5_is_never_unpickled(tmp_path):
    """Issue 18: naming the bad file must not unpickle one whose md5 is wrong (it could run code)."""
    import pickle
    folder = write_fake_cifar(tmp_path, 200, 100, layout=CIFAR100_LAYOUT)
    marker = tmp_path / "payload-ran"
    (folder / "train").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataError, match=r"cifar-100-python/train \(does not match its md5 checksum; not read\)"):
        load_splits(tmp_path, 0, 1234, verify_md5=True, layout=CIFAR100_LAYOUT)
    assert not marker.exists()
