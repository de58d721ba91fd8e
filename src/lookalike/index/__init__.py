"""Vector indexes behind one narrow interface (`base.VectorIndex`): `local` (FAISS, embedded) is the
default, `milvus` (a Milvus server, or Milvus Lite) the store to scale out onto. A backend is a module
here and one entry in `base.BACKENDS`, nothing else."""

from lookalike.index.base import BACKENDS, VectorIndex, kind_of, open_index, store_backend

__all__ = ["BACKENDS", "VectorIndex", "kind_of", "open_index", "store_backend"]
