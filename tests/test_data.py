"""The generated data round-trips through torchvision's real CIFAR-10 loader; augmentation does
exactly what torchvision's RandomCrop(32, padding=4) + flip (+ Resize to data.image_size) do; bad
data gives clear errors."""
import pickle
from urllib.error import URLError

import pytest
import torch
import torchvision.transforms.functional as TF

from torchvision import transforms
from torchvision.datasets import CIFAR10

from kdexp.data import CIFAR_MEAN, CIFAR_STD, DataError, EvalBatches, TrainBatches, load_splits
from kdexp.data.fake import write_fake_cifar
from kdexp.data.loaders import TorchLoaderBatches, augment, crop_flip


def test_fake_data_is_the_real_on_disk_format(fake_root):
    folder = fake_root / "cifar-10-batches-py"
    for name in ["data_batch_1", "data_batch_5", "test_batch"]:
        with open(folder / name, "rb") as f:
            latin = pickle.load(f, encoding="latin1")
        with open(folder / name, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
        assert set(latin) >= {"data", "labels", "filenames", "batch_label"}
        assert latin["data"].dtype.name == "uint8" and latin["data"].shape[1] == 3072
        assert b"data" in raw and b"labels" in raw
    splits = load_splits(fake_root, val_size=200, split_seed=1234, verify_md5=False)
    assert splits.train_x.shape == (1800, 3, 32, 32) and splits.train_x.dtype == torch.uint8
    assert splits.val_x.shape[0] == 200 and splits.test_x.shape[0] == 500
    assert sorted(splits.train_y.unique().tolist()) == list(range(10))


def test_val_split_is_fixed_by_split_seed_not_run_seed(fake_root):
    a = load_splits(fake_root, 200, 1234, verify_md5=False)
    b = load_splits(fake_root, 200, 1234, verify_md5=False)
    c = load_splits(fake_root, 200, 99, verify_md5=False)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)


def test_writing_twice_keeps_the_first_copy(tmp_path):
    folder = write_fake_cifar(tmp_path)
    stamp = (folder / "data_batch_1").stat().st_mtime_ns
    write_fake_cifar(tmp_path)
    assert (folder / "data_batch_1").stat().st_mtime_ns == stamp


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="data.download=true") as err:
        load_splits(tmp_path / "nowhere", 0, 1234)
    assert "cifar-10-python.tar.gz" in str(err.value)


def test_a_failed_download_says_so_and_how_to_get_the_data_by_hand(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no route to host")

    monkeypatch.setattr(CIFAR10, "download", offline)  # as on a node without internet
    with pytest.raises(DataError, match=r"data.download=true failed \(URLError.*cifar-10-python.tar.gz"):
        load_splits(tmp_path, 0, 1234, download=True)


def test_truncated_batch_file_is_named(tmp_path):
    folder = write_fake_cifar(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3"):
        load_splits(tmp_path, 0, 1234, verify_md5=False)


def test_md5_check_rejects_files_that_are_not_the_official_ones(tmp_path):
    write_fake_cifar(tmp_path)
    with pytest.raises(DataError, match="corrupt"):
        load_splits(tmp_path, 0, 1234, verify_md5=True)


def test_crop_flip_matches_torchvision_on_fixed_offsets():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 8, 4, 3, 8, 0]), torch.tensor([0, 8, 4, 7, 0, 8])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(images, dy, dx, flip)
    for i in range(6):
        ref = TF.crop(TF.pad(images[i], [4]), int(dy[i]), int(dx[i]), 32, 32)
        if flip[i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref)


def test_batches_are_a_function_of_seed_and_epoch():
    images, labels = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8), torch.arange(300) % 10
    a = TrainBatches(images, labels, 128, seed=0, device=torch.device("cpu"))
    b = TrainBatches(images, labels, 128, seed=0, device=torch.device("cpu"))
    first = [x.x for x in a.epoch(3)]
    assert all(torch.equal(p, q.x) for p, q in zip(first, b.epoch(3)))
    assert not torch.equal(first[0], next(a.epoch(4)).x)
    assert not torch.equal(first[0], next(TrainBatches(images, labels, 128, 1, torch.device("cpu")).epoch(3)).x)
    assert [len(x) for x in first] == [128, 128, 44]  # the last partial batch is kept


@pytest.mark.parametrize("size", [64, 224, 20])  # up (the report's 224) and down (antialiased)
def test_training_views_are_resized_as_torchvisions_resize_does(size):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    dy, dx, flip = torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5]), torch.tensor([True, False, True])
    out = augment(images, dy, dx, flip, channels_last=False, size=size)
    reference = transforms.Compose([transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
                                    transforms.Resize(size, transforms.InterpolationMode.BILINEAR, antialias=True)])
    for i in range(3):
        view = crop_flip(images[i:i + 1], dy[i:i + 1], dx[i:i + 1], flip[i:i + 1])[0]
        assert torch.allclose(out[i], reference(view.float() / 255), atol=1e-5)
    assert out.shape == (3, 3, size, size) and out.is_contiguous()


def test_every_loader_and_evaluation_give_images_of_data_image_size():
    images, labels = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.arange(10)
    cpu = torch.device("cpu")
    tensor_path = next(TrainBatches(images, labels, 4, 0, cpu, image_size=48).epoch(1)).x
    torch_path = next(TorchLoaderBatches(images, labels, 4, 0, cpu, image_size=48).epoch(1)).x
    evaluated, _ = next(iter(EvalBatches(images, labels, 4, cpu, image_size=48)))
    assert tensor_path.shape == torch_path.shape == evaluated.shape == (4, 3, 48, 48)
    unresized, _ = next(iter(EvalBatches(images, labels, 4, cpu)))
    assert torch.allclose(evaluated, transforms.Resize(48, antialias=True)(unresized), atol=1e-5)
