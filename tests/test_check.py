"""`python -m kdexp.check` on this CPU at its tiny size: it runs to the end, writes check.json and
exits 0; the documented test switch (KDEXP_CHECK_BREAK) makes the named verdict fail, exit 1."""
import json

import pytest

from kdexp import check


def _report(out) -> dict:
    return json.loads((out / "check.json").read_text())


@pytest.mark.e2e
def test_the_check_passes_on_the_cpu_and_records_its_environment(tmp_path, capsys):
    assert check.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert (report["ok"], report["failed"], report["size"], report["execution"]) == (True, [], "tiny", "reference")
    # reference on the CPU: the exact settings it has (channels_last and compile need CUDA)
    assert [v["name"] for v in report["verdicts"]] == ["reference", "fused", "teacher_cache", "profile", "throughput"]
    assert report["verdicts"][0]["numbers"]["repeat_identical"]
    assert {"torch", "cuda", "cudnn", "gpu", "driver", "cpu_count", "git_commit"} <= set(report["environment"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].strip() for line in lines[1:-1]] == [v["name"] for v in report["verdicts"]]
    assert lines[-1].startswith("check: OK (5 verdicts")
    assert "kdexp.loop" in (tmp_path / "check.log").read_text()  # the loop's lines went to the log


@pytest.mark.e2e
def test_a_broken_fast_setting_fails_the_check_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(check.BREAK_VARIABLE, "bf16")
    assert check.main(["--device", "cpu", "--execution", "fast", "--out", str(tmp_path)]) == 1
    report = _report(tmp_path)
    assert report["failed"] == ["bf16"] and not report["ok"]
    assert "bf16 + teacher_cache" in next(v for v in report["verdicts"] if v["name"] == "profile")["detail"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("check: FAILED: bf16 (on cpu")


@pytest.mark.e2e
def test_a_broken_reference_stops_the_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(check.BREAK_VARIABLE, "reference")
    assert check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    assert [(v["name"], v["ok"]) for v in _report(tmp_path)["verdicts"]] == [("reference", False)]
    assert "DIFFERS" in capsys.readouterr().out


def test_a_device_this_machine_lacks_is_one_line_exit_2(tmp_path, capsys):
    if check.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        check.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--device=cuda but no CUDA device is visible" in capsys.readouterr().err
    assert not (tmp_path / "check.json").exists()
