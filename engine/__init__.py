"""What users touch: build-index, queries (`engine.Searcher`), HDF5 export, the paper's metrics, the demo."""
from engine.search import Result, Searcher

__all__ = ["Result", "Searcher"]
