"""The one timing helper of the benchmarks: warm up, repeat, and report the minimum, the median and how far the
repeats spread, with a warning when they spread too far to trust.

    time_call(fn, repeats=5, warmup=1) -> Timing
    time_calls({"a": fn_a, "b": fn_b}, repeats=5, warmup=1) -> {"a": Timing, "b": Timing}
    time_generation(generate, repeats=3, warmup=1) -> GenerationTiming
    time_generations({"a": generate_a, ...}, repeats=3, warmup=1) -> {"a": GenerationTiming, ...}
    decode_seconds_per_token(generate, repeats=3, warmup=1) -> float

Several things are timed interleaved, one run of each per round: load from other processes comes and goes, and
interleaving makes it hit all of them alike, so their ratios hold on a busy machine even when their absolute
times do not.

Generation is timed step by step inside one call: `generate(streamer)` must pass `streamer` on to transformers'
`generate`, which hands it the prompt once before prefill and then each step's new tokens as soon as they are
chosen. Prefill is the time from the call to the first token; decode time per token is the median interval
between consecutive tokens. Taking decode time as the difference of a long and a short run instead subtracts two
noisy numbers that can come out near zero (a benchmark once printed 248,000,000,000 tokens/s that way).

A duration that cannot be real (zero, negative, not finite, or missing) raises `ImpossibleTiming`: better no
number than nonsense in a table.
"""

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, TypeVar

HIGH_SPREAD = 0.20  # (max - min) / median of the repeats above which a timing gets a warning

Clock = Callable[[], float]
Generate = Callable[[object], object]  # called with a streamer, which it must pass to `model.generate(streamer=...)`
Result = TypeVar("Result")


class ImpossibleTiming(ValueError):
    """A measurement that cannot be a real duration."""


def _check_durations(what: str, seconds: Sequence[float]) -> None:
    """Raise `ImpossibleTiming` unless `seconds` holds at least one duration and all are positive and finite."""
    if not seconds:
        raise ImpossibleTiming(f"{what}: nothing was timed")
    for duration in seconds:
        if not (math.isfinite(duration) and duration > 0):
            raise ImpossibleTiming(f"{what}: a duration of {duration!r} s is impossible (each must be > 0 and finite)")


@dataclass(frozen=True)
class Timing:
    """The durations of the timed repeats of one thing, in seconds, and their summary."""

    what: str
    seconds: tuple[float, ...]

    def __post_init__(self):
        _check_durations(self.what, self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means all repeats lie within 5% of the median's size."""
        return (max(self.seconds) - self.minimum) / self.median

    @property
    def warnings(self) -> tuple[str, ...]:
        if len(self.seconds) == 1:
            return (f"{self.what}: one timed run, so how much it varies is unknown",)
        if self.spread > HIGH_SPREAD:
            return (f"{self.what}: the {len(self.seconds)} repeats spread {self.spread:.0%} of their median "
                    f"(over {HIGH_SPREAD:.0%}): the machine is busy; use more repeats or fewer threads",)
        return ()


def _interleaved(measure: Callable[[str], Result], names: Sequence[str], repeats: int,
                warmup: int) -> dict[str, list[Result]]:
    """`measure(name)` for every name, round by round: `warmup` rounds whose results are dropped (caches, lazy
    initialisation, allocator growth), then `repeats` rounds whose results are kept."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    kept = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        for name in kept:
            result = measure(name)
            if round_index >= warmup:
                kept[name].append(result)
    return kept


def time_calls(calls: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
               clock: Clock = time.perf_counter) -> dict[str, Timing]:
    """The wall time of each call, interleaved. A call must finish its work before it returns (on a GPU:
    synchronize inside it)."""

    def seconds_of(name: str) -> float:
        start = clock()
        calls[name]()
        return clock() - start

    runs = _interleaved(seconds_of, list(calls), repeats, warmup)
    return {name: Timing(name, tuple(seconds)) for name, seconds in runs.items()}


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, clock: Clock = time.perf_counter,
              what: str = "call") -> Timing:
    """The wall time of `fn()`: `warmup` untimed calls, then `repeats` timed ones."""
    return time_calls({what: fn}, repeats, warmup, clock)[what]


class _TokenClock:
    """A streamer for transformers' `generate` (the `put`/`end` of its `BaseStreamer`) that notes the time of
    every `put`. generate copies each step's tokens to the CPU before the put, which also waits for a GPU to
    finish the step."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.put_times: list[float] = []

    def put(self, value) -> None:
        self.put_times.append(self.clock())

    def end(self) -> None:
        pass


class _GenerationRun(NamedTuple):
    prefill_s: float
    seconds_per_token: float
    total_s: float
    new_tokens: int


def _time_steps(generate: Generate, clock: Clock, what: str) -> _GenerationRun:
    """One call of `generate`, timed at each step."""
    streamer = _TokenClock(clock)
    start = clock()
    generate(streamer)
    end = clock()
    token_times = streamer.put_times[1:]  # the first put is the prompt
    if len(token_times) < 2:
        raise ImpossibleTiming(f"{what}: {len(token_times)} new token(s) reached the streamer; decode timing needs at "
                               "least 2 (pass the streamer on to generate, and force the length with min_new_tokens)")
    steps = [later - earlier for earlier, later in zip(token_times, token_times[1:])]
    _check_durations(f"{what} decode steps", steps)
    return _GenerationRun(token_times[0] - start, statistics.median(steps), end - start, len(token_times))


@dataclass(frozen=True)
class GenerationTiming:
    """The timed repeats of one generation call. Per repeat: prefill is the time from the call to the first
    token, per_token the median interval between consecutive tokens (each step adds one token to every
    sequence of the batch), total the whole call."""

    prefill: Timing
    per_token: Timing
    total: Timing
    new_tokens: int  # steps of the last timed run

    @property
    def warnings(self) -> tuple[str, ...]:
        if len(self.per_token.seconds) == 1:  # say "one timed run" once, not once per figure
            return self.per_token.warnings
        return self.prefill.warnings + self.per_token.warnings


def _summarise(name: str, runs: list[_GenerationRun]) -> GenerationTiming:
    return GenerationTiming(prefill=Timing(f"{name} prefill", tuple(run.prefill_s for run in runs)),
                            per_token=Timing(f"{name} decode per token", tuple(run.seconds_per_token for run in runs)),
                            total=Timing(f"{name} whole call", tuple(run.total_s for run in runs)),
                            new_tokens=runs[-1].new_tokens)


def time_generations(generates: dict[str, Generate], repeats: int = 3, warmup: int = 1,
                     clock: Clock = time.perf_counter) -> dict[str, GenerationTiming]:
    """Prefill and decode time per token of each `generate(streamer)`, interleaved (see the module docstring)."""
    runs = _interleaved(lambda name: _time_steps(generates[name], clock, name), list(generates), repeats, warmup)
    return {name: _summarise(name, name_runs) for name, name_runs in runs.items()}


def time_generation(generate: Generate, repeats: int = 3, warmup: int = 1, clock: Clock = time.perf_counter,
                    what: str = "generate") -> GenerationTiming:
    """Prefill and decode time per token of `generate(streamer)`: `warmup` untimed calls, then `repeats` timed."""
    return time_generations({what: generate}, repeats, warmup, clock)[what]


def decode_seconds_per_token(generate: Generate, repeats: int = 3, warmup: int = 1,
                             clock: Clock = time.perf_counter) -> float:
    """Median seconds per decoded token of `generate(streamer)`, prefill left out, e.g.

        decode_seconds_per_token(lambda streamer: model.generate(**inputs, max_new_tokens=16, min_new_tokens=16,
                                                                 do_sample=False, streamer=streamer))

    `generate` must pass the streamer on and produce at least 2 tokens. Use `time_generation` for the prefill,
    the spread and the warnings."""
    return time_generation(generate, repeats, warmup, clock).per_token.median


def print_warnings(*timings) -> None:
    """Print the warnings of `Timing`s or `GenerationTiming`s to stderr, where they do not break a table."""
    for timing in timings:
        for warning in timing.warnings:
            print(f"warning: {warning}", file=sys.stderr)
