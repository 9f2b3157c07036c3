"""Exceptions of lightning-weakseg, all defined here. Every data error names the sample and the field it is about."""
from __future__ import annotations

__all__ = ["WeakSegError", "WeakSegDataError", "NonFiniteLossError", "PseudoLabelCacheError",
           "PseudoLabelCacheMismatch"]


class WeakSegError(Exception):
    """Base class of the library's own errors."""


class WeakSegDataError(WeakSegError, ValueError):
    """Bad user data: the message says which sample (file name or index) and which field."""

    def __init__(self, message: str, sample=None, field: str | None = None):
        self.sample = sample
        self.field = field
        where = []
        if sample is not None:
            where.append(f"sample {sample!s}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)


class NonFiniteLossError(WeakSegError, FloatingPointError):
    """A loss term became NaN or infinite; the message names the term, the step and the sample ids."""


class PseudoLabelCacheError(WeakSegError, ValueError):
    """A pseudo-label cache file is unreadable, fails its checksum, or belongs to another data set or regime."""


class PseudoLabelCacheMismatch(PseudoLabelCacheError):
    """Pseudo labels (a cache file or a checkpoint's) written for another data set or regime."""
