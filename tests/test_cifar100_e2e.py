"""A benchmark pair end to end on generated CIFAR-100, width and epochs reduced: protocol=crd's
teacher trains and exports, its student distils from it (KD at the benchmark's alpha 0.9, T 4),
both above chance (1 %), with per-class accuracy under the data's 100 class names, and the
analysis sets them beside the published numbers."""
import json
import sys

import pytest

from helpers import REPO, run_process, run_train

pytestmark = pytest.mark.e2e

# protocol=crd with its milestones inside the few epochs (they must lie in [1, trainer.epochs))
TINY_CRD = ("protocol=crd", "data=fake_cifar100", "data.fake_train_size=5000", "data.fake_test_size=500",
            "trainer.epochs=4", "scheduler.milestones=[3]", "trainer.progress=false")


def test_a_benchmark_pair_trains_distils_and_shows_beside_the_published_numbers(tmp_path):
    paths = (f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}")
    teacher = run_train(*TINY_CRD, *paths, "experiment=teacher", "model=vgg13", "model.width=8")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = run_train(*TINY_CRD, *paths, "pair=vgg13_to_vgg8", "method=logit", "teacher.width=8",
                        "model.width=8")
    assert student.returncode == 0, student.stderr[-3000:]
    results = {r["kind"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "out").rglob("result.json"))}
    assert set(results) == {"teacher", "student"}
    for result in results.values():
        assert result["test_acc_final"] > 0.02  # chance is 0.01; measured: teacher 0.13, student 0.10
        assert len(result["per_class_test_acc"]) == 100 and "grey_horizontal_p3" in result["per_class_test_acc"]
    analysis = run_process([sys.executable, "-m", "analysis", str(tmp_path / "out")], cwd=REPO)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    table = analysis.stdout.split("vgg13→vgg8 on CIFAR-100: kdexp beside the published numbers")[1]
    kd_row = next(line for line in table.splitlines() if line.startswith("KD "))
    assert "vgg8(w8)" in kd_row and "fake_cifar100" in kd_row and "72.98" in kd_row  # CRD's published KD


def test_a_dry_run_without_cifar100_says_how_to_get_it(tmp_path):
    proc = run_train("protocol=crd", "pair=r56_to_r20", "method=logit", "dry_run=true",
                     f"paths.data_dir={tmp_path / 'empty'}", f"paths.output_dir={tmp_path / 'out'}")
    assert "CIFAR-100 not found" in proc.stdout + proc.stderr and "cifar-100-python.tar.gz" in proc.stdout + proc.stderr
