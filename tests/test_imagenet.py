"""data=imagenet and its generated twin data=fake_imagenet: real JPEG files in ILSVRC-2012's folder
layout, read by torchvision's ImageFolder through the standard transforms; misarranged data is one
line saying how to fix it; a rank's shard of each batch is its slice of the same global batch;
experiment=imagenet_kd expands to its 12 jobs; a tiny student learns the generated images through
kdexp's real training loop."""
from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from analysis import literature
from analysis.collect import collect
from helpers import CPU, compose_cfg, run_train, tiny_loop
from kdexp import job
from kdexp.config import validate
from kdexp.evaluation import predict
from kdexp.data import DataError, EvalBatches, build_batches, build_train_batches, check_data_present, load_data
from kdexp.data.fake_imagenet import write_fake_imagenet
from kdexp.data.imagenet import (IMAGENET_LAYOUT, VALPREP_URL, FolderTrainBatches, ImageFiles, build_folder_batches,
                                 load_folders)
from kdexp.loop import Loop, build_optimizer
from kdexp.models import build_model
from kdexp.schedules import build_scheduler
from kdexp.teachers import load_teacher
from launch.sweep import compose_jobs, expand, hydra_session, run_dir, task_config

SIDES = (64, 96)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_fake_imagenet(tmp_path_factory.mktemp("fake_imagenet") / "imagenet", 96, 32, num_classes=4)


def test_fake_imagenet_is_jpeg_files_in_the_imagenet_layout(root):
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    for split, size in (("train", 96), ("val", 32)):
        assert sorted(p.name for p in (root / split).iterdir()) == ["n00000000", "n00000001", "n00000002", "n00000003"]
        files = sorted((root / split).glob("*/*"))
        assert len(files) == size and all(f.suffix == ".JPEG" for f in files)
        with Image.open(files[0]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert all(SIDES[0] <= side <= SIDES[1] for side in image.size)
    assert all(f.name.startswith("ILSVRC2012_val_") for f in (root / "val").glob("*/*"))
    folder = ImageFolder(str(root / "train"))  # torchvision's own reader, no kdexp code
    assert len(folder) == 96 and folder.classes == ["n00000000", "n00000001", "n00000002", "n00000003"]


def test_fake_imagenet_is_written_once_deterministically_and_leaves_no_temporary(root, tmp_path):
    again = write_fake_imagenet(tmp_path / "copy", 96, 32, num_classes=4)
    files = sorted(p.relative_to(root) for p in root.rglob("*.JPEG"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.JPEG"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    stamp = (again / files[0]).stat().st_mtime_ns
    write_fake_imagenet(again, 200, 50, num_classes=8)  # a complete copy is kept, whatever is asked
    assert (again / files[0]).stat().st_mtime_ns == stamp and len(list(again.rglob("*.JPEG"))) == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_the_standard_transforms_give_normalised_crops_of_the_image_size(root):
    splits = load_folders(root, 16, 1234)
    assert (splits.images, len(splits.train_idx), len(splits.val_idx), len(splits.test)) == (96, 80, 16, 32)
    assert splits.layout is IMAGENET_LAYOUT and splits.classes[0] == "n00000000"
    train, val, test = build_folder_batches(splits, 16, 64, 0, CPU, image_size=48)
    batch = next(train.epoch(1))
    assert batch.x.shape == (16, 3, 48, 48) and batch.y.dtype == torch.long
    x, y = next(iter(test))
    assert x.shape == (32, 3, 48, 48) and torch.equal(y, test.labels) and len(test) == 32 and len(val) == 16
    standard = transforms.Compose([transforms.Resize(55), transforms.CenterCrop(48),  # 55 = 48 * 256/224
                                   transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                               (0.229, 0.224, 0.225))])
    with Image.open(splits.test[0][0]) as image:
        assert torch.equal(x[0], standard(image.convert("RGB")))
    assert test.classes == splits.classes and len(train) == 5  # 80 images, batches of 16


def test_an_epochs_batches_follow_seed_and_epoch_whatever_the_workers(root):
    splits = load_folders(root, 0, 1234)

    def batches(epoch: int, workers: int, seed: int = 0) -> list:
        return list(FolderTrainBatches(splits, 32, seed, CPU, image_size=32, num_workers=workers).epoch(epoch))

    first = batches(2, 0)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(first, batches(2, 2)))
    assert not torch.equal(first[0].x, batches(3, 0)[0].x) and not torch.equal(first[0].x, batches(2, 0, seed=1)[0].x)


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_shards_partition_each_global_batch(root, world):
    """Rank r gets rows [r*B/world, (r+1)*B/world) of the very batch one process sees (crops included);
    evaluation gives each rank its block of a split, each image once, in order, and the whole split's labels."""
    splits = load_folders(root, 16, 1234)
    whole, _, whole_test = build_folder_batches(splits, 32, 20, 0, CPU, image_size=32)
    ranks = [build_folder_batches(splits, 32, 20, 0, CPU, image_size=32, shard=(r, world)) for r in range(world)]
    epochs = [list(train.epoch(1)) for train, _, _ in ranks]
    for step, batch in enumerate(whole.epoch(1)):  # 80 images: two batches of 32, the last of 16
        parts = [epoch[step] for epoch in epochs]
        assert [len(p.y) for p in parts] == [len(batch.y) // world] * world
        assert [p.loss_scale for p in parts] == [1.0] * world
        assert torch.equal(torch.cat([p.x for p in parts]), batch.x)
        assert torch.equal(torch.cat([p.y for p in parts]), batch.y)
    for _, _, test in ranks:
        assert torch.equal(test.labels, whole_test.labels)
    assert sum(len(val) for _, val, _ in ranks) == 16 and sum(len(test) for _, _, test in ranks) == 32
    for i in (0, 1):  # images, then labels: the ranks' blocks make the whole split
        blocks = [b[i] for _, _, test in ranks for b in test]
        assert torch.equal(torch.cat(blocks), torch.cat([b[i] for b in whole_test]))


def test_an_uneven_last_batch_is_weighted_by_its_shares_and_one_smaller_than_the_ranks_dropped(root):
    splits = load_folders(root, 1, 1234)  # 95 training images: batches of 40, 40 and 15
    last = [list(FolderTrainBatches(splits, 40, 0, CPU, image_size=32, shard=(r, 2)).epoch(1))[-1] for r in range(2)]
    assert [len(b.y) for b in last] == [7, 8] and [b.loss_scale for b in last] == [14 / 15, 16 / 15]
    assert len(FolderTrainBatches(splits, 88, 0, CPU, shard=(0, 8))) == 1  # the last 7 images: fewer than 8 ranks


def test_a_global_batch_the_ranks_cannot_share_evenly_is_refused(root):
    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        FolderTrainBatches(load_folders(root, 0, 1234), 32, 0, CPU, shard=(0, 3))


def _misarranged(tmp_path: Path, root: Path, how: str) -> Path:
    data = tmp_path / "imagenet"
    shutil.copytree(root, data)
    if how == "no train":
        shutil.rmtree(data / "train")
    elif how == "flat val":  # the validation tar unpacked as it comes: 50k files in val/
        for f in list((data / "val").glob("*/*.JPEG")):
            f.rename(data / "val" / f.name)
        for d in (data / "val").iterdir():
            if d.is_dir():
                d.rmdir()
    elif how == "other classes":
        (data / "val" / "n00000003").rename(data / "val" / "n09999999")
    return data


@pytest.mark.parametrize("how, message", [
    ("missing root", "ImageNet .ILSVRC-2012. not found: data.root=.* is not a directory; arrange it as "
                     ".*/train/<wnid>/"),
    ("no train", "has no train/ .found: val.; arrange it as"),
    ("flat val", f"val holds 32 images directly, not in class folders .*: run {VALPREP_URL} inside .*"
                 "torchvision.datasets.ImageNet"),
    ("other classes", "train has 4 class folders and .*val 4, not the same ones .n00000003 only in train/, n09999999 "
                      "only in val/."),
])
def test_missing_or_misarranged_imagenet_is_one_line_saying_how_to_arrange_it(tmp_path, root, how, message):
    data = tmp_path / "nowhere" if how == "missing root" else _misarranged(tmp_path, root, how)
    cfg = compose_cfg("data=imagenet", f"data.root={data}")
    for check in (check_data_present, load_data, job.check_data_on_disk):  # the dry run's check and the start's
        with pytest.raises(DataError, match=message) as err:
            check(cfg.data)
        assert "\n" not in str(err.value)


def test_arranged_imagenet_passes_the_dry_runs_check(root):
    check_data_present(compose_cfg("data=imagenet", f"data.root={root}").data)


@pytest.mark.e2e
def test_the_imagenet_kd_preset_expands_to_its_methods_times_seeds(tmp_path):
    with hydra_session():
        jobs = expand(["experiment=imagenet_kd", "dry_run=true", "data=fake_imagenet", f"paths.data_dir={tmp_path}",
                       f"paths.output_dir={tmp_path}"])
        cfgs = compose_jobs(jobs)
        outcome = job.run(task_config(cfgs[-1]), run_dir(cfgs[-1]))
    labels = sorted(str(run_dir(c).relative_to(tmp_path / "imagenet_kd")) for c in cfgs)
    assert labels == sorted(f"{tag}/seed{seed}/data=fake_imagenet" for seed in (0, 1, 2) for tag in (
        "baseline/resnet18", "resnet34-to-resnet18/logit_a0.5_T1", "resnet34-to-resnet18/dkd_b0.5_T1_warmup-1",
        "resnet34-to-resnet18/dist_b2_g2_T-1"))
    for c in cfgs:
        assert (c.data.name, c.model.arch, c.model.stem, c.model.width, c.model.init) == ("fake_imagenet", "resnet18",
                                                                                           "imagenet", 64, None)
        assert (c.trainer.epochs, c.trainer.batch_size, c.trainer.lr, c.trainer.clip_norm) == (100, 256, 0.1, None)
        assert (c.optimizer.momentum, c.optimizer.nesterov, c.optimizer.weight_decay) == (0.9, False, 1e-4)
        assert list(c.scheduler.milestones) == [30, 60, 90] and c.scheduler.gamma == 0.1
        teacher = (c.teacher.arch, c.teacher.stem, c.teacher.width, Path(c.teacher.ckpt or "").name)
        assert teacher == ((None, "imagenet", 64, "") if "ce" in c.method._target_.lower() else
                           ("resnet34", "imagenet", 64, "resnet34-b627a593.pth"))
    dkd = next(c.method for c in cfgs if c.method._target_.endswith("DKD"))
    assert (dkd.alpha, dkd.beta, dkd.T, dkd.warmup) == (1.0, 0.5, 1.0, 1)
    # a dry run's findings, not a rejection: generated data is written on start; the teacher file is fetched once
    assert outcome.status == "dry_run" and outcome.problems in ((), (f"teacher {cfgs[-1].teacher.ckpt} is missing",))


@pytest.mark.e2e
def test_the_imagenet_kd_dry_run_lists_its_12_jobs_and_the_torchvision_teacher_it_needs(tmp_path):
    args = ("-m", "experiment=imagenet_kd", "dry_run=true", "data=fake_imagenet", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'out'}")
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    teacher = tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    proc = run_train(*args, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and output.count("dry run: would train") == 12, output[-3000:]
    assert f"9 jobs: teacher {teacher} is missing" in output
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"")  # the dry run looks for the file; the start loads it
    proc = run_train(*args, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and output.count("dry run: would train") == 12, output[-3000:]
    assert not (tmp_path / "data").exists()  # generated data is written when a job starts, not by a dry run


def _loop(cfg, splits, teacher, run_dir: Path) -> Loop:
    """kdexp.job.build_loop's loop, its batches from kdexp.data.build_batches."""
    method = validate(cfg)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model.arch, cfg.model.num_classes, cfg.model.stem, cfg.model.width)
    method.bind(student, teacher)
    train, val, test = build_batches(cfg, splits, CPU, channels_last=False)
    optimizer = build_optimizer(student, method, cfg.optimizer, cfg.trainer.lr)
    return Loop(student, method, teacher, optimizer, build_scheduler(optimizer, cfg.scheduler, cfg.trainer.epochs),
                train, val, test, cfg.trainer, run_dir)


@pytest.mark.e2e
def test_a_tiny_student_learns_generated_imagenet_through_the_training_loop(tmp_path):
    cfg = compose_cfg("protocol=imagenet", "data=fake_imagenet", "data.fake_train_size=480", "data.fake_test_size=160",
                      "data.image_size=64", "data.num_workers=0", "data.eval_batch_size=160",
                      f"paths.data_dir={tmp_path}",
                      "model.width=8", "trainer.epochs=6", "trainer.batch_size=16", "trainer.lr=0.05",
                      "scheduler.milestones=[5]", "trainer.device=cpu", "trainer.progress=false")
    state = _loop(cfg, load_data(cfg.data), None, tmp_path).fit()
    accuracies = [row["test_acc"] for row in state.history]
    assert accuracies[-1] >= 0.25, accuracies  # 8 classes: chance is 0.125


@pytest.mark.e2e
def test_a_student_distils_on_generated_imagenet_from_a_torchvision_format_teacher_file(tmp_path):
    """pair=imagenet_r34_to_r18's route: the teacher is a plain state_dict file (torchvision's), loaded strictly
    with its own classifier and evaluated on the test split, as job.build_loop does."""
    torch.manual_seed(0)
    weights = tmp_path / "resnet34.pth"
    torch.save(build_model("resnet34", 4, "imagenet", 8).state_dict(), weights)
    cfg = compose_cfg("experiment=imagenet_kd", "method=logit", "data=fake_imagenet", "data.num_classes=4",
                      "data.fake_train_size=64", "data.fake_test_size=16", "data.image_size=32", "data.num_workers=0",
                      f"paths.data_dir={tmp_path}", "model.width=8", "teacher.width=8", f"teacher.ckpt={weights}",
                      "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.batch_size=8",
                      "scheduler.milestones=[1]", "trainer.device=cpu", "trainer.progress=false")
    splits = load_data(cfg.data)
    teacher = load_teacher(cfg, CPU, splits.images)
    loop = _loop(cfg, splits, teacher, tmp_path)
    row = loop.fit().history[-1]
    assert row["loss_kd"] > 0 and 0 <= row["test_acc"] <= 1
    assert predict(teacher, loop.test).shape == (16, 4)


@pytest.mark.e2e
def test_generated_imagenet_trains_through_the_entry_point_into_the_literature_table(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet34.pth"
    torch.save(build_model("resnet34", 4, "imagenet", 8).state_dict(), weights)
    args = ("experiment=imagenet_kd", "data=fake_imagenet", "data.num_classes=4", "data.fake_train_size=64",
            "data.fake_test_size=16", "data.image_size=32", "data.num_workers=1", "model.width=8", "teacher.width=8",
            f"teacher.ckpt={weights}", "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.batch_size=8",
            "scheduler.milestones=[1]", "trainer.device=cpu", "trainer.progress=false", f"paths.data_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'out'}")
    for method in ("ce", "dist"):
        proc = run_train(*args, f"method={method}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    tables = literature.literature_tables(collect(tmp_path / "out"))
    rows = {r[0]: r for r in tables[-1].rows}
    assert tables[-1].title.startswith("resnet34→resnet18 on ImageNet")
    assert rows["DIST"][4:6] == ["fake_imagenet", "1"] and rows["student alone (CE)"][4:6] == ["fake_imagenet", "1"]


@pytest.mark.parametrize("shard", [None, (1, 2)])
def test_build_batches_gives_cifar_the_batches_build_loop_gives(tmp_path, splits, teacher, shard):
    """Tensor data (CIFAR) keeps its batches bit for bit when build_batches makes them, one rank's too."""
    overrides = ("trainer.max_steps_per_epoch=3", "trainer.batch_size=32", "data.eval_batch_size=64",
                 "data.val_size=64")
    cfg = compose_cfg("protocol=quickstart", *overrides)
    train, val, test = build_batches(cfg, splits, CPU, channels_last=False, shard=shard)
    theirs_test = EvalBatches(splits.test_x, splits.test_y, 64, CPU, layout=splits.layout, classes=splits.classes,
                              shard=shard)
    theirs_train = build_train_batches("tensor", splits.train_x, splits.train_y, 32, cfg.seed, CPU, 3, shard=shard)
    if shard is None:  # and what the real build_loop gives
        loop = tiny_loop(tmp_path, splits, teacher, *overrides)
        theirs_test, theirs_train = loop.test, loop.train
        assert all(torch.equal(a, b) for pair in zip(val, loop.val, strict=True) for a, b in zip(*pair))
    for mine, theirs in zip(train.epoch(2), theirs_train.epoch(2), strict=True):
        assert all(torch.equal(getattr(mine, k), getattr(theirs, k)) for k in ("x", "y", "index", "dy", "dx", "flip"))
        assert mine.loss_scale == theirs.loss_scale
    assert all(torch.equal(a, b) for pair in zip(test, theirs_test, strict=True) for a, b in zip(*pair))


def test_imagenet_runs_are_set_beside_the_published_imagenet_numbers():
    run = {"status": "completed", "data": "fake_imagenet", "kind": "student", "teacher": "resnet34",
           "student": "resnet18", "width": 8, "kd": "dist", "cell": "β=2, γ=2, T=1", "seed": 0, "epochs": 2,
           "val_size": 0, "test_at_best_val": None, "test_final": 0.5, "best_test": 0.55, "numerics": "reference"}
    cifar_run = {**run, "data": "cifar100", "teacher": "resnet56", "student": "resnet20", "kd": "logit"}
    tables = literature.literature_tables(pd.DataFrame([run, cifar_run]))
    assert [t.title.split(":")[0] for t in tables] == ["resnet56→resnet20 on CIFAR-100",
                                                       "resnet34→resnet18 on ImageNet (ILSVRC-2012)"]
    rows = {r[0]: r for r in tables[1].rows}
    assert rows["DIST"][4:9] == ["fake_imagenet", "1", "50.00", "72.07", "-22.07"]
    published = {what: value for what, (value, _) in next(b for b in literature.benchmarks()
                                                           if b.data == "imagenet").pairs[0].accuracy.items()}
    assert published == {"teacher": 73.31, "student": 69.76, "kd": 71.03, "dkd": 71.70, "dist": 72.07}
    assert any("generated data (fake_imagenet)" in note for note in tables[1].notes)


class _ReadsEveryEntry(Dataset):
    """Reads `files[i]` as kdexp's image dataset does (without decoding); the last item is how much
    of the worker's memory became private (copied from its parent, or new) while it read them all, in
    MB (Linux's /proc/self/smaps_rollup), measured from its first item on."""

    def __init__(self, files):
        self.files, self.start = files, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> float:
        if self.start is None:
            self.start = _private_mb()
        path, label = self.files[i]
        return _private_mb() - self.start if i == len(self.files) - 1 else float(len(path) + label)


def _private_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty")) / 1024


def _without_gc(worker: int) -> None:
    """A collection in the worker would touch every object of the parent's heap (pytest's too) and
    copy pages whatever the dataset holds; only what reading the entries copies is measured."""
    gc.disable()


def _copied_while_reading_mb(files) -> float:
    loader = DataLoader(_ReadsEveryEntry(files), batch_size=4096, num_workers=1, worker_init_fn=_without_gc)
    return float(list(loader)[-1][-1])


def test_loader_workers_read_the_file_list_without_copying_it():
    """ImageFiles keeps ImageFolder's (path, label) list in numpy arrays: a forked DataLoader worker
    that reads all 400,000 entries copies a plain list's pages (reference counts are writes) but not
    the arrays' (ImageNet's 1.28M files: 261 vs 11 MB per worker, measured)."""
    samples = [(f"/data/imagenet/train/n{k % 1000:08d}/n{k % 1000:08d}_{k}.JPEG", k % 1000) for k in range(400_000)]
    files = ImageFiles(samples)
    assert files[123_456] == samples[123_456] and len(files) == len(samples)
    as_list, as_arrays = _copied_while_reading_mb(samples), _copied_while_reading_mb(files)
    assert as_list > 30 and as_arrays < as_list / 10, (as_list, as_arrays)
