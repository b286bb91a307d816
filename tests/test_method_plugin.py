"""A method is a plugin: it owns its identity (run tag, label, grid cell), receives the training
progress (correct after a resume, and without recompiling a compiled graph each epoch), shares the
base class's label-smoothed cross-entropy, and a method written outside the package (its module on
PYTHONPATH, its YAML in $KDEXP_SITE_DIR/method/) is typed, trained and tabulated with no other change."""
from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers import REPO, compose_cfg, run_process, run_train, without_timing
from kdexp import checkpoint
from kdexp.data import Splits, load_splits
from kdexp.execution import Execution
from kdexp.job import build_loop, seed_everything
from kdexp.methods import ModelOutputs
from kdexp.methods.ce import CrossEntropy
from kdexp.methods.feature import FeatureKD
from kdexp.methods.logit import LogitKD
from kdexp.models import build_model
from kdexp.records import read_metrics, read_result
from kdexp.teachers import FrozenTeacher

CPU = torch.device("cpu")


class WarmupKD(LogitKD):
    """Logit-KD whose KD weight ramps with the epoch, as DKD's warm-up does; records what it saw."""

    def forward(self, student, teacher, targets):
        parts = super().forward(student, teacher, targets)
        weight = self.epoch / self.epochs
        return {**parts, "loss": parts["ce"] + weight * parts["kd"], "weight": weight}


class Interrupt(Exception):
    pass


class InterruptedWarmupKD(WarmupKD):
    """Stops the run when epoch `stop_at` starts (the epochs before it are checkpointed)."""

    stop_at = 2

    def forward(self, student, teacher, targets):
        if self.epoch.item() == self.stop_at:
            raise Interrupt
        return super().forward(student, teacher, targets)


def test_the_package_methods_identities():
    ce, feature = {"_target_": "kdexp.methods.ce.CrossEntropy"}, dict(alpha=0.5, beta=0.5, clip_projection=True,
                                                                     normalize_by_teacher_std=False)
    assert (CrossEntropy.run_tag(ce), CrossEntropy.label(ce), CrossEntropy.cell_label(ce)) == ("ce", "ce", "")
    bugged = {**feature, "alpha": 0.3, "clip_projection": False}
    assert FeatureKD.run_tag(feature) == "feature_a0.5_b0.5"
    assert FeatureKD.run_tag(bugged) == "feature_a0.3_b0.5_clip_projection-false"
    assert (FeatureKD.label(feature), FeatureKD.label(bugged)) == ("feature", "feature(bugged)")
    assert FeatureKD.cell_label(bugged) == "α=0.3, β=0.5" and FeatureKD.cell(bugged) == {"alpha": 0.3, "beta": 0.5}
    assert FeatureKD.run_tag({**feature, "normalize_by_teacher_std": True}) == \
        "feature_a0.5_b0.5_normalize_by_teacher_std-true"


def _smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Szegedy et al.: the target distribution (1 - eps) * one_hot + eps / K, by hand."""
    log_p = logits.log_softmax(1)
    return ((1 - eps) * -log_p.gather(1, targets[:, None]).squeeze(1) - eps * log_p.mean(1)).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_every_ce_term_carries_the_runs_label_smoothing(eps):
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", width=4), build_model("resnet18", width=8).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    s = ModelOutputs(*student(x, with_features=True))
    t = ModelOutputs(*teacher(x, with_features=True))
    feature = FeatureKD()
    feature.bind(student, teacher)
    for method, teacher_out in ((CrossEntropy(), None), (feature, t)):
        method.label_smoothing = eps
        ce = method(s, teacher_out, y)["ce"]
        torch.testing.assert_close(ce, _smoothed_ce(s.logits, y, eps))
        torch.testing.assert_close(ce, F.cross_entropy(s.logits, y, label_smoothing=eps))


@pytest.fixture(scope="module")
def splits(fake_root) -> Splits:
    s = load_splits(fake_root, 200, 1234, verify_md5=False)
    return Splits(s.train_x[:96], s.train_y[:96], s.val_x[:32], s.val_y[:32], s.test_x[:32], s.test_y[:32])


def _loop(run_dir, splits, method):
    cfg = compose_cfg("protocol=quickstart", "model.width=4", "teacher=resnet18", "teacher.width=4", "method=logit",
                      "trainer.epochs=3", "trainer.batch_size=32", "data.eval_batch_size=32", "trainer.progress=false")
    execution = Execution.resolve(cfg.execution, CPU, method, cfg.data.loader)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    torch.manual_seed(1)
    teacher = FrozenTeacher(build_model("resnet18", width=4))
    return build_loop(cfg, method, execution, splits, teacher, CPU, run_dir)


@pytest.mark.e2e
def test_a_schedule_reads_the_epoch_in_progress_also_after_a_resume(tmp_path, splits):
    """The epoch buffer is not saved (a buffer of the method, not its state): the loop sets it before
    every epoch, so a resumed run trains its remaining epochs with the same schedule, exactly."""
    straight = _loop(tmp_path / "straight", splits, WarmupKD()).fit().history
    assert [row["loss_weight"] for row in straight] == pytest.approx([1 / 3, 2 / 3, 1])
    with pytest.raises(Interrupt):
        _loop(tmp_path / "resumed", splits, InterruptedWarmupKD()).fit()
    resumed = _loop(tmp_path / "resumed", splits, WarmupKD())
    assert resumed.resume() and resumed.state.epoch == 1
    assert without_timing(resumed.fit().history) == without_timing(straight)


def test_reading_the_epoch_compiles_one_graph_for_every_epoch():
    """The epoch is a tensor the graph reads, not a constant baked into it: Dynamo (here its CPU
    backend; tests/gpu/test_method_progress.py runs CUDA graphs) captures the method once, and each
    epoch's value reaches the loss. A Python number would recompile every epoch."""
    method = WarmupKD()
    loss = torch.compile(lambda s, t, y: method(ModelOutputs(s), ModelOutputs(t), y), backend="aot_eager",
                         dynamic=False)
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    counters.clear()
    weights, graphs = [], []
    for epoch in range(1, 5):
        method.start_epoch(epoch, 4)
        weights.append(loss(s, t, y)["weight"].item())
        graphs.append(counters["stats"]["unique_graphs"])
    assert weights == [0.25, 0.5, 0.75, 1.0] and graphs == [1, 1, 1, 1]
    eager = copy.deepcopy(method)
    torch.testing.assert_close(loss(s, t, y)["loss"], eager(ModelOutputs(s), ModelOutputs(t), y)["loss"])


# A method written outside the package, as a user writes one: a module on PYTHONPATH and a YAML in
# the site dir that starts from the schema kdexp makes from the class (base_<name>).
TOY_MODULE = '''
import torch
import torch.nn.functional as F

from kdexp.methods import DistillationMethod, classifier_input


class ToyKD(DistillationMethod):
    """CE plus w times the squared distance between student and teacher probabilities."""

    name = "toy"
    grid = {"w": "w"}

    def __init__(self, w: float = 0.5, sharpen: bool = False):
        super().__init__()
        self.w, self.sharpen = w, sharpen

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        power = 2.0 if self.sharpen else 1.0
        kd = F.mse_loss((power * student.logits).softmax(1), (power * teacher.logits.detach()).softmax(1))
        return {"loss": ce + self.w * kd, "ce": ce, "kd": kd}


class RelationKD(DistillationMethod):
    """CE plus w times the distance between the student's and the teacher's batch similarity
    matrices of their penultimate embeddings, a module output no stage exposes; counts how often it
    saw each training image (by index) in a buffer, which last.pt keeps."""

    name = "relation"
    grid = {"w": "w"}
    needs_indices = True

    def __init__(self, w: float = 1.0):
        super().__init__()
        self.w = w

    def taps(self, network, role):
        return {"embedding": classifier_input(network)}

    def bind_training_set(self, labels):
        self.register_buffer("seen", torch.zeros(len(labels)))

    def forward(self, student, teacher, targets, indices):
        self.seen[indices] += 1
        ce = self.cross_entropy(student.logits, targets)
        s, t = (F.normalize(out.taps["embedding"], dim=1) for out in (student, teacher))
        kd = F.mse_loss(s @ s.T, (t @ t.T).detach())
        return {"loss": ce + self.w * kd, "ce": ce, "kd": kd}
'''
TOY_YAML = "defaults: [base_toy, _self_]\n_target_: toykd.ToyKD\nw: 0.5\n"
RELATION_YAML = "defaults: [base_relation, _self_]\n_target_: toykd.RelationKD\nw: 1.0\n"
SMALL = ("protocol=quickstart", "data.fake_train_size=400", "data.fake_test_size=100", "data.val_size=100",
         "model.width=4", "trainer.progress=false", "trainer.epochs=2", "trainer.max_steps_per_epoch=3")


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> dict:
    """The environment of a user with ToyKD: its module's folder on PYTHONPATH, its YAML in the site dir."""
    site = tmp_path_factory.mktemp("site")
    (site / "toykd.py").write_text(TOY_MODULE)
    (site / "method").mkdir()
    (site / "method" / "toy.yaml").write_text(TOY_YAML)
    (site / "method" / "relation.yaml").write_text(RELATION_YAML)
    return {"KDEXP_SITE_DIR": str(site), "PYTHONPATH": str(site), "KDEXP_DATA": str(tmp_path_factory.mktemp("data"))}


@pytest.mark.e2e
def test_a_method_from_outside_the_package_trains_through_the_entry_point(tmp_path, toy_site):
    teacher = run_train(*SMALL, "experiment=teacher", f"paths.output_dir={tmp_path}", env=toy_site)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    proc = run_train(*SMALL, "teacher=resnet18", "teacher.width=4", "method=toy", "method.w=0.3",
                     "method.sharpen=true", f"paths.output_dir={tmp_path}", env=toy_site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.rglob("result.json") if "-to-" in str(p)]
    label = run_dir.relative_to(tmp_path).as_posix()
    assert label.startswith("quickstart/resnet18-to-resnet18/toy_w0.3_sharpen-true/seed0/") and "method" not in \
        label.split("/seed0/")[1]  # the toy's run tag names its arguments; the other overrides follow
    result = read_result(run_dir)
    assert result["status"] == "completed" and result["method"] == "toy" and result["epochs_completed"] == 2
    assert {"loss_kd", "agreement"} <= set(read_metrics(run_dir)[-1])
    tables = _analyse(tmp_path, toy_site)
    assert re.search(r"\| resnet18\(w4\) +\| resnet18\(w4\) +\| toy +\| 0\.3 +\|", tables["key_results"]), \
        tables["key_results"]  # its KD column and its grid key's own column
    assert "w=0.3 (n=1)" in tables["pairs"]  # its cell label, from the class's grid

    # A method reading the penultimate embedding of both networks by module name, and image indices
    relation = run_train(*SMALL, "teacher=resnet18", "teacher.width=4", "method=relation",
                         f"paths.output_dir={tmp_path}", env=toy_site)
    assert relation.returncode == 0, relation.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.rglob("result.json") if "relation_w1" in str(p)]
    assert read_result(run_dir)["status"] == "completed" and "loss_kd" in read_metrics(run_dir)[-1]
    seen = checkpoint.load(run_dir / checkpoint.LAST)["method"]["seen"]
    assert len(seen) == 300 and seen.max() <= 2 and seen.sum() == 2 * 3 * 32  # 2 epochs of 3 steps of 32 images


def _analyse(out: Path, env: dict) -> dict[str, str]:
    """`python -m analysis` on the runs, as a user runs it (the toy's module on PYTHONPATH): the
    markdown tables by name."""
    tables = out / "tables"
    proc = run_process([sys.executable, "-m", "analysis", str(out), "--out", str(tables), "--format", "md"],
                       cwd=REPO, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.stem: p.read_text() for p in tables.glob("*.md")}


@pytest.mark.parametrize("override, message", [
    ("method.w=abc", "kdexp: invalid config: Error merging override method.w=abc Value 'abc' of type 'str' could "
                     "not be converted to Float"),
    ("+method.weight=1", "method.weight is not a kdexp setting: the settings under method are w, sharpen"),
])
@pytest.mark.e2e
def test_a_method_from_outside_the_package_is_typed_by_its_signature(tmp_path, toy_site, override, message):
    proc = run_train(*SMALL, "teacher=resnet18", "method=toy", override, f"paths.output_dir={tmp_path}",
                     env=toy_site)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("result.json"))
