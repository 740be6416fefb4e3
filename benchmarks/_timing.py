"""The timing harness every benchmark script uses.

A candidate is `(fn, carry, units)`: one sample calls `carry = fn(carry)` once, from
a ready `carry` to a ready result, and counts `units` (windows, calls) of work.
`compare` takes one sample of every candidate per repeat, interleaved, so that
drifts (frequency scaling, other processes on a shared machine) hit them all alike
and ratios of samples from the same repeat are paired (`paired_ratio`). `sized`
turns a compiled function into a candidate lasting about a time budget;
`of_thunks` turns argument-less calls into candidates. Also: the compiled memory of
a program, the accuracy measures (cosine, relative error) and the number formats of
the tables.

Imported as `import _timing` by the scripts next to it (`python benchmarks/x.py`
puts benchmarks/ on `sys.path`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Candidate = tuple[Callable[[Any], Any], Any, int]  # (fn, carry, units)


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


# ------------------------------------------------------------------ sampling -------


class Interleaved:
    """Candidates `name: (fn, carry, units)` timed in turn, carries threaded.

    `sample(rep)` takes one sample of each (seconds per unit); with `rotate` the order
    rotates with `rep`, otherwise it is the dict's order every time.
    """

    def __init__(self, fns: dict[str, Candidate], rotate: bool = True):
        self.fns = fns
        self.rotate = rotate
        self.carries = {name: carry for name, (_, carry, _) in fns.items()}

    def sample(self, rep: int) -> dict[str, float]:
        names = list(self.fns)
        shift = rep % len(names) if self.rotate else 0
        out = {}
        for name in names[shift:] + names[:shift]:
            fn, _, units = self.fns[name]
            carry = block(self.carries[name])
            start = time.perf_counter()
            self.carries[name] = block(fn(carry))
            out[name] = (time.perf_counter() - start) / units
        return out


def compare(
    fns: dict[str, Candidate], repeats: int, rotate: bool = True
) -> dict[str, list[float]]:
    """Seconds per unit of each candidate, one interleaved sample per repeat."""
    timer = Interleaved(fns, rotate)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats):
        for name, seconds in timer.sample(rep).items():
            samples[name].append(seconds)
    return samples


def of_thunks(thunks: dict[str, Callable[[], Any]], calls: int = 1):
    """Argument-less calls as candidates: each warmed up twice (in turn, before any
    is timed), then one sample is `calls` calls, the last one's result blocked on."""

    def repeated(thunk):
        def run(_):
            for _ in range(calls):
                out = thunk()
            return out

        return run

    candidates = {}
    for name, thunk in thunks.items():
        block(thunk())
        candidates[name] = (repeated(thunk), block(thunk()), calls)
    return candidates


def loop_of(fn: Callable[[Any], Any], iters: int) -> Callable[[Any], Any]:
    """`fn` applied `iters` times from Python (one dispatch each)."""

    def run(carry):
        for _ in range(iters):
            carry = fn(carry)
        return carry

    return run


def calls_for(seconds_per_call: float, budget: float, low: int = 1, high: int = 500):
    """How many calls of `seconds_per_call` fill `budget`, within [low, high]."""
    return int(min(max(round(budget / max(seconds_per_call, 1e-7)), low), high))


def sized(fn: Callable[[Any], Any], carry: Any, units: int, budget: float) -> Candidate:
    """`fn` (compiled, `units` windows per call) repeated to last about `budget` s."""
    block(fn(carry))
    start = time.perf_counter()
    block(fn(carry))
    calls = calls_for(time.perf_counter() - start, budget, high=10_000)
    return loop_of(fn, calls), carry, units * calls


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """`--repeats` and `--budget` (seconds per `sized` sample); `sampling_defaults`
    fills in those not given."""
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds per timed sample"
    )


def sampling_defaults(args: argparse.Namespace, quick: bool) -> None:
    """11 repeats of 0.1 s samples; 5 of 0.03 s when `quick`."""
    if args.repeats is None:
        args.repeats = 5 if quick else 11
    if args.budget is None:
        args.budget = 0.03 if quick else 0.1


# ------------------------------------------------------------------ statistics -----


def median(samples: Iterable[float]) -> float:
    return statistics.median(samples)


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in samples.items()}


def paired_ratio(a: list[float], b: list[float], scale: float = 1.0) -> float:
    """Median over repeats of scale * a_i / b_i (samples taken side by side)."""
    return statistics.median(scale * x / y for x, y in zip(a, b, strict=True))


def memory_of(compiled) -> dict[str, int]:
    """XLA's memory analysis of a compiled program: temp, args, out and their total."""
    stats = compiled.memory_analysis()
    out = {
        "temp": stats.temp_size_in_bytes,
        "args": stats.argument_size_in_bytes,
        "out": stats.output_size_in_bytes,
    }
    out["total"] = out["temp"] + out["args"] + out["out"]
    return out


def cosine(a, b) -> float:
    """Cosine of two pytrees (or arrays), all leaves flattened."""
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def rel_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ------------------------------------------------------------------ formats --------


def us(seconds: float, spec: str = "9.1f", unit: bool = False) -> str:
    """Seconds as microseconds in the format `spec`, `unit` appending " us"."""
    return f"{seconds * 1e6:{spec}}" + (" us" if unit else "")


def ms(seconds: float, spec: str = "8.3f", unit: bool = False) -> str:
    """Seconds as milliseconds in the format `spec`, `unit` appending " ms"."""
    return f"{seconds * 1e3:{spec}}" + (" ms" if unit else "")


def mib(size: int, spec: str = "9.2f") -> str:
    return f"{size / 2**20:{spec}}"


def header(head: str) -> None:
    """A table's header line and the rule under it."""
    print(head)
    print("-" * len(head))
