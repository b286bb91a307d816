"""Every setting is checked before anything is written, naming the key: values out of range, values
of the wrong type (method arguments included, from each method's signature) and keys no schema has,
even when added with `+`."""
import pickle

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from helpers import REPO, TINY, compose_cfg, run_train
from kdexp.config import ConfigError, method_classes, validate
from kdexp.methods import DistillationMethod

KD = ("pair=r34_to_r18", "method=logit")


@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], "seed=-1 must be in [0, 4294967295]"),
    ([*KD, "teacher.seed=-3"], "teacher.seed=-3 must be in [0, 4294967295]"),
    (["data.split_seed=-1"], "data.split_seed=-1 must be in [0, 4294967295]"),
    (["optimizer.weight_decay=-0.0005"], "optimizer.weight_decay=-0.0005 must be >= 0"),
    (["optimizer.momentum=1"], "optimizer.momentum=1.0 must be in [0, 1)"),
    (["optimizer.momentum=-0.1"], "optimizer.momentum=-0.1 must be in [0, 1)"),
    (["optimizer.momentum=0"], "optimizer.nesterov=true needs optimizer.momentum > 0"),
    (["optimizer=adamw", "optimizer.weight_decay=-1"], "optimizer.weight_decay=-1.0 must be >= 0"),
    (["optimizer=adam", "optimizer.betas=[0.9,1.0]"], "optimizer.betas=[0.9, 1.0] must be two values in [0, 1)"),
    (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas=[0.9] must be two values in [0, 1)"),
    (["optimizer=adamw", "optimizer.eps=0"], "optimizer.eps=0.0 must be > 0"),
    (["optimizer=adam", "optimizer.name=sgd"], "optimizer.name='sgd' does not name this optimizer group's settings"),
    (["trainer.label_smoothing=1"], "trainer.label_smoothing=1.0 must be in [0, 1)"),
    (["trainer.label_smoothing=-0.1"], "trainer.label_smoothing=-0.1 must be in [0, 1)"),
    ([*KD, "teacher.label_smoothing=1.5"], "teacher.label_smoothing=1.5 must be in [0, 1)"),
    (["data.val_size=100", "trainer.early_stopping=0"], "trainer.early_stopping=0 must be >= 1"),
    (["data.val_size=0", "trainer.early_stopping=5"], "trainer.early_stopping=5 watches the validation accuracy, but data.val_size=0"),
    (["data.num_classes=1", "model.num_classes=1"], "data.num_classes=1 must be >= 2"),
    (["data.num_classes=100", "model.num_classes=100"], "data.num_classes=100 must be 10: CIFAR-10 has 10 classes"),
    (["data.image_size=0"], "data.image_size=0 must be a positive number of pixels"),
    (["model.init=imagenet"], "model.init=imagenet loads torchvision's resnet18, whose network has the ImageNet stem"),
    ([*KD, "teacher=resnet56", "teacher.init=imagenet"], "teacher.init=imagenet: torchvision has ImageNet weights"),
    (["scheduler.eta_min=0.2"], "scheduler.eta_min=0.2 must be in [0, trainer.lr=0.1]"),
    (["scheduler.eta_min=-1e-4"], "scheduler.eta_min=-0.0001 must be in [0, trainer.lr=0.1]"),
    (["trainer.max_steps_per_epoch=0"], "trainer.max_steps_per_epoch=0 must be > 0, or null"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be > 0"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data=fake_imagenet", "data.loader=tensor"], "data.loader=tensor holds the images in memory, but"),
    (["data.name=cifar1000"], "data.name='cifar1000' must be one of ['cifar10', 'fake', 'cifar100', 'fake_cifar100', "
     "'imagenet', 'fake_imagenet']"),
    (["data=fake", "data.fake_train_size=0"], "data.fake_train_size=0 must be > 0"),
    (["model.num_classes=100"], "model.num_classes=100 must be data.num_classes=10"),
    (["data=fake", "data.num_classes=5", "model.num_classes=10"], "model.num_classes=10 must be data.num_classes=5"),
    ([*KD, "teacher.width=0"], "teacher.width=0 must be a positive number of base channels"),
    ([*KD, "teacher.arch=resnet7"], "teacher.arch='resnet7' is not one of"),
])
def test_out_of_range_values_name_their_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["+trainer.epoch=3"], "trainer.epoch is not a kdexp setting: did you mean trainer.epochs?"),
    (["+data.valsize=10"], "data.valsize is not a kdexp setting: did you mean data.val_size?"),
    ([*KD, "+method.Tx=2"], "method.Tx is not a kdexp setting: did you mean method.T?"),
    ([*KD, "+method.beta=0.3"], "method.beta is not a kdexp setting: the settings under method are alpha, T"),
    (["+recipe_epochs.studnet=3"], "recipe_epochs.studnet is not a kdexp setting: did you mean recipe_epochs.student?"),
    (["+sed=1"], "sed is not a kdexp setting: did you mean seed?"),
    (["+foo=1"], "foo is not a kdexp setting: the settings at the top level are seed, recipe_epochs,"),
    (["+paths.scratch.dir=/tmp"], "paths.scratch is not a kdexp setting"),
])
def test_keys_added_with_plus_are_refused_with_the_nearest_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert message in str(err.value)


@pytest.mark.e2e
def test_an_added_key_is_refused_before_anything_is_written(tmp_path):
    """Hydra's own hint for `trainer.epoch=3` is `+trainer.epoch=3`: it used to train the default
    epochs into a dir named `trainer.epoch=3`, a duplicate row for analysis."""
    proc = run_train(*TINY, "experiment=baseline", "+trainer.epoch=3", f"paths.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdexp: invalid config: trainer.epoch is not a kdexp setting: did you mean trainer.epochs?"
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("override, key", [("method.T=abc", "method.T"), ("method.alpha=high", "method.alpha"),
                                           ("seed=abc", "seed"), ("recipe_epochs.student=x", "recipe_epochs.student")])
def test_wrong_types_are_refused_when_composing_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(*KD, override)
    assert isinstance(err.value.__cause__, ValidationError) and err.value.__cause__.full_key == key


@pytest.mark.e2e
def test_a_non_number_temperature_names_its_key_and_writes_nothing(tmp_path):
    proc = run_train(*TINY, *KD, "method.T=abc", f"paths.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr == ("kdexp: invalid config: Error merging override method.T=abc Value 'abc' of type 'str' "
                           "could not be converted to Float\n")
    assert not list(tmp_path.iterdir())


def test_every_method_config_is_typed_by_its_signature():
    """conf/method/<name>.yaml starts from base_<name>, the schema made from the class's __init__."""
    for cls in method_classes():
        cfg = compose_cfg(*KD, f"method={cls.name}").method
        assert OmegaConf.get_type(cfg) is cls.Config
    assert {"ce", "logit", "feature"} <= {cls.name for cls in method_classes()} <= \
        {p.stem for p in (REPO / "conf" / "method").glob("*.yaml")}


def test_a_new_method_gets_its_schema_from_its_signature_alone():
    class Gamma(DistillationMethod):
        name = "gamma_test"

        def __init__(self, gamma: float = 2.0, hard: bool = False):
            super().__init__()

    node = OmegaConf.structured(Gamma.Config)
    assert OmegaConf.to_container(node) == {"_target_": f"{__name__}.{Gamma.__qualname__}", "gamma": 2.0, "hard": False}
    with pytest.raises(ValidationError):
        node.gamma = "abc"
    with pytest.raises(ValidationError):
        node.hard = "maybe"


def test_composed_config_survives_pickling():
    """The SLURM launcher pickles the composed config: its node types must be importable by name."""
    cfg = compose_cfg(*KD)
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and OmegaConf.get_type(again.method) is OmegaConf.get_type(cfg.method)


@pytest.mark.e2e
def test_a_site_config_with_a_misspelt_top_level_key_does_not_compose(tmp_path):
    """The root has a schema too: a typo in a _global_ config (a site's experiment) is an error, not
    a silently ignored setting."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nseeed: 3\n")
    proc = run_train("experiment=mine", "dry_run=true", f"paths.output_dir={tmp_path}/out",
                     env={"KDEXP_SITE_DIR": str(tmp_path)})
    assert proc.returncode == 2 and "Key 'seeed' not in 'TrainConfig'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
