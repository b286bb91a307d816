"""kdexp's analysis: run directories (kdexp's and the study's) -> tables, statistics, figures, report."""
from .collect import collect

__all__ = ["collect"]
