"""benchmarks.timing on a fake clock: exact statistics, the high-spread warning, per-step generation timing, and
refusal of impossible durations. Then one tiny real run of the generation benchmark."""

import pytest

from benchmarks.timing import (HIGH_SPREAD, ImpossibleTiming, Timing, decode_seconds_per_token, time_call,
                               time_calls, time_generation, time_generations)


class FakeClock:
    """A clock that only moves when told to: `advance(seconds)` stands for work that takes that long."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_work(clock, durations):
    """A call that takes the next of `durations` each time it runs."""
    remaining = iter(durations)
    return lambda: clock.advance(next(remaining))


def fake_generate(clock, prefill_s, step_s):
    """A `generate(streamer)` as transformers calls the streamer: the prompt first, then one put per new token
    (the first after `prefill_s`, the next ones `step_s[i]` apart)."""

    def generate(streamer):
        clock.advance(0.5)  # input preparation before the prompt is put: counted in prefill
        streamer.put("prompt")
        clock.advance(prefill_s - 0.5)
        streamer.put("token 1")
        for seconds in step_s:
            clock.advance(seconds)
            streamer.put("next token")
        streamer.end()

    return generate


def test_time_call_summarises_the_timed_repeats_exactly_and_drops_the_warmup():
    clock = FakeClock()
    timing = time_call(fake_work(clock, [9.0, 2.0, 1.0, 2.5, 2.0, 3.0]), repeats=5, warmup=1, clock=clock)
    assert timing.seconds == (2.0, 1.0, 2.5, 2.0, 3.0)  # the 9 s warm-up call is not among them
    assert timing.minimum == 1.0
    assert timing.median == 2.0
    assert timing.spread == (3.0 - 1.0) / 2.0
    assert Timing("even", (1.0, 2.0, 4.0, 5.0)).median == 3.0


def test_steady_repeats_have_no_warning_and_a_high_spread_has_one():
    steady = Timing("steady", (0.9375, 1.0, 1.0625))
    assert steady.spread == 0.125 and steady.warnings == ()
    noisy = Timing("noisy", (1.0, 1.0, 1.25))
    assert noisy.spread == 0.25 > HIGH_SPREAD
    assert len(noisy.warnings) == 1 and "noisy" in noisy.warnings[0] and "25%" in noisy.warnings[0]
    assert "one timed run" in Timing("once", (1.0,)).warnings[0]


def test_time_calls_interleaves_the_calls_round_by_round():
    clock, order = FakeClock(), []

    def call(name):
        return lambda: (order.append(name), clock.advance(1.0))

    timings = time_calls({"a": call("a"), "b": call("b")}, repeats=2, warmup=1, clock=clock)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert timings["a"].seconds == timings["b"].seconds == (1.0, 1.0)


@pytest.mark.parametrize("durations", [(1.0, 0.0), (1.0, -0.5), (1.0, float("nan")), (float("inf"),), ()])
def test_impossible_durations_are_refused(durations):
    with pytest.raises(ImpossibleTiming, match="impossible|nothing was timed"):
        Timing("bad", durations)


def test_a_clock_that_does_not_move_is_refused():
    clock = FakeClock()
    with pytest.raises(ImpossibleTiming, match="0.0 s is impossible"):
        time_call(lambda: None, repeats=3, warmup=0, clock=clock)


def test_repeats_and_warmup_counts_are_checked():
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_call(lambda: None, repeats=0)


def test_generation_is_timed_per_step_with_prefill_apart_from_decode():
    clock = FakeClock()
    steps = [0.25, 0.5, 0.25, 1.0]  # median 0.375
    runs = [fake_generate(clock, prefill_s=10.0, step_s=steps),  # warm-up: dropped
            fake_generate(clock, prefill_s=2.0, step_s=steps),
            fake_generate(clock, prefill_s=3.0, step_s=[s * 2 for s in steps])]
    timing = time_generation(lambda streamer: runs.pop(0)(streamer), repeats=2, warmup=1, clock=clock)
    assert timing.prefill.seconds == (2.0, 3.0)
    assert timing.per_token.seconds == (0.375, 0.75)
    assert timing.total.seconds == (2.0 + sum(steps), 3.0 + 2 * sum(steps))
    assert timing.new_tokens == 5
    # the second run decodes twice as slowly: (0.75 - 0.375) / 0.5625 of spread, and a warning
    assert timing.per_token.spread == 2 / 3 and "decode per token" in timing.warnings[-1]


def test_decode_seconds_per_token_is_the_median_step_of_the_runs():
    clock = FakeClock()
    per_token = decode_seconds_per_token(fake_generate(clock, prefill_s=4.0, step_s=[0.125, 0.125, 0.5]),
                                         repeats=3, warmup=1, clock=clock)
    assert per_token == 0.125


def test_time_generations_keeps_each_generation_apart():
    clock = FakeClock()
    timings = time_generations({"fast": fake_generate(clock, 1.0, [0.25, 0.25]),
                                "slow": fake_generate(clock, 1.0, [0.75, 0.75])}, repeats=2, warmup=0, clock=clock)
    assert timings["fast"].per_token.seconds == (0.25, 0.25)
    assert timings["slow"].per_token.seconds == (0.75, 0.75)


def test_a_single_generation_run_warns_once_that_its_variation_is_unknown():
    clock = FakeClock()
    timing = time_generation(fake_generate(clock, 1.0, [0.25, 0.25]), repeats=1, warmup=0, clock=clock)
    assert timing.per_token.seconds == (0.25,)
    assert len(timing.warnings) == 1 and "one timed run" in timing.warnings[0]


@pytest.mark.parametrize("new_tokens", [0, 1])
def test_a_generation_without_decode_steps_is_refused(new_tokens):
    clock = FakeClock()

    def generate(streamer):
        streamer.put("prompt")
        for _ in range(new_tokens):
            clock.advance(1.0)
            streamer.put("token")

    with pytest.raises(ImpossibleTiming, match=f"{new_tokens} new token"):
        time_generation(generate, repeats=1, warmup=0, clock=clock)


def test_a_generate_that_ignores_the_streamer_is_refused():
    with pytest.raises(ImpossibleTiming, match="pass the streamer on"):
        time_generation(lambda streamer: None, repeats=1, warmup=0)


def test_a_decode_step_of_no_time_is_refused():
    clock = FakeClock()
    with pytest.raises(ImpossibleTiming, match="decode steps"):
        time_generation(fake_generate(clock, 1.0, [0.5, 0.0]), repeats=1, warmup=0, clock=clock)


def test_generation_benchmark_runs_on_the_tiniest_settings(capsys):
    """The real thing through transformers' generate: a positive rate for every model, ratios printed."""
    from benchmarks.generation import main

    main(["generate", "--batch-sizes", "1", "--new-tokens", "3", "--layers", "1", "--hidden", "64",
          "--threads", "1", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("Llava", "ours"))]
    assert len(rows) == 6  # Llava and our five attention modes
    for row in rows:  # columns of widths 42 (model), 6 (batch), 12 (prefill ms), 14 (decode tok/s), 14 (ratio)
        prefill_ms, tokens_per_s, ratio = float(row[48:60]), float(row[60:74]), row[74:].strip()
        assert prefill_ms > 0 and tokens_per_s > 0
        assert (ratio == "") == row.startswith("Llava")
        if ratio:
            assert float(ratio.split("x")[0]) > 0
