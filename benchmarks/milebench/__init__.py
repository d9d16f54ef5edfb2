"""MileBench (Song et al., COLM 2024, arXiv 2404.18532) against a running SGLang server: the data layout
(``data``), MileBench's prompt with images interleaved (``prompt``), the requests (``run``), MileBench's scoring
rules (``scoring``) and the CLI (``__main__``: ``python -m benchmarks.milebench --help``)."""

from benchmarks.milebench.data import TASKS, Dataset, Sample, load_dataset
from benchmarks.milebench.run import Client, run

__all__ = ["TASKS", "Client", "Dataset", "Sample", "load_dataset", "run"]
