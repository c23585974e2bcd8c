"""Interleaved timing: the one helper behind `keras-psp bench`, the latency
profiles, the benchmarks and the examples.

These machines are shared and noisy, so models are never timed one after
the other: every round times each case once (A B A B ..., or in a fresh
random order per round), and the figures to quote are medians over rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import numpy as np


def interleaved(
    cases: dict[Hashable, Callable[[], object]],
    rounds: int,
    invokes: int = 1,
    warmup: int = 2,
    seed: int | None = None,
) -> dict[Hashable, list[float]]:
    """Times each case `rounds` times, interleaved; returns seconds per call.

    Args:
        cases: Zero-argument callables by name; each runs the work to time
            and blocks until it is done.
        rounds: Timed rounds. Each round times every case once.
        invokes: Calls per timed sample (short calls are timed `invokes`
            at a time); a sample is their mean. Default 1.
        warmup: Untimed calls of each case before the first round. Default 2.
        seed: None: the cases run in their given order every round (A B A B
            ...). An int: in a fresh random order each round, drawn from this
            seed, so that no case always follows the same one.

    Returns:
        `{name: [seconds per call, one per round]}`.

    Example:

    ```python
    samples = keras_psp.timing.interleaved({"dense": run_dense, "slim": run_slim}, rounds=30)
    ratio = np.median(samples["slim"]) / np.median(samples["dense"])
    ```
    """
    if rounds < 1 or invokes < 1 or warmup < 0:
        raise ValueError(f"interleaved: rounds and invokes must be >= 1 and warmup >= 0, got "
                         f"rounds={rounds}, invokes={invokes}, warmup={warmup}.")
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    rng = None if seed is None else np.random.default_rng(seed)
    samples = {name: [] for name in names}
    for _ in range(rounds):
        order = names if rng is None else [names[i] for i in rng.permutation(len(names))]
        for name in order:
            fn = cases[name]
            start = time.perf_counter()
            for _ in range(invokes):
                fn()
            samples[name].append((time.perf_counter() - start) / invokes)
    return samples


def medians_ms(samples: dict[Hashable, list[float]]) -> dict[Hashable, float]:
    """The median of each case's samples (seconds), in milliseconds."""
    return {name: float(np.median(values)) * 1e3 for name, values in samples.items()}
