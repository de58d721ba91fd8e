"""lookalike: visual product search for shoe catalogs."""

from lookalike.errors import BadImageError, LookalikeError, ModelMissingError
from lookalike.pipeline import Catalog, Match, QueryInfo, SearchResult

__all__ = [
    "Catalog",
    "SearchResult",
    "QueryInfo",
    "Match",
    "LookalikeError",
    "ModelMissingError",
    "BadImageError",
]
__version__ = "0.1.0"
