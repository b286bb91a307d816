"""launch.epoch_time: the plan's per-network A100 model, checked against the study's measured epochs,
the hardware it claims to be, and what a config changes in a run's cost."""
from __future__ import annotations

import pytest

from helpers import compose_cfg
from kdexp.data import split_sizes
from launch import epoch_time
from launch.epoch_time import Network, a100, calibration, epoch_seconds, run_hours, traced_ops

A100_TF32_PEAK, A100_FP32_PEAK, A100_40GB_HBM = 156e12, 19.5e12, 1555e9


def test_the_model_reproduces_every_measured_epoch_within_15_percent():
    for arch, (measured, modelled) in calibration().items():
        assert modelled == pytest.approx(measured, rel=0.15), arch


def test_the_fitted_rates_are_an_a100s():
    """TF32 convolutions run above fp32's peak and below TF32's; memory traffic below HBM's peak. A trace
    that missed the backward pass or the activations' bytes would fit rates outside these."""
    device = a100()
    assert A100_FP32_PEAK < device.flops_per_s < A100_TF32_PEAK
    assert 0.5 * A100_40GB_HBM < device.bytes_per_s < A100_40GB_HBM


def test_a_training_step_traces_the_backward_passes_flops_and_no_views():
    net = Network("resnet20", 100, "cifar", 16, 32)
    train, forward = traced_ops(net, 64, True), traced_ops(net, 64, False)
    # backward = input and weight gradients, twice the forward (the first conv needs no input gradient)
    assert 2.9 < train[:, 0].sum() / forward[:, 0].sum() < 3.0
    # the evaluation forward: 21 convolutions, 21 batch norms, 19 ReLUs, 9 residual additions, the
    # pooling and the classifier; no views, no allocations
    assert len(forward) == 21 + 21 + 19 + 9 + 1 + 1


def test_many_small_kernels_cost_their_launch_overhead():
    """resnet110 does twice resnet56's work in twice its kernels; at batch 64 most of its kernels are
    shorter than the launch overhead, so raising the overhead raises its estimate."""
    net = Network("resnet110", 100, "cifar", 16, 32)
    ops = traced_ops(net, 64, True)
    device = a100()
    slower_launch = epoch_time.Device(device.flops_per_s, device.bytes_per_s, 2 * device.op_overhead_s)
    assert slower_launch.seconds(ops) > 1.3 * device.seconds(ops)


@pytest.fixture(scope="module")
def crd_student():
    return compose_cfg("protocol=crd", "data=cifar100", "pair=r32x4_to_r8x4", "method=ce")


def test_split_sizes_follow_the_data_and_its_validation_split(crd_student):
    assert split_sizes(crd_student.data) == (50_000, 10_000)
    v2 = compose_cfg("protocol=crd", "data=cifar100", "data.val_size=5000")
    assert split_sizes(v2.data) == (45_000, 15_000)
    fake = compose_cfg("data=fake_cifar100", "data.fake_train_size=1000", "data.fake_test_size=300",
                       "data.val_size=100")
    assert split_sizes(fake.data) == (900, 400)


def test_what_a_run_configures_changes_its_estimate(crd_student):
    base = epoch_seconds(crd_student)
    distilled = compose_cfg("protocol=crd", "data=cifar100", "pair=r32x4_to_r8x4", "method=logit")
    teacher_alone = compose_cfg("protocol=crd", "data=cifar100", "model=resnet32x4", "method=ce", "teacher.arch=null")
    # the teacher's forward pass: more than nothing, less than training the teacher
    assert base < epoch_seconds(distilled) < base + epoch_seconds(teacher_alone)
    sparse_eval = crd_student.copy()
    sparse_eval.trainer.eval_every = 5
    assert epoch_seconds(sparse_eval) < base
    capped = crd_student.copy()
    capped.trainer.max_steps_per_epoch = 10
    assert epoch_seconds(capped) < base / 10
    narrow = crd_student.copy()
    narrow.model.width = 8
    assert epoch_seconds(narrow) < base
    assert run_hours(crd_student) == pytest.approx(240 * base / 3600)


def test_image_folders_are_no_faster_than_their_loader_workers():
    """ImageNet's epoch is bounded by what data.num_workers decode (WORKER_IMAGES_PER_S each): with
    2 workers the baseline is loader-bound, exactly images / (2 x the rate) per phase; with the
    preset's 11 it is the GPU's. CIFAR's in-memory tensors have no such bound."""
    fed = compose_cfg("experiment=imagenet_kd", "method=ce")
    starved = fed.copy()
    starved.data.num_workers = 2
    rate = 2 * epoch_time.WORKER_IMAGES_PER_S
    assert epoch_seconds(starved) == pytest.approx((1_281_167 + 50_000) / rate)
    assert epoch_seconds(fed) < epoch_seconds(starved) / 3
    assert epoch_time.loader_images_per_s(fed.data) == 11 * epoch_time.WORKER_IMAGES_PER_S
    cifar = compose_cfg("protocol=crd", "data=cifar100", "pair=r32x4_to_r8x4", "method=ce")
    assert epoch_time.loader_images_per_s(cifar.data) == float("inf")
