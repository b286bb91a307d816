"""How a network's weights start (`model.init`): from scratch (null), from torchvision's ImageNet
weights (`imagenet`), or from a local torchvision-format state_dict (a path).

Pretrained weights initialise everything but the classifier, which is re-initialised for
`num_classes` (the ImageNet head has 1000 outputs, and a backbone is what fine-tuning starts from).
kdexp's ResNets with the ImageNet stem at width 64 are torchvision's networks key for key
(tests/test_models.py), so torchvision's weights load without renaming.

ImageNet weights come through torchvision's weights API and torch.hub's cache
(`<torch.hub.get_dir()>/checkpoints`, i.e. `$TORCH_HOME/hub/checkpoints`): downloaded once when
there is internet, read from the cache afterwards, e.g. on compute nodes without internet.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn

from kdexp import checkpoint
from kdexp.models import filled_on_load, state_dict_misfit

IMAGENET = "imagenet"
IMAGENET_WEIGHTS: dict[str, tvm.WeightsEnum] = {
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": tvm.ResNet101_Weights.IMAGENET1K_V1,
}


class InitError(RuntimeError):
    """Initial weights that cannot be had or do not fit; the message says which file and what to do."""


def init_problem(key: str, init: str | None, arch: str, stem: str, width: int) -> str | None:
    """Why `<key>.init=init` cannot initialise this network, found from the config alone (None: it
    can, as far as the config tells)."""
    if init != IMAGENET:
        return None
    if arch not in IMAGENET_WEIGHTS:
        return (f"{key}.init=imagenet: torchvision has ImageNet weights for {', '.join(IMAGENET_WEIGHTS)}, not "
                f"{arch}; use {key}.init=null or a state_dict file of your own ({key}.init=/path/to/weights.pth)")
    if (stem, width) != ("imagenet", 64):
        return (f"{key}.init=imagenet loads torchvision's {arch}, whose network has the ImageNet stem at width 64, "
                f"but {key}.stem={stem} and {key}.width={width}: set {key}.stem=imagenet {key}.width=64")
    return None


def init_name(init: str | None) -> str | None:
    """The init as a teacher's identity names it: `imagenet`, or a state_dict file's name without
    its suffix (a student names the same file without having it)."""
    return init if init in (None, IMAGENET) else Path(init).stem


def cache_file(arch: str) -> Path:
    """Where torch.hub keeps (or will keep) the ImageNet weights of `arch`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_WEIGHTS[arch].url).path).name


def init_missing(init: str, arch: str) -> str | None:
    """Why `model.init=init` cannot be loaded on this machine without a download (None: it can),
    for dry runs: jobs on compute nodes often have no internet."""
    file = cache_file(arch) if init == IMAGENET else Path(init)
    if file.is_file():
        return None
    if init == IMAGENET:
        return f"model.init=imagenet: {file} is not there yet; fetch it where there is internet: {fetch_command(arch)}"
    return f"model.init={init}: no such file"


def fetch_command(arch: str) -> str:
    """The command that downloads `arch`'s ImageNet weights into torch.hub's cache."""
    return (f"python -c \"import torchvision; torchvision.models.get_weight('{weights_name(arch)}')"
            f".get_state_dict()\"")


def initialise(model: nn.Module, init: str) -> dict:
    """Load `init` into `model`, all but its classifier; returns what a result records of it
    (init, file, sha256). InitError says what is missing or wrong."""
    file = cache_file(model.arch) if init == IMAGENET else Path(init)
    state = _imagenet_state(model.arch) if init == IMAGENET else _file_state(file)
    head = _classifier(model)
    backbone, state = _without(model.state_dict(), head), _without(state, head)
    # torchvision's classic files (2017, before PyTorch 0.4.1) lack BatchNorm's num_batches_tracked,
    # which torch fills on load; no other key may be missing, as the load below is not strict
    misfit = state_dict_misfit(backbone, state, filled_on_load(model, state))
    if misfit:
        raise InitError(f"model.init={init}: {file} does not fit {model.arch} (stem={model.stem}, "
                        f"width={model.width}): {misfit}")
    model.load_state_dict(state, strict=False)  # not strict only for the classifier, left out above
    return {"init": init, "file": str(file.resolve()), "sha256": checkpoint.file_sha256(file)}


def _without(state: dict, prefix: str) -> dict:
    """`state` less the keys under `prefix`, with its module versions (`_metadata`): they say which
    BatchNorm counters torch fills (`filled_on_load`), for the check and for the load alike."""
    kept = OrderedDict((k, v) for k, v in state.items() if not k.startswith(prefix))
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        kept._metadata = metadata
    return kept


def _classifier(model: nn.Module) -> str:
    """The key prefix of the last Linear layer (`fc.`): the head that gets fresh weights."""
    return [f"{name}." for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _file_state(path: Path) -> dict:
    if not path.is_file():
        raise InitError(f"model.init={path}: no such file; point it at a torchvision-format state_dict "
                        f"(e.g. torch.save(torchvision.models.resnet34(weights=...).state_dict(), path))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, pickled code: all unusable as weights
        raise InitError(f"model.init={path} cannot be read as a state_dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise InitError(f"model.init={path} holds a {type(state).__name__}, not a state_dict")
    return state


def _imagenet_state(arch: str) -> dict:
    """torchvision's own loading code (download into torch.hub's cache if absent, check the hash
    of a download, load), with its failures turned into one line that says what to do."""
    weights, file = IMAGENET_WEIGHTS[arch], cache_file(arch)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # no internet, a download with the wrong hash, a corrupt cached file
        why = f"{type(err).__name__}: {err}"
        if not file.is_file():
            raise InitError(_not_cached(arch, f"downloading {weights.url} failed ({why})")) from None
        raise InitError(f"model.init=imagenet: cannot load {file} as torchvision's {weights_name(arch)} weights "
                        f"({why}); delete it and fetch it again") from None


def _not_cached(arch: str, why: str) -> str:
    file = cache_file(arch)
    prefix = re.search(r"-([a-f0-9]+)\.", file.name)  # torch.hub's convention: the sha256's first digits
    sha = f", sha256 starting {prefix.group(1)}" if prefix else ""
    return (f"model.init=imagenet needs torchvision's {weights_name(arch)} weights {file.name}{sha}, which is "
            f"not in torch.hub's cache {file.parent} and {why}: download {IMAGENET_WEIGHTS[arch].url} where there "
            f"is internet and put it in {file.parent} (set TORCH_HOME to move that dir), or run there: "
            f"{fetch_command(arch)}")


def weights_name(arch: str) -> str:
    """`ResNet34_Weights.IMAGENET1K_V1`: the ImageNet weights of `arch` as torchvision names them."""
    weights = IMAGENET_WEIGHTS[arch]
    return f"{type(weights).__name__}.{weights.name}"
