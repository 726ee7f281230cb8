"""Filter kernels: compiled (Cython, ext/) with plain-Python twins of identical behaviour.

`COMPILED` tells which one runs. A pure build (EDGEOS_NO_EXTENSIONS=1) still works, with a loud
warning at start, because a gateway that filters slowly beats one that does not run.
"""

from __future__ import annotations

from types import ModuleType

from edgeos.filters import _reference

try:
    from edgeos.filters import _kernels as _compiled  # type: ignore[attr-defined]
except ImportError:  # pure build
    _compiled = None

COMPILED: bool = _compiled is not None


def kernels(impl: str = "auto") -> ModuleType:
    """The kernel module: 'compiled', 'reference', or 'auto' (compiled when built)."""
    if impl == "reference":
        return _reference
    if impl == "compiled":
        if _compiled is None:
            raise ImportError("edgeos.filters._kernels is not built (pure install)")
        return _compiled
    return _compiled if _compiled is not None else _reference


def implementation() -> str:
    return "compiled" if COMPILED else "reference"


__all__ = ["COMPILED", "implementation", "kernels"]
