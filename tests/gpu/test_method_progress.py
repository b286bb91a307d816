"""A method's schedule under execution.compile=true (CUDA graphs; skipped without a GPU): the epoch the
method reads is a buffer the captured graph reads at each replay, so one capture serves every epoch
and each epoch's value reaches the loss (no stale value baked into the graph)."""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import compose_cfg
from kdexp.data import Splits, load_splits
from kdexp.execution import Execution
from kdexp.job import build_loop, seed_everything
from kdexp.methods.logit import LogitKD
from kdexp.models import build_model
from kdexp.teachers import FrozenTeacher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: execution.compile captures CUDA graphs")]

EPOCHS = 3


class WarmupKD(LogitKD):
    """Logit-KD whose KD weight ramps with the epoch, as DKD's warm-up does."""

    def forward(self, student, teacher, targets):
        parts = super().forward(student, teacher, targets)
        weight = self.epoch / self.epochs
        return {**parts, "loss": parts["ce"] + weight * parts["kd"], "weight": weight}


def test_a_compiled_schedule_is_captured_once_and_reads_each_epoch(tmp_path, fake_root):
    cuda = torch.device("cuda")
    cfg = compose_cfg("protocol=quickstart", "model.width=16", "teacher=resnet18", "teacher.width=16",
                      "method=logit", f"trainer.epochs={EPOCHS}", "trainer.batch_size=32", "execution.compile=true",
                      "trainer.device=cuda", "trainer.progress=false")
    s = load_splits(fake_root, 200, 1234, verify_md5=False)
    splits = Splits(s.train_x[:96], s.train_y[:96], s.val_x, s.val_y, s.test_x[:64], s.test_y[:64])  # 3 full batches
    method = WarmupKD()
    execution = Execution.resolve(cfg.execution, cuda, method, cfg.data.loader)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    teacher = execution.prepare(FrozenTeacher(build_model("resnet18", width=16)).to(cuda))
    loop = build_loop(cfg, method, execution, splits, teacher, cuda, tmp_path)
    counters.clear()
    graphs = []
    train_epoch = loop.train_epoch

    def counted(epoch: int) -> dict:
        row = train_epoch(epoch)
        graphs.append(counters["stats"]["unique_graphs"])
        return row

    loop.train_epoch = counted
    history = loop.fit().history
    assert graphs[0] >= 1 and graphs == [graphs[0]] * EPOCHS, graphs  # captured in epoch 1 only
    assert [row["loss_weight"] for row in history] == pytest.approx([e / EPOCHS for e in range(1, EPOCHS + 1)])
