"""CRD (kdexp/methods/crd.py) against RepDistiller's crd/ on identical tensors: the embedding heads,
the memory's scores for given contrast indices and banks, Z from the first batch, the momentum update
and the whole contrastive loss with its gradients; the negatives' distribution; the memory update on
two real ranks (gloo); and through the real entry point on generated CIFAR-100: it learns, and a
killed run resumes to identical metrics."""
from __future__ import annotations

import copy
import math
import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import CPU, TINY, compose_cfg, run_train, without_timing
from kdexp import distributed
from kdexp.config import validate
from kdexp.data import load_data
from kdexp.data.fake import write_fake_cifar
from kdexp.execution import Execution
from kdexp.job import build_loop, seed_everything
from kdexp.methods import ModelOutputs
from kdexp.methods.crd import CRD, Embed, contrast_scores, momentum_update, nce_loss
from kdexp.models import build_model
from kdexp.records import read_metrics, read_result
from kdexp.teachers import FrozenTeacher


# --- the reference, transcribed -------------------------------------------------------------------
# HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403: crd/criterion.py (Embed,
# Normalize, ContrastLoss, CRDLoss.forward) and crd/memory.py (ContrastMemory.forward with the
# contrast indices given, as the CIFAR-100 loader gives them), reduced to functions of their tensors.

def ref_embed(x, weight, bias):
    x = x.view(x.shape[0], -1)
    x = F.linear(x, weight, bias)
    norm = x.pow(2).sum(1, keepdim=True).pow(1. / 2)
    return x.div(norm)


def ref_contrast_memory(v1, v2, y, idx, memory_v1, memory_v2, params):
    """ContrastMemory.forward: returns (out_v1, out_v2); updates the banks and params (Z) in place."""
    K = int(params[0].item())
    T = params[1].item()
    Z_v1 = params[2].item()
    Z_v2 = params[3].item()
    momentum = params[4].item()
    batchSize = v1.size(0)
    outputSize = memory_v1.size(0)
    inputSize = memory_v1.size(1)
    weight_v1 = torch.index_select(memory_v1, 0, idx.view(-1)).detach()
    weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
    out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
    out_v2 = torch.exp(torch.div(out_v2, T))
    weight_v2 = torch.index_select(memory_v2, 0, idx.view(-1)).detach()
    weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
    out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
    out_v1 = torch.exp(torch.div(out_v1, T))
    if Z_v1 < 0:
        params[2] = out_v1.mean() * outputSize
        Z_v1 = params[2].clone().detach().item()
    if Z_v2 < 0:
        params[3] = out_v2.mean() * outputSize
        Z_v2 = params[3].clone().detach().item()
    out_v1 = torch.div(out_v1, Z_v1).contiguous()
    out_v2 = torch.div(out_v2, Z_v2).contiguous()
    with torch.no_grad():
        l_pos = torch.index_select(memory_v1, 0, y.view(-1))
        l_pos.mul_(momentum)
        l_pos.add_(torch.mul(v1, 1 - momentum))
        l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        updated_v1 = l_pos.div(l_norm)
        memory_v1.index_copy_(0, y, updated_v1)
        ab_pos = torch.index_select(memory_v2, 0, y.view(-1))
        ab_pos.mul_(momentum)
        ab_pos.add_(torch.mul(v2, 1 - momentum))
        ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        updated_v2 = ab_pos.div(ab_norm)
        memory_v2.index_copy_(0, y, updated_v2)
    return out_v1, out_v2


def ref_contrast_loss(x, n_data):
    eps = 1e-7
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


def ref_crd_loss(f_s, f_t, idx, contrast_idx, embed_s, embed_t, memory_v1, memory_v2, params, n_data):
    """CRDLoss.forward: embed_s / embed_t are (weight, bias) pairs."""
    f_s = ref_embed(f_s, *embed_s)
    f_t = ref_embed(f_t, *embed_t)
    out_s, out_t = ref_contrast_memory(f_s, f_t, idx, contrast_idx, memory_v1, memory_v2, params)
    return ref_contrast_loss(out_s, n_data) + ref_contrast_loss(out_t, n_data)


# --- kdexp's CRD on the same tensors ----------------------------------------------------------------

N_DATA, CLASSES, S_DIM, T_DIM = 40, 4, 12, 20


def _labels(n=N_DATA, classes=CLASSES) -> torch.Tensor:
    return torch.arange(n) % classes


def _method(feat_dim=8, nce_k=6, **kwargs) -> CRD:
    """A CRD bound to two plain heads (a Linear whose input is the tapped embedding), in fp64."""
    torch.manual_seed(0)
    method = CRD(feat_dim=feat_dim, nce_k=nce_k, **kwargs)
    method.bind(torch.nn.Linear(S_DIM, 5), torch.nn.Linear(T_DIM, 5))
    method.bind_training_set(_labels())
    return method.double()


def _batch(method: CRD, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(batch, S_DIM, dtype=torch.float64, generator=g, requires_grad=True)
    f_t = torch.randn(batch, T_DIM, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.randperm(N_DATA, generator=g)[:batch]
    contrast = torch.cat([indices[:, None], method.negatives(method.labels[indices])], dim=1)
    return f_s, f_t, indices, contrast


def _reference_state(method: CRD):
    """The reference's banks and params for `method`'s current state (memory_v1: the student's bank)."""
    params = torch.tensor([method.nce_k, method.nce_t, method.z[0].item(), method.z[1].item(), method.nce_m])
    return method.memory_s.clone(), method.memory_t.clone(), params


def _heads(method: CRD):
    return [(e.linear.weight, e.linear.bias) for e in (method.embed_s, method.embed_t)]


def test_embed_is_linear_then_l2_normalised_with_the_references_gradients():
    torch.manual_seed(2)
    head = Embed(S_DIM, 8).double()
    x = torch.randn(6, S_DIM, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64)
    ours = head(x)
    ref = ref_embed(x, head.linear.weight, head.linear.bias)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(6, dtype=torch.float64))
    inputs = (x, head.linear.weight, head.linear.bias)
    for a, b in zip(torch.autograd.grad((ours * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b)


def test_memory_scores_for_given_contrast_indices_and_banks_match_the_reference():
    """out_v1 (student anchor vs the teacher's bank) and out_v2, each divided by the Z the first batch
    sets: the NCE terms of kdexp's loss are the reference's ContrastLoss of those scores."""
    method = _method()
    f_s, f_t, indices, contrast = _batch(method)
    memory_v1, memory_v2, params = _reference_state(method)
    v_s, v_t = method.embed_s(f_s), method.embed_t(f_t)
    out_v1, out_v2 = ref_contrast_memory(v_s, v_t, indices, contrast, memory_v1, memory_v2, params)
    scores_s = contrast_scores(v_s, method.memory_t, contrast, method.nce_t)
    scores_t = contrast_scores(v_t, method.memory_s, contrast, method.nce_t)
    method._fix_z(scores_s.detach(), scores_t.detach())
    # the reference holds T and Z in a float32 buffer: 1e-7 relative
    torch.testing.assert_close(method.z, params[2:4].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores_s / method.z[0], out_v1.squeeze(2), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores_t / method.z[1], out_v2.squeeze(2), rtol=1e-6, atol=0)


def test_momentum_update_matches_the_references():
    method = _method()
    _, _, indices, _ = _batch(method)
    v = F.normalize(torch.randn(len(indices), method.feat_dim, dtype=torch.float64), dim=1)
    ours, ref = method.memory_s.clone(), method.memory_s.clone()
    momentum_update(ours, indices, v, 0.5)
    l_pos = torch.index_select(ref, 0, indices).mul_(0.5).add_(torch.mul(v, 0.5))
    ref.index_copy_(0, indices, l_pos.div(l_pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    torch.testing.assert_close(ours, ref)
    untouched = torch.ones(N_DATA, dtype=torch.bool).index_fill_(0, indices, False)
    assert torch.equal(ours[untouched], method.memory_s[untouched])


def test_contrast_loss_matches_the_references_value_and_gradients():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 9, dtype=torch.float64, generator=g) * 3).requires_grad_()
    ours, ref = nce_loss(x, 50), ref_contrast_loss(x, 50)
    torch.testing.assert_close(ours, ref.squeeze(0))
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_crd_loss_over_two_steps_matches_the_reference_value_gradients_banks_and_z():
    """The whole CRDLoss on the same contrast indices: the first step sets Z, the second keeps it and
    reads the banks the first step updated."""
    method = _method()
    memory_v1, memory_v2, params = _reference_state(method)
    heads = _heads(method)
    for step in range(2):
        f_s, f_t, indices, contrast = _batch(method, seed=10 + step)
        ours = method.contrast_loss(f_s, f_t, indices, contrast)
        ref = ref_crd_loss(f_s, f_t, indices, contrast, *heads, memory_v1, memory_v2, params, N_DATA)
        torch.testing.assert_close(ours, ref.squeeze(0), rtol=1e-6, atol=0)
        inputs = (f_s, f_t, *[p for head in heads for p in head])
        for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref.sum(), inputs)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(method.memory_s, memory_v1)
        torch.testing.assert_close(method.memory_t, memory_v2)
        torch.testing.assert_close(method.z, params[2:4].double(), rtol=1e-6, atol=0)


def test_forward_sums_ce_kd_and_the_weighted_contrast():
    """L = ce_weight * CE + kd_weight * T^2 KL + beta * L_crd, each part logged."""
    method = _method(beta=0.8, ce_weight=0.5, kd_weight=1.0, T=3.0)
    f_s, f_t, indices, _ = _batch(method)
    y = method.labels[indices]
    s, t = torch.randn(5, CLASSES, dtype=torch.float64), torch.randn(5, CLASSES, dtype=torch.float64)
    parts = method(ModelOutputs(s, taps={"embedding": f_s}), ModelOutputs(t, taps={"embedding": f_t}), y, indices)
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(s, y))
    torch.testing.assert_close(parts["kd"], 0.8 * parts["crd"] + kl)
    torch.testing.assert_close(parts["loss"], 0.5 * parts["ce"] + parts["kd"])
    plain = _method()(ModelOutputs(s, taps={"embedding": f_s}), ModelOutputs(t, taps={"embedding": f_t}), y, indices)
    assert "kl" not in plain and torch.equal(plain["loss"], plain["ce"] + 0.8 * plain["crd"])


def test_under_bf16_autocast_the_contrast_and_the_banks_stay_fp32():
    """The reference ran the contrast in fp32: under autocast (execution.amp) kdexp's does too, on the
    taps as autocast left them (here bf16): loss and banks as in fp32 on the same values."""
    method = _method().float()
    twin = copy.deepcopy(method)
    f_s, f_t, indices, _ = _batch(method)
    taps = [f.detach().bfloat16() for f in (f_s, f_t)]
    y, logits = method.labels[indices], torch.randn(5, CLASSES)
    torch.manual_seed(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = method(*(ModelOutputs(logits, taps={"embedding": f}) for f in taps), y, indices)
    torch.manual_seed(6)
    plain = twin(*(ModelOutputs(logits, taps={"embedding": f.float()}) for f in taps), y, indices)
    assert mixed["crd"].dtype == method.memory_s.dtype == torch.float32
    torch.testing.assert_close(mixed["crd"], plain["crd"])
    torch.testing.assert_close(method.memory_s, twin.memory_s)


def test_initial_banks_are_uniform_in_the_references_bound():
    method = _method(feat_dim=27)
    bound = 1 / math.sqrt(27 / 3)
    for bank in (method.memory_s, method.memory_t):
        assert bank.shape == (N_DATA, 27) and bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound
    assert torch.equal(method.z, torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert set(method.state_dict()) == {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
                                        "embed_t.linear.bias", "memory_s", "memory_t", "z"}


# --- the negatives ----------------------------------------------------------------------------------

# 3 classes of 2, 4 and 6 images: the other classes hold 10, 8 and 6 images
UNEVEN = torch.tensor([0, 1, 2, 1, 2, 2, 0, 1, 2, 1, 2, 2])


def _frequencies(method: CRD, label: int, draws: int) -> torch.Tensor:
    targets = torch.full((draws,), label)
    return torch.bincount(method.negatives(targets).flatten(), minlength=len(UNEVEN)).double() / draws


@pytest.mark.parametrize("replace", [False, True])
def test_negatives_are_uniform_over_the_other_classes_images(replace):
    torch.manual_seed(4)
    method = CRD(nce_k=5, replace=replace)
    method.bind_training_set(UNEVEN)
    for label in range(3):
        negatives = method.negatives(torch.full((2000,), label))
        assert negatives.shape == (2000, 5) and not (UNEVEN[negatives] == label).any()
        if not replace:  # a random subset: no image twice in a row
            assert (negatives.sort(1).values.diff(dim=1) > 0).all()
        freq = _frequencies(method, label, 20000)
        others = UNEVEN != label
        expected = 5 / others.sum().item()  # each other-class image's share of the draws, times nce_k
        torch.testing.assert_close(freq[others], torch.full((others.sum().item(),), expected, dtype=torch.float64),
                                   atol=0.02, rtol=0)
        assert (freq[~others] == 0).all()


def test_a_class_with_fewer_other_class_images_than_nce_k_draws_with_repeats():
    """np.random.choice(..., replace=k > len(cls_negative)), per class: class 0 (10 others) draws
    without repeats, class 2 (6 others) with."""
    torch.manual_seed(5)
    method = CRD(nce_k=8)
    method.bind_training_set(UNEVEN)
    negatives = method.negatives(torch.tensor([0, 2] * 500))
    distinct = torch.tensor([len(row.unique()) for row in negatives])
    assert (distinct[0::2] == 8).all() and (distinct[1::2] < 8).any()
    assert not (UNEVEN[negatives] == torch.tensor([0, 2] * 500)[:, None]).any()


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="at least two classes"):
        CRD().bind_training_set(torch.zeros(10, dtype=torch.long))


@pytest.mark.parametrize("kwargs, key", [({"beta": -1}, "method.beta"), ({"kd_weight": -0.1}, "method.kd_weight"),
                                         ({"nce_k": 0}, "method.nce_k"), ({"nce_t": 0}, "method.nce_t"),
                                         ({"nce_m": 1.0}, "method.nce_m"), ({"T": 0}, "method.T"),
                                         ({"feat_dim": 0}, "method.feat_dim")])
def test_bad_hyperparameters_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        CRD(**kwargs)


def test_taps_read_each_networks_classifier_input():
    net = build_model("resnet8x4", 100, width=4)
    taps = CRD().taps(net, "student")
    (name, tap), = taps.items()
    assert name == "embedding" and tap.side == "input" and isinstance(dict(net.named_modules())[tap.module],
                                                                         torch.nn.Linear)


def test_identity_labels_the_crd_plus_kd_row():
    cfg = {"beta": 0.8, "kd_weight": 1.0}
    assert CRD.label(cfg) == "crd(+kd)" and CRD.label({"beta": 0.8, "kd_weight": 0.0}) == "crd"
    assert CRD.cell_label(cfg) == "β=0.8"


# --- the memory on two real ranks (gloo) ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _contrast_on_rank(rank: int, size: int, port: int, out: str) -> None:
    """Rank `rank` of `size` computes CRD's loss on its part of one batch of 7 (3 + 4 on two ranks;
    the whole on one), with the same contrast indices, and saves its loss, gradients, banks and Z."""
    torch.set_num_threads(1)
    if size > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    method = _method()
    f_s, f_t, indices, contrast = _batch(method, batch=7)
    part = slice(0, 3) if rank == 0 and size > 1 else slice(3, 7) if size > 1 else slice(0, 7)
    f_s_part, f_t_part = f_s[part].detach().requires_grad_(), f_t[part].detach().requires_grad_()
    loss = method.contrast_loss(f_s_part, f_t_part, indices[part], contrast[part])
    # each rank's mean over its images, weighted by its share: their sum is the whole batch's mean
    weighted = loss * len(f_s_part) / len(f_s)
    grads = torch.autograd.grad(weighted, [*method.embed_s.parameters(), *method.embed_t.parameters()])
    torch.save({"loss": weighted.detach(), "grads": grads, "memory_s": method.memory_s, "memory_t": method.memory_t,
                "z": method.z}, Path(out) / f"rank{rank}_of{size}.pt")
    if size > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e
def test_two_ranks_update_the_banks_and_set_z_as_one_process_with_their_whole_batch(tmp_path):
    """Each rank's banks take every rank's embeddings (all-gathered) and Z is the whole batch's, so
    both ranks' banks equal one process's; the ranks' losses and gradients add up to its."""
    _contrast_on_rank(0, 1, 0, str(tmp_path))
    torch.multiprocessing.start_processes(_contrast_on_rank, (2, _free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    one = torch.load(tmp_path / "rank0_of1.pt")
    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in range(2)]
    for rank in ranks:
        for key in ("memory_s", "memory_t", "z"):
            torch.testing.assert_close(rank[key], one[key], msg=key)
    torch.testing.assert_close(ranks[0]["loss"] + ranks[1]["loss"], one["loss"])
    for a, b, whole in zip(ranks[0]["grads"], ranks[1]["grads"], one["grads"]):
        torch.testing.assert_close(a + b, whole)


def _crd_loop_on_rank(rank: int, size: int, port: int, out: str, root: str) -> None:
    """One rank of 2 training CRD through the real loop (DDP around the student and the method) for
    3 steps of a global batch of 32; saves its method's state."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    cfg = compose_cfg(*TINY, f"data.root={root}", "data.fake_train_size=300", "data.fake_test_size=64",
                      "data.val_size=0", "teacher=resnet18", "teacher.width=4", "method=crd", "method.nce_k=64",
                      "trainer.epochs=1", "trainer.max_steps_per_epoch=3", "trainer.batch_size=32")
    method = validate(cfg)
    with distributed.process_group(distributed.from_env(), 60) as world:
        execution = Execution.resolve(cfg.execution, CPU, method, cfg.data.loader)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        splits = load_data(cfg.data)
        torch.manual_seed(1)
        teacher = execution.prepare(FrozenTeacher(build_model("resnet18", width=4)))
        loop = build_loop(cfg, method, execution, splits, teacher, CPU, Path(out), world=world)
        loop.fit()
        torch.save(loop.method.state_dict(), Path(out) / f"method_rank{rank}.pt")


@pytest.mark.e2e
def test_two_ranks_training_crd_through_the_loop_keep_identical_banks_holding_every_ranks_images(tmp_path):
    """3 steps of 32 images (16 a rank): each rank's banks hold all 96 images' embeddings (a row the
    update wrote has norm 1, an initial one not), and both ranks end with the same method state."""
    root = tmp_path / "fake"
    write_fake_cifar(root, 300, 64)
    torch.multiprocessing.start_processes(_crd_loop_on_rank, (2, _free_port(), str(tmp_path), str(root)),
                                          nprocs=2, start_method="spawn")
    states = [torch.load(tmp_path / f"method_rank{r}.pt") for r in range(2)]
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=key)
    for bank in (states[0]["memory_s"], states[0]["memory_t"]):
        assert ((bank.norm(dim=1) - 1).abs() < 1e-5).sum() == 96
    assert (states[0]["z"] > 0).all()


# --- through the real entry point on generated CIFAR-100 --------------------------------------------

# test_cifar100_e2e's tiny benchmark setting (vgg13 -> vgg8 at width 8, 4 epochs, milestone 3), CRD
# with 256 negatives: each of the 100 classes has ~4600 other-class images, so they are drawn without
# repeats, as on CIFAR-100
TINY_CRD = ("protocol=crd", "data=fake_cifar100", "data.fake_train_size=5000", "data.fake_test_size=500",
            "trainer.epochs=4", "scheduler.milestones=[3]", "trainer.progress=false")
STUDENT = ("pair=vgg13_to_vgg8", "teacher.width=8", "model.width=8", "method=crd", "method.nce_k=256")


@pytest.fixture(scope="module")
def cifar100_teacher(tmp_path_factory) -> tuple[str, ...]:
    """A tiny vgg13 teacher on generated CIFAR-100; the path overrides under which students find it."""
    root = tmp_path_factory.mktemp("crd")
    paths = (f"paths.output_dir={root / 'out'}", f"paths.data_dir={root / 'data'}")
    proc = run_train(*TINY_CRD, *paths, "experiment=teacher", "model=vgg13", "model.width=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (f"paths.teachers_dir={root / 'out' / 'teachers'}", f"paths.data_dir={root / 'data'}")


@pytest.fixture(scope="module")
def crd_run(tmp_path_factory, cifar100_teacher) -> Path:
    out = tmp_path_factory.mktemp("crd_student")
    proc = run_train(*TINY_CRD, *STUDENT, *cifar100_teacher, f"paths.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = out.rglob("result.json")
    return result.parent


@pytest.mark.e2e
def test_crd_learns_above_chance_on_generated_cifar100(crd_run):
    result = read_result(crd_run)
    assert result["status"] == "completed" and result["method"] == "crd"
    assert "crd_b0.8_nce_k-256" in crd_run.parts
    assert result["test_acc_final"] > 0.02  # chance is 0.01 (500 test images: 5 +- 2.2 right); measured 0.048
    rows = read_metrics(crd_run)
    assert {"loss_ce", "loss_kd", "loss_crd"} <= set(rows[-1]) and "loss_kl" not in rows[-1]


@pytest.mark.e2e
def test_killed_crd_run_resumes_to_identical_metrics(crd_run, cifar100_teacher, tmp_path):
    """Killed after epoch 2, the resumed run has the banks, Z, the heads' weights and the negatives'
    RNG of last.pt: every later metric equals the uninterrupted run's."""
    from test_methods_e2e import run_until_killed
    args = (*TINY_CRD, *STUDENT, *cifar100_teacher, f"paths.output_dir={tmp_path}")
    run_dir = run_until_killed(args, tmp_path, epochs=2)
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch = int(re.search(r"resuming .* after epoch (\d+)", resumed.stdout + resumed.stderr).group(1))
    assert 2 <= epoch < 4
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(crd_run))
