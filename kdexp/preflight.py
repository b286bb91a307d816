"""The command line's config composed once before Hydra runs it, so that a misspelt option, key or
value is one line naming the override, what is wrong and the nearest valid choice, instead of
Hydra's multi-line report (and its exit code 1, which kdexp keeps for failed training). What Hydra
itself acts on before any kdexp code runs is checked here too: the experiment's folder name (Hydra
makes the run dir) and a swept dry_run (Hydra picks the launcher once for the whole multirun).

A multirun is composed once per value of each swept override (the other overrides at their first
value), not once per job: every value is checked, for about a third of a second per composition.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser hydra.main reads its command line with
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from kdexp import dry_run
from kdexp.config import experiment_name_problem

SCHEMA_PREFIX = "base_"  # kdexp.config's structured schemas, stored in each group: not choices for a user
# Sweeps whose values only the sweeper knows (glob over the group, intervals for an optimiser).
UNLISTED_SWEEPS = (ValueType.GLOB_CHOICE_SWEEP, ValueType.INTERVAL_SWEEP)


def config_problem(argv: Sequence[str], config_dir: str, config_name: str) -> str | None:
    """Why the config `argv` (kdexp.train's command line) asks for cannot be composed or launched;
    None when it can, or when the command line is for Hydra itself (--help, --info, another config dir)."""
    args = get_args_parser().parse_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir \
            or args.config_path or args.experimental_rerun:
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as err:
        return _summary(err)
    name = args.config_name or config_name
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for trial in _trials(overrides):
            try:
                cfg = compose(name, overrides=trial, return_hydra_config=True)
                problem = _hydra_problem(cfg, overrides)
            except HydraException as err:
                return _describe(err, trial, name)
            except OmegaConfBaseException as err:  # e.g. an interpolation in experiment_name
                return _summary(err)
            except (yaml.YAMLError, UnicodeDecodeError) as err:  # a config file (a site launcher, say) Hydra cannot read
                return config_file_problem(err)
            if problem:
                return problem
    return None


def config_file_problem(err: yaml.YAMLError | UnicodeDecodeError) -> str:
    """A config file that is not valid YAML, or not UTF-8 text, in one line: the file, the line and
    what is wrong there (Hydra passes PyYAML's and the decoder's errors on as tracebacks)."""
    if isinstance(err, UnicodeDecodeError):
        return (f"{_file_being_read(err) or 'a config file'}: not UTF-8 text ({err.reason} at byte {err.start}); "
                f"save that file as UTF-8")
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # a character YAML does not allow: a position, not a line (ReaderError)
        name = getattr(err, "name", None)
        return f"{name + ': ' if name else ''}malformed YAML: {_summary(err)}; fix that file"
    context = f" ({err.context})" if getattr(err, "context", None) else ""
    return f"{mark.name}, line {mark.line + 1}: malformed YAML: {err.problem}{context}; fix that file"


def _file_being_read(err: BaseException) -> str | None:
    """The config file a decoding error came from: Hydra's file source holds it in `full_path` (the
    error itself names no file)."""
    tb, path = err.__traceback__, None
    while tb is not None:
        path = tb.tb_frame.f_locals.get("full_path", path)
        tb = tb.tb_next
    return path if isinstance(path, str) else None


def _hydra_problem(cfg: DictConfig, overrides: list[Override]) -> str | None:
    """What Hydra would act on wrongly before kdexp's own checks run: a swept dry_run (it picks the
    launcher once for the whole multirun) and the experiment's folder name (it makes the run dir)."""
    return dry_run.sweep_problem(overrides, cfg.hydra.sweeper.get("params") or {}) or \
        experiment_name_problem(cfg.experiment_name)


def _trials(overrides: list[Override]) -> list[list[str]]:
    """Override lists that together use every value of every sweep: the first values, then each
    other value of one sweep at a time."""
    values = [v for v in map(_values, overrides) if v]
    first = [v[0] for v in values]
    return [first] + [first[:i] + [value] + first[i + 1:] for i, vs in enumerate(values) for value in vs[1:]]


def _values(o: Override) -> list[str]:
    """`o` as sweep-free overrides, one per value ([] for a sweep only the sweeper can list)."""
    if not o.is_sweep_override():
        return [o.input_line]
    if o.value_type in UNLISTED_SWEEPS:
        return []
    prefix = o.get_key_element()
    return [f"{prefix}={v}" for v in o.sweep_string_iterator()]


def _describe(err: HydraException, trial: list[str], config_name: str) -> str:
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        culprit = next((o for o in trial if _key(o) == group), f"{group}={option}")
        options = sorted(o for o in err.options if not o.startswith(SCHEMA_PREFIX))
        return (f"{culprit}: {group} has no option {option!r}{_nearest(option, options)}; "
                f"its options: {', '.join(options)}")
    if isinstance(err, ConfigCompositionException) and err.__cause__ is not None:
        return f"{_summary(err)} {_summary(err.__cause__)}{_nearest_key(err.__cause__, trial, config_name)}"
    return _summary(err)


# Keys that moved: an old command line gets the new name, not a near miss.
MOVED = {f"trainer.{key}": f"execution.{key} (the execution group: execution=reference|fast)"
         for key in ("amp", "channels_last", "fused", "compile", "teacher_cache")}


def _nearest_key(cause: BaseException, trial: list[str], config_name: str) -> str:
    """` (did you mean trainer.epochs?)` for a misspelt key of a config node."""
    full_key = getattr(cause, "full_key", "")
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not full_key:
        return ""
    if full_key in MOVED:
        return f" ({full_key} is now {MOVED[full_key]})"
    parent, _, key = full_key.rpartition(".")
    # the groups chosen decide which keys exist; the other keys' values do not
    choices = [o for o in trial if "." not in _key(o) and _key(o) != full_key]
    try:
        cfg = compose(config_name, overrides=choices)
    except HydraException:  # a choice is wrong too: the first error is the one to name
        return ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return _nearest(key, list(node.keys()), prefix=f"{parent}." if parent else "") if OmegaConf.is_dict(node) else ""


def _key(override: str) -> str:
    """The key or group an override sets: `model` of `+model@teacher=resnet18`."""
    return override.lstrip("+~").split("=")[0].split("@")[0]


def _nearest(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _summary(err: BaseException) -> str:
    """Hydra's and OmegaConf's message on one line: without the indented detail lines (full_key,
    object_type) and without Hydra's hint to append the key, which a misspelt key does not want."""
    lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    return " ".join(line for line in lines if not line.startswith("To append to your config")) or type(err).__name__
