"""CIFAR-10 on disk → uint8 tensors → seeded, augmented batches."""
from kdexp.data.cifar import CIFAR_MEAN, CIFAR_STD, CLASSES, DataError, Splits, load_splits
from kdexp.data.loaders import EvalBatches, TrainBatches, build_train_batches

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "CLASSES", "DataError", "Splits", "load_splits",
    "EvalBatches", "TrainBatches", "build_train_batches",
]
