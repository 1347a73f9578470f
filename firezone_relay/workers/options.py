"""``--workers``: its value, and the slices of the allocation port range."""

from __future__ import annotations

import os
from typing import List, Tuple


def parse_workers(value: str) -> int:
    """``--workers``: a count of at least 1, or ``auto`` (the CPUs this process may use)."""
    from twisted.python import usage

    text = str(value).strip().lower()
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    try:
        count = int(text)
    except ValueError:
        raise usage.UsageError("--workers must be a number of processes or auto, not %r" % (value,)) from None
    if not 1 <= count <= 1024:
        raise usage.UsageError("--workers must be between 1 and 1024 (got %d)" % count)
    return count


def slices(lowest: int, highest: int, count: int) -> List[Tuple[int, int]]:
    """``count`` disjoint, contiguous slices covering ``lowest``..``highest``."""
    size = highest - lowest + 1
    return [(lowest + i * size // count, lowest + (i + 1) * size // count - 1) for i in range(count)]
