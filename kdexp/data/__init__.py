"""CIFAR-10/100 on disk (downloaded or generated) → uint8 tensors → seeded, augmented batches."""
from kdexp.data.cifar import (CIFAR10_LAYOUT, CIFAR100_LAYOUT, CIFAR_MEAN, CIFAR_STD, CLASSES, DataError, Layout,
                              Splits, check_present, data_identity, load_splits, split_indices)
from kdexp.data.datasets import DATASETS, Dataset, check_data_present, dataset, load_data, split_sizes
from kdexp.data.loaders import EvalBatches, TrainBatches, build_train_batches

__all__ = [
    "CIFAR10_LAYOUT", "CIFAR100_LAYOUT", "CIFAR_MEAN", "CIFAR_STD", "CLASSES", "DataError", "Layout", "Splits",
    "check_present", "data_identity", "load_splits", "split_indices",
    "DATASETS", "Dataset", "check_data_present", "dataset", "load_data", "split_sizes",
    "EvalBatches", "TrainBatches", "build_train_batches",
]
