"""The seeds' report's protocol (experiment=report): an ImageNet-initialised ResNet-34 teacher
fine-tuned with Adam at 224 pixels, early stopping on val, a ResNet-18 student from scratch with
CE + KL. Real runs on tiny generated data; the teacher's "ImageNet weights" are a local
torchvision-format file (no internet here), the 224-pixel path runs once on a handful of images."""
import json

import pytest
import torch
import torchvision

from helpers import compose_cfg, run_train
from kdexp.checkpoint import file_sha256, load
from kdexp.config import validate
from kdexp.cost import network_gflops
from kdexp.teachers import resolve_teacher_path, train_command

TINY = ("data=fake", "data.fake_train_size=64", "data.fake_test_size=32", "trainer.device=cpu",
        "trainer.progress=false", "trainer.batch_size=8")
SHORT = (*TINY, "data.val_size=16", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "data.image_size=64")


def _result(out, kind: str) -> dict:
    [path] = [p for p in out.rglob("result.json") if json.loads(p.read_text())["kind"] == kind]
    return json.loads(path.read_text())


def test_the_preset_is_the_reports_protocol():
    cfg = compose_cfg("experiment=report")
    validate(cfg)
    assert (cfg.teacher.arch, cfg.teacher.init, cfg.teacher.stem) == ("resnet34", "imagenet", "imagenet")
    assert (cfg.model.arch, cfg.model.init, cfg.model.stem) == ("resnet18", None, "imagenet")
    assert (cfg.data.image_size, cfg.optimizer.name, cfg.trainer.early_stopping) == (224, "adam", 10)
    assert cfg.data.val_size > 0 and cfg.scheduler.eta_min == cfg.trainer.lr  # selection on val; constant lr
    assert (cfg.method._target_, cfg.trainer.epochs, cfg.recipe_epochs.teacher) == ("kdexp.methods.logit.LogitKD", 60, 20)
    # a student's missing teacher is trained by the report's own teacher command
    assert train_command(cfg) == "python -m kdexp.train experiment=teacher protocol=report model=resnet34 " \
                                 "model.init=imagenet"


@pytest.fixture(scope="module")
def r34_weights(tmp_path_factory):
    """ResNet-34 weights in torchvision's format, as ImageNet weights are saved (1000 classes)."""
    path = tmp_path_factory.mktemp("weights") / "r34_in1k.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), path)
    return path


@pytest.mark.e2e
def test_the_teacher_fine_tunes_from_its_init_file_and_the_student_distils_from_it(tmp_path, r34_weights):
    teacher = run_train("experiment=teacher", "protocol=report", "model=resnet34", f"model.init={r34_weights}",
                        *SHORT, f"paths.output_dir={tmp_path}")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    result = _result(tmp_path, "teacher")
    assert result["init"] == {"init": str(r34_weights), "file": str(r34_weights), "sha256": file_sha256(r34_weights)}
    assert result["gflops"] == {"student": network_gflops("resnet34", 10, "imagenet", 64, 64), "teacher": None}
    export = load(result["teacher_checkpoint"])
    assert result["teacher_checkpoint"].endswith("fake64x32_64px_val16_split1234/resnet34_imagenet_w64_seed0_init-r34_in1k.pt")
    assert (export["init"], export["init_sha256"], export["image_size"]) == ("r34_in1k", file_sha256(r34_weights), 64)
    init = torch.load(r34_weights)
    conv1 = export["state_dict"]["conv1.weight"]
    assert (conv1 - init["conv1.weight"]).abs().max() < 0.01 < conv1.std()  # fine-tuned from it (Adam, lr 1e-4)
    assert export["state_dict"]["fc.weight"].shape == (10, 512)  # a fresh head for the data's classes

    student = run_train("experiment=report", f"teacher.init={r34_weights}", "model.width=8", *SHORT,
                        f"paths.output_dir={tmp_path}")
    assert student.returncode == 0, student.stderr[-3000:]
    result = _result(tmp_path, "student")
    assert result["teacher"]["path"] == str(resolve_teacher_path(compose_cfg(
        "experiment=report", f"teacher.init={r34_weights}", *SHORT, f"paths.output_dir={tmp_path}")).resolve())
    assert result["init"] is None and result["method"] == "logit" and result["fidelity"] is not None
    assert result["gflops"] == {"student": network_gflops("resnet18", 10, "imagenet", 8, 64),
                                "teacher": network_gflops("resnet34", 10, "imagenet", 64, 64)}


@pytest.mark.e2e
def test_at_224_pixels_with_early_stopping(tmp_path):
    """The report's input size, once, on a handful of images; a one-image val split cannot improve
    twice in a row, so patience 1 stops the run within its three epochs, and result.json says when."""
    proc = run_train("experiment=baseline", "protocol=report", "model.width=8", *TINY, "data.val_size=1",
                     "trainer.epochs=3", "trainer.max_steps_per_epoch=1", "trainer.early_stopping=1",
                     f"paths.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(tmp_path, "baseline")
    assert result["gflops"]["student"] == network_gflops("resnet18", 10, "imagenet", 8, 224)
    assert result["stopped_early_epoch"] == result["epochs_completed"] in (2, 3)


@pytest.mark.e2e
def test_imagenet_init_offline_is_one_line_naming_the_file_and_the_dry_run_says_it_first(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9"}  # no internet, no cache
    args = ("experiment=teacher", "protocol=report", "model=resnet34", "model.init=imagenet", *SHORT,
            f"paths.output_dir={tmp_path}")
    dry = run_train(*args, "dry_run=true", env=env)
    assert dry.returncode == 2
    assert "model.init=imagenet: " + str(tmp_path / "torch/hub/checkpoints/resnet34-b627a593.pth") in dry.stderr
    assert "torchvision.models.get_weight('ResNet34_Weights.IMAGENET1K_V1').get_state_dict()" in dry.stderr
    real = run_train(*args, env=env)
    assert real.returncode == 1
    [line] = [line for line in real.stderr.splitlines() if line.startswith("kdexp: ")]
    assert "resnet34-b627a593.pth, sha256 starting b627a593, which is not in torch.hub's cache " \
           f"{tmp_path / 'torch/hub/checkpoints'}" in line
