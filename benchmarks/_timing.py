"""Table printing for the benchmark scripts; interleaved timing is the package's
(`keras_psp.timing.interleaved`), re-exported here for them."""

from __future__ import annotations

import statistics

from keras_psp.timing import interleaved

__all__ = ["interleaved", "median", "print_table"]


def median(values) -> float:
    return statistics.median(values)


def print_table(title: str, rows: list[tuple], headers: tuple[str, ...]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
