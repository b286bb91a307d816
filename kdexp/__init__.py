"""kdexp: a Hydra experiment suite for knowledge-distillation research on CIFAR-10."""

__version__ = "0.1.0"
