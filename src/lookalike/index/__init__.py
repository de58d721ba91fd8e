"""Vector indexes behind one narrow interface (`base.VectorIndex`); `local` (FAISS in memory) is the
embedded default. A backend is a module here and one entry in `base.BACKENDS`, nothing else."""

from lookalike.index.base import BACKENDS, VectorIndex, kind_of, open_index

__all__ = ["BACKENDS", "VectorIndex", "kind_of", "open_index"]
