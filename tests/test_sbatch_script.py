"""What goes into the study's batch scripts (the drivers', the canary's), without SLURM: every
`#SBATCH` value is written quoted as sbatch reads it back, and one that no quoting carries (a line
break that would end the directives and run the rest as shell, a backslash sbatch drops, a `%` it
expands in a log path, a name outside SLURM's plain words) is refused in one line, exit 2, by the
dry run as by the submission, before anything is written. An output dir of any printable name
reaches the jobs' Hydra overrides intact. What the real sbatch reads: tests/slurm/test_sbatch_quoting.py."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch import check, sbatch, study
from launch.plan import build_plan
from launch.sweep import compose_job, hydra_session

QUICKSTART = ["--cluster", "slurm_local", "--protocol", "quickstart", "--dry-run"]
INJECTED = "touch /tmp/kdexp-injected"


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def directives(text: str) -> list[str]:
    """The options sbatch reads: the `#SBATCH` lines up to the first line that is not a comment, each
    parsed with the shell's quoting (which sbatch honours)."""
    options = []
    for line in text.splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            word, option = shlex.split(line)
            options.append(option)
    return options


def test_every_value_is_read_back_as_written_and_all_directives_come_first(tmp_path):
    log = tmp_path / "out b#c'd" / "driver-%j.out"
    options = ["--time=20", "--constraint=a100&ib|h100", f"--comment=x'; {INJECTED}; '#", "--exclusive"]
    launcher = OmegaConf.create({"setup": ["module load cuda"]})
    text = sbatch.script("kdexp-quickstart-canary", log, ["echo run"], tmp_path, launcher, options, "a test")
    assert directives(text) == ["--job-name=kdexp-quickstart-canary", f"--output={log}", *options]
    lines = text.splitlines()
    assert sum(line.startswith("#SBATCH") for line in lines) == len(options) + 2  # none left below the header
    assert lines[len(options) + 4:] == ["set -eo pipefail", f"cd {tmp_path}", "module load cuda", "echo run"]


@pytest.mark.parametrize("option, refusal", [
    (f"--partition=a100\n{INJECTED}", f"#SBATCH --partition='a100\\n{INJECTED}': a SLURM name here takes letters, "
                                      "digits and . _ , + - only"),
    ("--qos=high prio", "#SBATCH --qos='high prio': a SLURM name here takes letters"),
    (f"--comment=ok\n{INJECTED}", f"#SBATCH --comment='ok\\n{INJECTED}': a line break or control character"),
    ("--gres=gpu:a100\\:1", "#SBATCH --gres='gpu:a100\\\\:1': sbatch drops a backslash"),
    (f"--x\n{INJECTED}=1", f"sbatch option '--x\\n{INJECTED}=1': an #SBATCH line takes --name=value or --name"),
    ("-p cpu", "sbatch option '-p cpu': an #SBATCH line takes --name=value or --name"),
])
def test_a_value_no_quoting_carries_is_refused_naming_it(tmp_path, option, refusal):
    with pytest.raises(sbatch.DirectiveError) as err:
        sbatch.script("kdexp-x-canary", tmp_path / "%j.out", [], tmp_path, OmegaConf.create({}), [option], "a test")
    line = one_line(str(err.value))
    assert line.startswith(refusal) and line.endswith(": change the launcher config")


def test_a_log_path_sbatch_would_expand_or_split_is_refused(tmp_path):
    empty = OmegaConf.create({})
    with pytest.raises(sbatch.DirectiveError, match=r"a % in the path is a pattern SLURM expands: change the output"):
        sbatch.script("kdexp-x-canary", tmp_path / "a%xb" / "%j.out", [], tmp_path, empty, [], "a test")
    with pytest.raises(sbatch.DirectiveError, match=r"--output='.*\\ntouch.*': a line break"):
        sbatch.script("kdexp-x-canary", tmp_path / f"a\n{INJECTED}" / "%j.out", [], tmp_path, empty, [], "a test")


def run_study(capsys, *argv: str) -> tuple[int, str, str]:
    code = study.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_site_launcher_value_cannot_inject_shell_into_the_canary_or_the_drivers(tmp_path, capsys, monkeypatch):
    """The site YAML's partition reaches the canary's and every driver's script: the dry run refuses it
    as the submission would, in one line naming it; so does launch.check."""
    site = tmp_path / "site" / "hydra" / "launcher"
    site.mkdir(parents=True)
    (site / "evil.yaml").write_text(f'defaults: [slurm_a100, _self_]\npartition: "a100\\n{INJECTED}"\n')
    monkeypatch.setenv("KDEXP_SITE_DIR", str(tmp_path / "site"))
    out = tmp_path / "out"
    code, _, err = run_study(capsys, "--cluster", "evil", "--protocol", "quickstart", "--dry-run", "--output-dir",
                             str(out))
    assert code == 2 and one_line(err) == (
        f"launch.study: the canary's batch script: #SBATCH --partition='a100\\n{INJECTED}': a SLURM name here "
        "takes letters, digits and . _ , + - only: change the launcher config")
    code, _, err = run_study(capsys, "--cluster", "evil", "--protocol", "quickstart", "--dry-run", "--skip-check",
                             "--output-dir", str(out))
    assert code == 2 and one_line(err).startswith("launch.study: the teacher-resnet18 driver's batch script: "
                                                  "#SBATCH --partition='a100\\n")
    assert check.main(["--cluster", "evil", "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err).startswith("launch.check: the canary's batch script: #SBATCH "
                                                        "--partition='a100\\n")
    assert not out.exists()


def test_an_output_dir_with_a_line_break_is_refused_by_the_dry_run(tmp_path, capsys, cluster_site):
    out = tmp_path / f"x\n{INJECTED}"
    code, _, err = run_study(capsys, *QUICKSTART, "--output-dir", str(out))
    assert code == 2
    assert one_line(err).startswith(f"launch.study: the canary's batch script: #SBATCH --output='{tmp_path}/x\\n"
                                    f"{INJECTED}/quickstart/canary/%j.out': a line break")
    assert not any(tmp_path.iterdir())


def test_driver_sbatch_takes_only_options_a_directive_carries(capsys):
    for option, wrong in (("-p cpu", "an #SBATCH line takes --name=value or --name (e.g. --partition=cpu)"),
                          ("--comment=a\nb", "a line break")):
        with pytest.raises(SystemExit) as exit_:
            study.main([*QUICKSTART, f"--driver-sbatch={option}"])
        assert exit_.value.code == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("python -m launch.study: argument --driver-sbatch: ") and wrong in line


def test_an_output_dir_of_any_printable_name_reaches_every_job_intact(tmp_path, cluster_site):
    """A space, `#`, `'` and `,` (a sweep, unquoted) in the output dir: each driver's command gives its
    jobs exactly that dir, and its scripts carry it (the real cluster runs such a study end to end)."""
    out = tmp_path / "o b#c'd,e"
    with hydra_session():
        plan = build_plan("quickstart", "slurm_local", out, [], sys.executable)
        for d in plan.drivers[:-1]:  # the analysis step takes its dir as an argument
            given = next(a for a in shlex.split(d.lines[-1]) if a.startswith("paths.output_dir="))
            assert compose_job([given]).paths.output_dir == str(out)
    assert plan.experiment_dir == out / "quickstart"
    study.check_scripts(plan, [])
    assert f"--output={plan.study_dir}/analysis-%j.out" in directives(study.driver_script(plan, plan.drivers[-1], []))


def _sacct_answering(tmp_path: Path, *states: str) -> dict[str, str]:
    """PATH with a `sacct` that prints `states` one per call, then the last one again: slurmdbd's
    accounting catching up with a job that already left the queue (a race the test cluster shows at times)."""
    answers = tmp_path / "answers"
    answers.write_text("\n".join(states) + "\n")
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nhead -n 1 {answers}\n[ $(wc -l < {answers}) -gt 1 ] && sed -i 1d {answers}\nexit 0\n")
    fake.chmod(0o755)
    return {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}


def test_a_job_accounting_still_shows_pending_is_asked_again_until_it_ended(tmp_path, monkeypatch):
    """launch.check said `canary job 6 PENDING before kdexp.check finished` for a job that had failed:
    sacct read before slurmdbd recorded the end. A live state is never reported as how a job ended."""
    monkeypatch.setenv("PATH", _sacct_answering(tmp_path, "PENDING", "PENDING", "FAILED")["PATH"])
    assert sbatch.final_state("6", wait_s=10) == "FAILED"
    (tmp_path / "never").mkdir()
    monkeypatch.setenv("PATH", _sacct_answering(tmp_path / "never", "RUNNING")["PATH"])
    assert sbatch.final_state("6", wait_s=1) is None  # the caller says "ended"
