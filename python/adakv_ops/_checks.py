"""Argument checks shared by the Python layer (the C++ launchers check their own, csrc/checks.cpp)."""

from __future__ import annotations

from typing import Optional


def is_int(v, lo: Optional[int] = None, hi: Optional[int] = None) -> bool:
    """Whether ``v`` is a Python int (a bool is not) in ``[lo, hi]`` (either bound optional)."""
    return (isinstance(v, int) and not isinstance(v, bool)
            and (lo is None or v >= lo) and (hi is None or v <= hi))
