"""CIFAR-10/100 on disk (downloaded or generated) → uint8 tensors → seeded, augmented batches;
ImageNet-layout image folders (downloaded or generated) → DataLoader workers → seeded batches."""
from kdexp.data.cifar import (CIFAR10_LAYOUT, CIFAR100_LAYOUT, CIFAR_MEAN, CIFAR_STD, CLASSES, DataError, Layout,
                              Splits, check_present, data_identity, load_splits, split_indices)
from kdexp.data.datasets import (DATASETS, Dataset, build_batches, check_data_present, dataset, load_data,
                                 split_sizes)
from kdexp.data.imagenet import FolderSplits
from kdexp.data.loaders import EvalBatches, TrainBatches, build_train_batches

__all__ = [
    "CIFAR10_LAYOUT", "CIFAR100_LAYOUT", "CIFAR_MEAN", "CIFAR_STD", "CLASSES", "DataError", "Layout", "Splits",
    "check_present", "data_identity", "load_splits", "split_indices",
    "DATASETS", "Dataset", "build_batches", "check_data_present", "dataset", "load_data", "split_sizes",
    "FolderSplits",
    "EvalBatches", "TrainBatches", "build_train_batches",
]
