"""experiment=cifar100_kd: the benchmark's pairs x methods x seeds, each method at the setting its
authors published for the pair, and protocol=crd's lr for the networks the reference trains at 0.01.

The whole multirun is dry-run once through the entry point (its jobs expand, compose and validate, each
into its own dir, at its published setting, with nothing missing but the teachers); in process, the
settings of a few pairs per method, the LS method options and protocol=crd's lr rule."""
from __future__ import annotations

import itertools

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from helpers import compose_cfg, run_train
from job_record import job_args, recorded
from kdexp.data.cifar import CIFAR100_LAYOUT
from kdexp.data.fake import write_fake_cifar

PAIRS = {"r56_to_r20": ("resnet56", "resnet20"), "r110_to_r32": ("resnet110", "resnet32"),
         "r32x4_to_r8x4": ("resnet32x4", "resnet8x4"), "wrn40_2_to_wrn16_2": ("wrn_40_2", "wrn_16_2"),
         "wrn40_2_to_wrn40_1": ("wrn_40_2", "wrn_40_1"), "vgg13_to_vgg8": ("vgg13", "vgg8"),
         "vgg13_to_mobilenetv2": ("vgg13", "mobilenetv2"), "r32x4_to_shufflenetv2": ("resnet32x4", "shufflenetv2")}
# method option -> the KD label of its runs (what analysis and the published file call it)
METHODS = {"ce": "ce", "logit": "logit", "dkd": "dkd", "crd": "crd", "reviewkd": "reviewkd", "mlkd": "mlkd",
           "ctkd": "ctkd", "logit_std": "logit(std)", "dkd_std": "dkd(std)", "ctkd_std": "ctkd(std)"}
SEEDS = (0, 1, 2)
MOBILE = ("mobilenetv2", "shufflenetv2")  # RepDistiller trains MobileNetV2/ShuffleV1/ShuffleV2 at lr 0.01

# Published per-pair settings, as read from the authors' code (the YAML files cite file and commit).
DKD_BETA = {"r56_to_r20": 2.0, "r110_to_r32": 2.0, "r32x4_to_r8x4": 8.0, "wrn40_2_to_wrn16_2": 6.0,
            "wrn40_2_to_wrn40_1": 6.0, "vgg13_to_vgg8": 6.0, "vgg13_to_mobilenetv2": 6.0,
            "r32x4_to_shufflenetv2": 8.0}  # mdistiller configs/cifar100/dkd/*.yaml
# dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh --kd-loss-weight (mdistiller's 5.0 where it has none)
REVIEWKD_WEIGHT = {"r56_to_r20": 0.6, "r110_to_r32": 1.0, "r32x4_to_shufflenetv2": 8.0}
# sunshangquan/logit-standardization-KD logs/KD/kd,<teacher>,<student>,<T>,<KD weight>.txt
KD_LS = {"vgg13_to_vgg8": (3.0, 9.0), "vgg13_to_mobilenetv2": (3.0, 9.0)}  # (T, kd_weight); others (2, 9)
# logs/DKD/dkd,<teacher>,<student>,<T>,<KD weight>[,<beta>].txt: (T, KD weight, beta; 8 where the name has none)
DKD_LS = {"r56_to_r20": (3, 18, 2.0), "r110_to_r32": (2, 15, 2.0), "r32x4_to_r8x4": (2, 9, 8.0),
          "wrn40_2_to_wrn16_2": (2, 12, 2.0), "wrn40_2_to_wrn40_1": (2, 12, 2.0), "vgg13_to_vgg8": (2, 15, 2.0),
          "vgg13_to_mobilenetv2": (3, 9, 2.0), "r32x4_to_shufflenetv2": (2, 9, 8.0)}


def published_setting(pair: str, method: str) -> dict:
    """The method keys a benchmark job of `pair` must have (a subset of its method config)."""
    if method == "logit":
        return {"alpha": 0.9, "T": 4.0, "standardize": False}
    if method == "dkd":
        return {"alpha": 1.0, "beta": DKD_BETA[pair], "T": 4.0, "warmup": 20, "standardize": False}
    if method == "crd":  # the published "CRD" row: CE 1, KD 0, CRD 0.8
        return {"beta": 0.8, "ce_weight": 1.0, "kd_weight": 0.0, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5}
    if method == "reviewkd":
        return {"kd_weight": REVIEWKD_WEIGHT.get(pair, 5.0), "ce_weight": 1.0, "warmup": 20}
    if method == "mlkd":
        return {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    if method == "ctkd":
        return {"alpha": 0.9, "t_min": 1.0, "t_range": 20.0, "lambda_epochs": 10, "standardize": False}
    if method == "logit_std":
        T, kd_weight = KD_LS.get(pair, (2.0, 9.0))
        return {"alpha": None, "kd_weight": kd_weight, "ce_weight": 0.1, "T": T, "standardize": True}
    if method == "dkd_std":  # their tools/train.py: alpha and beta times the KD weight, CE 1, warm-up 20
        T, weight, beta = DKD_LS[pair]
        return {"alpha": float(weight), "beta": beta * weight, "T": float(T), "warmup": 20, "standardize": True}
    if method == "ctkd_std":  # CTKD/scripts/run_cifar_distill.sh -r 0.1 -a 9, every pair
        return {"alpha": None, "kd_weight": 9.0, "ce_weight": 0.1, "t_range": 20.0, "standardize": True}
    return {}


def method_keys(cfg, keys) -> dict:
    return {key: cfg[key] for key in keys}


# In process, a few pairs per method (the dry run below checks every job): two pairs, and a third for
# the methods whose setting is per pair, so each of those is seen at different values.
FEW = ("r56_to_r20", "vgg13_to_mobilenetv2")
PER_PAIR = ("dkd", "reviewkd", "logit_std", "dkd_std")


@pytest.mark.parametrize("pair, method", [(p, m) for m in METHODS if m != "ce"
                                          for p in FEW + (("r32x4_to_r8x4",) if m in PER_PAIR else ())])
def test_each_method_composes_its_published_setting_for_the_pair(pair, method):
    cfg = compose_cfg("experiment=cifar100_kd", f"pair={pair}", f"method={method}")
    expected = published_setting(pair, method)
    assert method_keys(cfg.method, expected) == expected
    assert get_class(cfg.method._target_).label(cfg.method) == METHODS[method]
    # only MLKD trains on a second, strongly augmented view (made by the reference PIL loader)
    assert (cfg.data.strong_view, cfg.data.loader) == (("randaugment", "torch") if method == "mlkd" else (None, "tensor"))


def test_a_command_line_value_beats_the_published_setting():
    cfg = compose_cfg("experiment=cifar100_kd", "pair=vgg13_to_vgg8", "method=logit_std", "method.T=5")
    assert (cfg.method.T, cfg.method.kd_weight) == (5.0, 9.0)
    cfg = compose_cfg("experiment=cifar100_kd", "pair=r56_to_r20", "method=mlkd", "data.strong_view=null")
    assert cfg.data.strong_view is None and cfg.data.loader == "torch"


def test_the_ls_options_are_their_methods_with_standardized_logits():
    """method=logit_std / dkd_std / ctkd_std are method=logit / dkd / ctkd (same schema and target) at
    the LS authors' defaults; off the benchmark pairs (no per-pair file) those defaults apply."""
    for option, base in (("logit_std", "logit"), ("dkd_std", "dkd"), ("ctkd_std", "ctkd")):
        std, plain = compose_cfg(f"method={option}").method, compose_cfg(f"method={base}").method
        assert OmegaConf.get_type(std) is OmegaConf.get_type(plain) and std._target_ == plain._target_
        assert std.standardize and not plain.standardize
    assert method_keys(compose_cfg("pair=r50_to_r18", "method=dkd_std").method, ["alpha", "beta", "T"]) == \
        {"alpha": 9.0, "beta": 72.0, "T": 2.0}


@pytest.mark.parametrize("arch, lr", [("mobilenetv2", 0.01), ("shufflenetv2", 0.01), ("vgg13", 0.05),
                                      ("resnet32x4", 0.05), ("wrn_40_2", 0.05)])
def test_protocol_crd_trains_mobilenetv2_and_shufflenetv2_at_lr_0_01_as_teachers_too(arch, lr):
    assert compose_cfg("experiment=teacher", "protocol=crd", f"model={arch}").trainer.lr == lr
    assert compose_cfg("experiment=baseline", "protocol=crd", f"model={arch}").trainer.lr == lr


def test_the_students_of_the_cross_family_pairs_get_it_and_the_command_line_wins():
    for pair, (_, student) in PAIRS.items():
        assert compose_cfg("protocol=crd", f"pair={pair}", "method=logit").trainer.lr == \
            (0.01 if student in MOBILE else 0.05)
    assert compose_cfg("protocol=crd", "pair=vgg13_to_mobilenetv2", "method=dkd", "trainer.lr=0.02").trainer.lr == 0.02
    assert compose_cfg("experiment=teacher", "protocol=crd", "model=shufflenetv2", "trainer.lr=0.1").trainer.lr == 0.1
    # the 0.01 is protocol=crd's rule, not the network's: v2 keeps its own lr
    assert compose_cfg("protocol=v2", "model=mobilenetv2").trainer.lr == compose_cfg("protocol=v2").trainer.lr


@pytest.mark.e2e
def test_the_multirun_dry_runs_pairs_x_methods_x_seeds_missing_only_the_teachers(tmp_path):
    """`python -m kdexp.train -m experiment=cifar100_kd dry_run=true` (CIFAR-100's layout generated, no
    teacher trained): every job composes and validates into its own dir at its published setting."""
    data = tmp_path / "data"
    write_fake_cifar(data, train_size=200, test_size=100, layout=CIFAR100_LAYOUT)
    record, env = job_args(tmp_path / "jobs")
    proc = run_train("-m", "experiment=cifar100_kd", "dry_run=true", f"paths.output_dir={tmp_path / 'out'}",
                     f"data.root={data}", "data.verify_md5=false", *record, env=env)
    n, students = len(PAIRS) * len(METHODS) * len(SEEDS), len(PAIRS) * (len(METHODS) - 1) * len(SEEDS)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and f"multirun summary: {n} dry_run\n" in output, output[-3000:]
    assert f"{students} jobs need one of 5 missing teachers" in output and f"dry run: {students} jobs would fail" in output
    jobs = recorded(tmp_path / "jobs")
    assert len(jobs) == n and not list((tmp_path / "out").rglob("*"))  # n distinct run dirs, none written
    label_option = {label: option for option, label in METHODS.items()}
    got = []
    for job in jobs.values():
        method = job["method"]
        option = label_option[get_class(method["_target_"]).label(method)]
        pair = next(p for p, (_, student) in PAIRS.items() if student == job["model"]["arch"])  # all distinct
        assert job["teacher"]["arch"] == (None if option == "ce" else PAIRS[pair][0])
        got.append((pair, option, job["seed"]))
        assert method_keys(method, published_setting(pair, option)) == published_setting(pair, option)
        assert job["trainer"]["epochs"] == 240 and job["trainer"]["lr"] == (0.01 if PAIRS[pair][1] in MOBILE else 0.05)
        assert job["data"]["strong_view"] == ("randaugment" if option == "mlkd" else None)
    assert sorted(got) == sorted(itertools.product(PAIRS, METHODS, SEEDS))
