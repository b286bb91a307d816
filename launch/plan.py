"""The study as a chain of driver jobs: what each stage runs, after what, and what it costs.

A driver is one CPU-only SLURM job. A training driver runs one Hydra multirun; its jobs are
composed here (launch.sweep) and checked with kdexp's own validation, so a bad override fails
here, naming the stage and job, rather than on the GPU nodes; and the plan knows every run dir,
whether it has completed, and which teacher it needs: a student driver depends on the teacher
driver that exports the checkpoint its config names. The other drivers are small CPU steps (v2
selection, analysis) marked done by the file they write. Build a plan inside
`launch.sweep.hydra_session()`.

What the study trains is read from the configs, never restated here: the pairs, seeds and protocol
from the experiment preset a protocol runs (conf/experiment/paper_v1.yaml: `hydra.sweeper.params.pair`,
composed as `kdexp.train -m experiment=paper_v1` composes it), each pair's networks from
conf/pair/, and each grid's cells from its conf/kd_grid/ preset. A protocol only names its default
grids (`launch.study --grids` chooses others, e.g. logit,feature,dkd: one students' driver per pair
and grid).

Stage 0, the canary (launch.check), is `python -m kdexp.check` as one short GPU job on the
students' launcher, composed from their config: the launcher node and the execution profile they
train with.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kdexp.config import ConfigError, method_tag, validate
from kdexp.teachers import resolve_teacher_export_path
from kdexp.records import kept_result
from kdexp.teachers import resolve_teacher_path
from launch import sbatch
from launch.epoch_time import run_hours
from launch.sweep import compose_job, compose_jobs, expand, run_dir, task_config

STUDY_DIR = ".study"
CANARY_DIR = "canary"
# The canary's time limit: the full check is meant to take minutes on one GPU (not yet timed there);
# tiny, on a CPU, ~30 s.
CHECK_MINUTES = 20
# Every override of the study command goes to every training job: one that a stage cannot take is an error.
EVERY_JOB = "launch.study passes every override to every training job, so it takes only keys that every stage has"


class PlanError(ValueError):
    """Bad input found while planning (a launcher, an override, a path): one line for the user."""


class OneLineParser(argparse.ArgumentParser):
    """The launch commands' argument parser: an error is one line (exit 2), not usage + message."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def require_writable(path: Path, hint: str = "choose another --output-dir") -> None:
    """`path` must be creatable and writable, found without writing anything (a dry run leaves no trace)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "not writable"
        raise PlanError(f"cannot write {path}: {existing} is {why}; {hint}")


def hydra_error(err: HydraException) -> str:
    """A Hydra error (a bad override, a missing config) in one line, naming the override where it can."""
    override = getattr(err, "override", None)  # a parse error does not name the override it is about
    return f"{override}: {str(err).splitlines()[0]}" if override else str(err).splitlines()[0]


def output_dir_override(path: Path) -> str:
    """`paths.output_dir=PATH` as Hydra reads it back: quoted where its override grammar would read the
    path otherwise (a `,` makes a sweep; a space, `#` or `'` is an error or lost)."""
    text = str(path)
    plain = re.fullmatch(r"[A-Za-z0-9_/.+@-]+", text)
    return f"paths.output_dir={text if plain else QuotedString(text=text, quote=Quote.single).with_quotes()}"


@dataclass
class Job:
    """One training run of a driver's multirun."""

    overrides: list[str]
    cfg: DictConfig

    @property
    def run_dir(self) -> Path:
        return run_dir(self.cfg)

    @property
    def gpu_hours(self) -> float:
        """Modelled A100 hours (launch.epoch_time)."""
        return run_hours(self.cfg)

    def describe(self) -> str:
        """Which job of its stage: `resnet34 seed 0`, `resnet50->resnet18 logit_a0.5_T4 seed 2`."""
        c = self.cfg
        head = f"{c.teacher.arch}->{c.model.arch} {method_tag(c.method)}" if c.teacher.arch else c.model.arch
        return f"{head} seed {c.seed}"

    def status(self) -> str:
        """completed | failed (while training, and retry_failed is off: the next submission skips it and
        counts it as failed) | missing (not run, still running, killed, failed before training,
        retried, or a corrupt result: the next submission runs it)."""
        kept = kept_result(self.run_dir, retry_failed=self.cfg.retry_failed)
        return kept["status"] if kept else "missing"


@dataclass
class Driver:
    name: str
    stage: str
    lines: list[str]                  # the shell lines the driver job runs; its command is the last
    jobs: list[Job] = field(default_factory=list)
    launcher: str | None = None       # training drivers: the hydra/launcher of their GPU jobs
    after: list[str] = field(default_factory=list)
    dependency: str = "afterok"
    output: Path | None = None        # CPU steps: the file they write marks them done
    outdated: bool = False            # CPU steps: their file exists but misses part of this plan
    files: dict[Path, str] = field(default_factory=dict)  # written before the driver is submitted
    awaits_selection: bool = False    # v2 finals before selected.json: cells unknown, never done

    def done(self) -> bool:
        if self.output is not None:
            return self.output.is_file() and not self.outdated
        return not self.awaits_selection and all(j.status() == "completed" for j in self.jobs)


@dataclass
class Canary:
    """Stage 0: `python -m kdexp.check` as one short GPU job on the students' launcher (partition,
    GPU resources, setup lines), run as their jobs run (srun). The drivers of a submission wait for it
    (afterok), so a node environment that cannot run kdexp costs this one job, not the study. Every
    canary writes <root>/<job id>/ (check.json, check.log): a record of each, none overwritten."""

    launcher: DictConfig
    launcher_name: str
    root: Path                        # <experiment dir>/canary
    lines: list[str]
    minutes: int = CHECK_MINUTES

    def out_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def log(self, job_id: str) -> Path:
        """SLURM's output of the job: the check's lines, and what failed before it could start."""
        return self.root / f"{job_id}.out"

    def options(self) -> list[str]:
        return sbatch.gpu_options(self.launcher, self.minutes)


def canary_of(job: DictConfig, python: str) -> Canary:
    """The canary of jobs composed like `job`: on their launcher, checking the execution profile they
    train with (their `execution` option's name), writing under their experiment dir."""
    execution = OmegaConf.select(job, "execution.name")  # the profile an execution option is (fast, reference)
    root = Path(job.hydra.sweep.dir).absolute() / CANARY_DIR
    check = shlex.join([python, "-m", "kdexp.check", *(["--execution", execution] if execution else []), "--out"])
    # the job id is known once the job runs: unquoted, so that the shell expands it
    line = f'srun --unbuffered {check} {shlex.quote(str(root))}/"$SLURM_JOB_ID"'
    return Canary(job.hydra.launcher, job.hydra.runtime.choices["hydra/launcher"], root, [line])


@dataclass
class Plan:
    protocol: str
    cluster: str
    teacher_launcher: str             # <cluster>_teacher where that config exists, else the cluster
    experiment_dir: Path
    stages: list[str]
    drivers: list[Driver]
    launcher: DictConfig              # the cluster's launcher node: the drivers' partition, account, ...
    canary: Canary | None = None      # stage 0, unless skipped

    @property
    def study_dir(self) -> Path:
        return self.experiment_dir / STUDY_DIR

    def stage_drivers(self, stage: str) -> list[Driver]:
        return [d for d in self.drivers if d.stage == stage]


def estimate(jobs: Sequence[Job]) -> str:
    """`39.9 GPU-h`: the jobs' modelled A100 hours."""
    return f"{sum(j.gpu_hours for j in jobs):.1f} GPU-h"


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair of conf/pair/ as its group options, e.g. r34_to_r18: resnet34 -> resnet18."""

    name: str
    teacher: str  # the pair's teacher option, also its teacher run's model option
    student: str


@dataclass(frozen=True)
class Experiment:
    """What an experiment preset says the study trains, composed as `kdexp.train -m experiment=NAME` does."""

    name: str
    protocol: str  # its protocol and seeds options
    seeds: str
    pairs: list[Pair]

    @property
    def teachers(self) -> list[str]:
        return list(dict.fromkeys(p.teacher for p in self.pairs))

    @property
    def students(self) -> list[str]:
        return list(dict.fromkeys(p.student for p in self.pairs))


def swept(cfg: DictConfig, key: str) -> list[str]:
    """The values a composed config's `hydra.sweeper.params` gives `key` (none when it has none)."""
    value = (cfg.hydra.sweeper.params or {}).get(key)
    if value is None:
        return []
    override = OverridesParser.create().parse_override(f"{key}={value}")
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(override.value())]


def read_experiment(name: str) -> Experiment:
    """The experiment preset `name`: its protocol, seeds and pairs (each pair composed for its networks)."""
    cfg = compose_job([f"experiment={name}"])
    pairs = []
    for pair in swept(cfg, "pair"):
        choices = compose_job([f"experiment={name}", f"pair={pair}"]).hydra.runtime.choices
        pairs.append(Pair(pair, choices.teacher, choices.model))
    choices = cfg.hydra.runtime.choices
    return Experiment(name, choices.protocol, choices.seeds, pairs)


def check_grids(grids: Sequence[str]) -> None:
    """Each grid must be a kd_grid preset that sweeps its method's hyperparameters."""
    for grid in grids:
        try:
            params = compose_job([f"kd_grid={grid}"]).hydra.sweeper.params or {}
        except HydraException:  # no such preset
            params = {}
        if not any(key.startswith("method.") for key in params):
            presets = GlobalHydra.instance().config_loader().get_group_options("kd_grid")
            raise PlanError(f"--grids: {grid} is no kd_grid preset sweeping method.* (conf/kd_grid/{grid}.yaml or "
                            f"$KDEXP_SITE_DIR/kd_grid/{grid}.yaml); conf/kd_grid has: {', '.join(presets)}")


@dataclass(frozen=True)
class _Ctx:
    cluster: str
    teacher_launcher: str
    output_dir: Path
    extra: tuple[str, ...]
    python: str
    grids: tuple[str, ...]

    def command(self, module: str, *args: str) -> str:
        return shlex.join([self.python, "-m", module, *args])

    def train(self, name: str, stage: str, overrides: Sequence[str], teacher: bool = False,
              cell: Sequence[str] = ()) -> Driver:
        """A driver running `python -m kdexp.train -m overrides ...`; `cell` is composed into its
        jobs but left out of its command (the v2 finals read it from selected.json when they start)."""
        launcher = self.teacher_launcher if teacher else self.cluster
        own = [*overrides, output_dir_override(self.output_dir), f"hydra/launcher={launcher}"]
        try:
            overrides = expand([*own, *self.extra, *cell])
            jobs = [Job(o, cfg) for o, cfg in zip(overrides, compose_jobs(overrides))]
        except HydraException as err:
            raise PlanError(f"stage {stage} ({_first_job(own, cell) or name}): {_composition_error(err)}") from err
        for job in jobs:  # kdexp.train's own checks, so a bad value fails here and not on a GPU node
            try:
                validate(task_config(job.cfg))
            except ConfigError as err:
                raise PlanError(f"stage {stage} ({job.describe()}): {err}") from err
        return Driver(name, stage, [self.command("kdexp.train", "-m", *own, *self.extra)], jobs, launcher=launcher)


def _first_job(overrides: Sequence[str], cell: Sequence[str]) -> str | None:
    """The first job of a driver whose study overrides did not compose, described without them."""
    try:
        return Job([], compose_job(expand([*overrides, *cell])[0])).describe()
    except HydraException:
        return None


def _composition_error(err: HydraException) -> str:
    """Hydra's error in one line, without its advice to add a missing key with `+` (never what the
    study wants: the key would reach jobs whose config does not use it)."""
    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return f"its config has no key {cause.full_key}; {EVERY_JOB}"
    return ": ".join([str(err).splitlines()[0], *str(cause or "").splitlines()[:1]])


def missing_launcher(name: str) -> str | None:
    """Why hydra/launcher=name cannot be composed (None when it can): site configs live outside the
    repo, in $KDEXP_SITE_DIR/hydra/launcher/, which an unset or mistyped KDEXP_SITE_DIR hides."""
    try:
        compose_job([f"hydra/launcher={name}"])
    except MissingConfigException as err:
        site = os.environ.get("KDEXP_SITE_DIR")
        searched = ("KDEXP_SITE_DIR is not set" if not site else f"KDEXP_SITE_DIR={site} does not exist"
                    if not Path(site).is_dir() else f"KDEXP_SITE_DIR={site} has no hydra/launcher/{name}.yaml")
        return (f"no launcher config {name}: {searched}; put site configs in $KDEXP_SITE_DIR/hydra/launcher/ "
                f"(README: Run on your SLURM cluster); available: {', '.join(err.options or [])}")
    return None


def build_plan(protocol: str, cluster: str, output_dir: Path, extra: Sequence[str], python: str,
               grids: Sequence[str] | None = None, check: bool = True) -> Plan:
    """Every driver of the study, in submission order (each after the drivers it depends on), and
    its canary unless `check` is off; the students' stages run `grids` (kd_grid presets; default:
    the protocol's)."""
    problem = missing_launcher(cluster)
    if problem:
        raise PlanError(f"--cluster {cluster}: {problem}")
    teacher_launcher = f"{cluster}_teacher" if missing_launcher(f"{cluster}_teacher") is None else cluster
    spec = PROTOCOLS[protocol]
    if grids and not spec.grids:
        raise PlanError(f"--grids: --protocol {protocol} runs its experiment's own methods, not kd_grid presets")
    grids = tuple(dict.fromkeys(grids or spec.grids))
    check_grids(grids)
    ctx = _Ctx(cluster, teacher_launcher, output_dir, tuple(extra), python, grids)
    drivers = spec.build(ctx)
    _link_teachers(drivers)
    exp_dir = experiment_dir(drivers)
    drivers.append(Driver("analysis", "analysis",
                          [ctx.command("analysis", str(exp_dir), "--out", str(exp_dir / "report"))],
                          after=[d.name for d in drivers], dependency="afterany",
                          output=exp_dir / "report" / "report.html"))
    # the drivers' partition, account, ... and the canary's GPU job: the cluster's launcher as the
    # study's jobs (the students') compose it
    students = next(d.jobs[0].cfg for d in drivers if d.launcher == cluster)
    return Plan(protocol, cluster, teacher_launcher, exp_dir, list(spec.stages), drivers, students.hydra.launcher,
                canary_of(students, python) if check else None)


def _teachers(ctx: _Ctx, exp: Experiment, *overrides: str) -> list[Driver]:
    """One driver per teacher network of the experiment's pairs, exporting it for the students."""
    return [ctx.train(f"teacher-{arch}", "teachers", ["experiment=teacher", f"protocol={exp.protocol}", *overrides,
                                                      f"model={arch}"], teacher=True)
            for arch in exp.teachers]


def _baselines(ctx: _Ctx, exp: Experiment, stage: str, seeds: str) -> Driver:
    """The experiment's student networks trained alone with CE."""
    return ctx.train("baselines", stage, ["experiment=baseline", f"protocol={exp.protocol}", f"seeds={seeds}",
                                          f"model={','.join(exp.students)}"])


def _v1(ctx: _Ctx) -> list[Driver]:
    exp = read_experiment("paper_v1")
    teachers = _teachers(ctx, exp)  # composed and checked first: a bad override is reported for the first stage
    students = [ctx.train(f"{grid}-{pair.name}", "students", [f"experiment={exp.name}", f"kd_grid={grid}",
                                                               f"pair={pair.name}"])
                for pair in exp.pairs for grid in ctx.grids]
    return [*teachers, *students, _baselines(ctx, exp, "students", exp.seeds)]


def _v2(ctx: _Ctx) -> list[Driver]:
    exp = read_experiment("paper_v2")
    teachers = _teachers(ctx, exp, "seeds=paper")
    selection = {(pair.name, grid): ctx.train(f"selection-{grid}-{pair.name}", "selection",
                                              [f"experiment={exp.name}", f"kd_grid={grid}", f"pair={pair.name}"])
                 for pair in exp.pairs for grid in ctx.grids}
    exp_dir = experiment_dir([*teachers, *selection.values()])
    manifest = exp_dir / STUDY_DIR / "selection-runs.json"
    selected = exp_dir / "selected.json"
    runs = {p.name: {g: [str(j.run_dir) for j in selection[p.name, g].jobs] for g in ctx.grids} for p in exp.pairs}
    chosen = json.loads(selected.read_text())["selected"] if selected.is_file() else {}
    cells = {key: chosen.get(key[0], {}).get(key[1], {}).get("overrides") for key in selection}
    select = Driver("select", "select", [ctx.command("launch.select", "pick", str(manifest), "--out", str(selected))],
                    after=[d.name for d in selection.values()], output=selected,
                    outdated=None in cells.values(),  # e.g. a grid added since: select again
                    files={manifest: json.dumps(runs, indent=1) + "\n"})
    finals = [_final(ctx, exp.protocol, pair, grid, selected, cells[pair, grid], selection[pair, grid])
              for pair, grid in selection]
    return [*teachers, *selection.values(), select, *finals, _baselines(ctx, exp, "finals", "five")]


def _quickstart(ctx: _Ctx) -> list[Driver]:
    """The Makefile's quickstart as a study: a width-16 R18 teacher, its grids (experiment=quickstart's
    teacher and seeds; by default its smoke grid), 2 baselines."""
    teacher = ctx.train("teacher-resnet18", "teachers",
                        ["experiment=teacher", "protocol=quickstart", "model.width=16"], teacher=True)
    students = [ctx.train(f"{grid}-quickstart", "students", ["protocol=quickstart", "experiment=quickstart",
                                                             f"kd_grid={grid}"]) for grid in ctx.grids]
    baselines = ctx.train("baselines", "students", ["experiment=baseline", "protocol=quickstart", "seed=0,1"])
    return [teacher, *students, baselines]


def _cifar100(ctx: _Ctx) -> list[Driver]:
    """The CIFAR-100 benchmark: its teachers, then experiment=cifar100_kd's one multirun (its pairs x
    its methods x seeds: the methods are the experiment's own sweep, not kd_grid presets)."""
    exp = read_experiment("cifar100_kd")
    return [*_teachers(ctx, exp), ctx.train("benchmark", "students", [f"experiment={exp.name}"])]


def _imagenet(ctx: _Ctx) -> list[Driver]:
    """The ImageNet benchmark: experiment=imagenet_kd's one multirun (R34 -> R18 x {CE, KD, DKD, DIST} x
    seeds). No teacher stage: its teacher is torchvision's weights file, evaluated, never trained."""
    return [ctx.train("benchmark", "students", ["experiment=imagenet_kd"])]


def _final(ctx: _Ctx, protocol: str, pair: str, grid: str, selected: Path, cell: list[str] | None,
           selection: Driver) -> Driver:
    """The selected cell of `grid` (the kd_grid preset: the cell's overrides replace its sweep) x five
    seeds. Before the selection its first cell stands in, so the plan counts the runs it will have."""
    stand_in = [o for o in selection.jobs[0].overrides if o.startswith("method.")]
    driver = ctx.train(f"final-{grid}-{pair}", "finals",
                       [f"protocol={protocol}", "seeds=five", f"pair={pair}", f"kd_grid={grid}"],
                       cell=stand_in if cell is None else cell)
    # the cell's overrides (e.g. method.alpha=0.5 method.T=4) as separate words: $cell unquoted
    driver.lines = [f"cell=$({ctx.command('launch.select', 'cell', str(selected), pair, grid)})",
                    f"{driver.lines[-1]} $cell"]
    driver.after.append("select")
    driver.awaits_selection = cell is None
    return driver


def _link_teachers(drivers: list[Driver]) -> None:
    """Each student driver waits (afterok) for the drivers exporting the teachers it loads."""
    exporters = {resolve_teacher_export_path(j.cfg): d.name for d in drivers for j in d.jobs if j.cfg.export_teacher}
    for d in drivers:
        needed = {resolve_teacher_path(j.cfg) for j in d.jobs if j.cfg.teacher.arch}
        d.after += sorted({exporters[p] for p in needed if p in exporters} - set(d.after))


def experiment_dir(drivers: list[Driver]) -> Path:
    """The one dir every run lands in: where .study/, selected.json and the report go too."""
    dirs = sorted({j.cfg.hydra.sweep.dir for d in drivers for j in d.jobs})
    if len(dirs) != 1:
        raise PlanError(f"the study's runs must share one experiment dir, but they would go to {', '.join(dirs)}")
    return Path(dirs[0])


@dataclass(frozen=True)
class Protocol:
    """A study protocol: its stages, the grids it runs by default, and how its drivers are built."""

    stages: tuple[str, ...]
    grids: tuple[str, ...]  # the kd_grid presets its students' stages run unless --grids says otherwise
    build: Callable[[_Ctx], list[Driver]]


PROTOCOLS = {
    "v1": Protocol(("teachers", "students", "analysis"), ("logit", "feature"), _v1),
    "v2": Protocol(("teachers", "selection", "select", "finals", "analysis"), ("logit", "feature"), _v2),
    "quickstart": Protocol(("teachers", "students", "analysis"), ("smoke",), _quickstart),
    "cifar100": Protocol(("teachers", "students", "analysis"), (), _cifar100),
    "imagenet": Protocol(("students", "analysis"), (), _imagenet),
}
