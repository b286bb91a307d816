"""Session fixtures: the tiny generated dataset and a real tiny teacher for end-to-end tests; a tiny
split, teacher and teacher-logit cache for in-process loops (helpers.tiny_loop); the test cluster's
launcher configs (hydra/launcher=slurm_local) for tests that compose them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.testcluster import SITE_DIR as TEST_CLUSTER_SITE
from helpers import TINY, run_train
from kdexp import teacher_cache
from kdexp.data import Splits, load_splits
from kdexp.data.fake import write_fake_cifar
from kdexp.execution import Execution
from kdexp.models import build_model
from kdexp.teachers import FrozenTeacher


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "fake"
    write_fake_cifar(root)
    return root


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, fake_root) -> Path:
    """A real 4-epoch R18 width-8 teacher, exported where students with teacher=resnet18 look."""
    out = tmp_path_factory.mktemp("outputs")
    proc = run_train(*TINY, "experiment=teacher", "model.width=8", "trainer.epochs=4",
                     f"data.root={fake_root}", f"paths.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def cluster_site(monkeypatch) -> Path:
    """KDEXP_SITE_DIR=tests/cluster: its hydra/launcher/slurm_local*.yaml, reached as a user's site configs are."""
    monkeypatch.setenv("KDEXP_SITE_DIR", str(TEST_CLUSTER_SITE))
    return TEST_CLUSTER_SITE


@pytest.fixture(scope="module")
def splits(fake_root) -> Splits:
    s = load_splits(fake_root, 200, 1234, verify_md5=False)
    return Splits(s.train_x[:192], s.train_y[:192], s.val_x[:64], s.val_y[:64], s.test_x[:64], s.test_y[:64])


@pytest.fixture(scope="module")
def teacher() -> FrozenTeacher:
    torch.manual_seed(1)
    return FrozenTeacher(build_model("resnet18", width=4))


@pytest.fixture(scope="module")
def cache(teacher, splits) -> torch.Tensor:
    return teacher_cache.build(teacher, splits.train_x, Execution())
