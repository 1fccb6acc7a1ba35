"""amct_hf.evaluation.intervals: the paired interval against closed forms and a known sampling law."""
import math

import numpy as np
import pytest

from amct_hf.errors import InvalidArgumentError
from amct_hf.evaluation.intervals import paired_relative_increase


def test_identical_runs_give_a_zero_point_interval():
    base = [100.0, 250.0, 80.0, 120.0]
    iv = paired_relative_increase(base, base, 50)
    assert (iv.point, iv.low, iv.high) == (0.0, 0.0, 0.0)


def test_the_same_shift_per_token_in_every_chunk_is_exact():
    # every chunk's NLL grows by 0.002 nats per token: every resample sees exactly that
    tokens = np.array([40, 60, 50, 30, 70])
    base = np.array([130.0, 170.0, 150.0, 95.0, 210.0])
    iv = paired_relative_increase(base, base + 0.002 * tokens, tokens)
    assert iv.point == pytest.approx(math.expm1(0.002), rel=1e-12)
    assert iv.low == pytest.approx(iv.point, rel=1e-9) and iv.high == pytest.approx(iv.point, rel=1e-9)


def test_pairing_removes_the_difficulty_of_the_chunks():
    # chunk difficulty varies a lot, the quantization effect little: a paired interval is
    # narrow even though the chunks' own perplexities are all over the place
    rng = np.random.default_rng(1)
    base = rng.uniform(1000, 3000, size=32)
    quant = base + 511 * rng.normal(0.001, 0.0005, size=32)
    iv = paired_relative_increase(base, quant, 511)
    assert iv.low < iv.point < iv.high
    assert 0 < iv.low and iv.high < 0.002


def test_interval_covers_the_true_increase_about_as_often_as_it_claims():
    # chunks whose per-token NLL difference is drawn from a known law with mean mu: the
    # 95% interval should contain expm1(mu) in roughly 95% of repeated experiments
    rng = np.random.default_rng(7)
    mu, hits, trials = 0.0015, 0, 200
    for t in range(trials):
        base = rng.uniform(1000, 3000, size=40)
        quant = base + 511 * rng.normal(mu, 0.002, size=40)
        iv = paired_relative_increase(base, quant, 511, resamples=1000, seed=t)
        hits += iv.low <= math.expm1(mu) <= iv.high
    assert 0.85 <= hits / trials <= 0.99


def test_more_confidence_is_a_wider_interval_and_the_seed_fixes_it():
    rng = np.random.default_rng(3)
    base = rng.uniform(500, 900, size=20)
    quant = base + rng.normal(0.5, 1.0, size=20)
    narrow = paired_relative_increase(base, quant, 255, confidence=0.8)
    wide = paired_relative_increase(base, quant, 255, confidence=0.99)
    assert wide.low < narrow.low < narrow.high < wide.high
    assert paired_relative_increase(base, quant, 255, seed=5) == paired_relative_increase(base, quant, 255, seed=5)
    assert wide.format().startswith(f"{100 * wide.point:+.2f}% [")


@pytest.mark.parametrize("kwargs, match", [
    ({"baseline_nll": [1.0, 2.0], "quantized_nll": [1.0, 2.0, 3.0]}, "different chunk counts"),
    ({"baseline_nll": [1.0], "quantized_nll": [1.0]}, "at least 2"),
    ({"baseline_nll": [1.0, float("nan")], "quantized_nll": [1.0, 2.0]}, "non-finite"),
    ({"tokens": [3, 0]}, "positive"),
    ({"tokens": [3, 3, 3]}, "positive"),
    ({"resamples": 10}, "resamples"),
    ({"confidence": 1.0}, "confidence"),
])
def test_bad_input_is_refused(kwargs, match):
    args = {"baseline_nll": [1.0, 2.0], "quantized_nll": [1.5, 2.5], "tokens": 3, **kwargs}
    with pytest.raises(InvalidArgumentError, match=match):
        paired_relative_increase(args.pop("baseline_nll"), args.pop("quantized_nll"), args.pop("tokens"), **args)
