"""The sweep dir's multirun.yaml keeps describing the runs that exist (kdexp/sweep_record.py): a
value rejected as invalid is not an expected cell forever, and a multirun none of whose jobs ran (a
dry run, every job rejected) leaves the earlier multirun's record as it was."""
from __future__ import annotations

import pytest
import yaml

from analysis.__main__ import main as analysis
from helpers import TINY, run_train
from kdexp import sweep_record
from kdexp.records import MULTIRUN_FILE

pytestmark = pytest.mark.e2e


def typed(sweep_dir) -> list[str]:
    return yaml.safe_load((sweep_dir / MULTIRUN_FILE).read_text())["hydra"]["overrides"]["task"]


@pytest.fixture(scope="module")
def with_a_rejected_seed(tmp_path_factory, fake_root):
    """`seed=-1,0`: seed -1 is rejected (nothing written), seed 0 trains."""
    out = tmp_path_factory.mktemp("rejected")
    proc = run_train("-m", *TINY, "experiment=baseline", "seed=-1,0", "trainer.epochs=1",
                     "trainer.max_steps_per_epoch=2", f"data.root={fake_root}", f"paths.output_dir={out}")
    assert proc.returncode == 2, proc.stderr[-3000:]  # the rejection is the sweep's worst outcome
    assert "multirun summary: 1 completed, 1 rejected" in proc.stdout
    return out


def test_a_rejected_value_is_not_an_expected_cell(with_a_rejected_seed, tmp_path):
    sweep_dir = with_a_rejected_seed / "quickstart"
    assert "seed=0" in typed(sweep_dir) and "seed=-1,0" not in typed(sweep_dir)
    # the symptom: --strict listed seed=-1 as missing, forever
    assert analysis([str(with_a_rejected_seed), "--strict", "--out", str(tmp_path / "report")]) == 0


def test_a_dry_run_leaves_the_earlier_record_alone(with_a_rejected_seed, fake_root):
    sweep_dir = with_a_rejected_seed / "quickstart"
    before = (sweep_dir / MULTIRUN_FILE).read_bytes()
    proc = run_train("-m", *TINY, "experiment=baseline", "seed=5,6", "dry_run=true", f"data.root={fake_root}",
                     f"paths.output_dir={with_a_rejected_seed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep_dir / MULTIRUN_FILE).read_bytes() == before


def outcome(status: str, *overrides: str) -> dict:
    return {"status": status, "overrides": list(overrides)}


def test_no_job_ran_puts_back_the_file_it_replaced_or_removes_it(tmp_path):
    path = tmp_path / MULTIRUN_FILE
    path.write_text("the multirun's record\n")
    sweep_record.keep_what_ran(tmp_path, b"the earlier record\n", [outcome("rejected", "seed=-1")])
    assert path.read_text() == "the earlier record\n"
    sweep_record.keep_what_ran(tmp_path, None, [outcome("dry_run", "seed=0"), outcome("rejected", "seed=-1")])
    assert not path.exists()


def test_each_typed_sweep_keeps_the_values_some_job_ran_with(tmp_path):
    task = ["experiment=baseline", "seed=-1,0,1", "method.alpha=0.3,2.0", "trainer.lr=range(1,3)",
            "model=glob(resnet*)"]
    (tmp_path / MULTIRUN_FILE).write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    jobs = [outcome("completed" if seed != "-1" and alpha != "2.0" else "rejected", "experiment=baseline",
                    f"seed={seed}", f"method.alpha={alpha}", f"trainer.lr={lr}", "model=resnet18")
            for seed in ("-1", "0", "1") for alpha in ("0.3", "2.0") for lr in ("1", "2")]
    sweep_record.keep_what_ran(tmp_path, None, jobs)
    assert typed(tmp_path) == ["experiment=baseline", "seed=0,1", "method.alpha=0.3", "trainer.lr=range(1,3)",
                               "model=glob(resnet*)"]
