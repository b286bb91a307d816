"""CIFAR-10 on disk → uint8 tensors → seeded, augmented batches."""
from kdexp.data.cifar import (CIFAR_MEAN, CIFAR_STD, CLASSES, DataError, Splits, check_present, data_identity,
                              load_splits, split_indices)
from kdexp.data.loaders import EvalBatches, TrainBatches, build_train_batches

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "CLASSES", "DataError", "Splits", "check_present", "data_identity",
    "load_splits", "split_indices",
    "EvalBatches", "TrainBatches", "build_train_batches",
]
