"""The min-max reference ranges."""
import torch

from amct_hf.algorithms.convention import minmax_factors
from amct_hf.observers.minmax import MinMaxRanges


def test_ranges_accumulate_over_batches_and_follow_the_record_granularity():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(7, 4) * 3
    ranges = MinMaxRanges()
    ranges("k", a)
    ranges("k", b)
    both = torch.cat([a, b])
    per_channel = ranges.factors({"k": ([0.1] * 4, [0] * 4)})["k"]
    want = minmax_factors(both.amin(0), both.amax(0))
    assert torch.equal(per_channel[0], want[0]) and torch.equal(per_channel[1], want[1])
    per_tensor = ranges.factors({"k": ([0.1], [0])})["k"]
    want = minmax_factors(both.min().reshape(1), both.max().reshape(1))
    assert per_tensor[0].shape == (1,) and torch.equal(per_tensor[0], want[0])
