"""The batched HFMG equals the one-channel-at-a-time reference (property tests)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amct_hf.algorithms.hfmg import HistogramState, hfmg_factors, hfmg_losses, histc_per_channel, search_ranges
from amct_hf.algorithms.reference import reference_hfmg, reference_hfmg_loss, reference_histc, reference_search_ranges

from .test_ifmr import DISTS, make


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dist=st.sampled_from(DISTS), n=st.integers(1, 300), c=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_histc_per_channel_equals_torch_histc(dist, n, c, seed):
    x = make(dist, n, c, seed)
    lo, hi = x.amin(0), x.amax(0)
    got = histc_per_channel(x, lo, hi, 1024)
    for j in range(c):
        assert torch.equal(got[j], reference_histc(x[:, j], 1024, lo[j], hi[j]).double())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dists=st.lists(st.sampled_from(DISTS), min_size=1, max_size=3), n=st.integers(1, 200),
       c=st.integers(1, 3), seed=st.integers(0, 10_000), asym=st.booleans(),
       bins=st.sampled_from([1024, 2048]), scale=st.sampled_from([1.0, 3.0, 0.25]))
def test_hfmg_matches_reference(dists, n, c, seed, asym, bins, scale):
    batches = [make(d, n, c, seed + i) * scale ** i for i, d in enumerate(dists)]
    state = HistogramState.from_batch(batches[0], bins)
    for b in batches[1:]:
        state.update(b)
    scales, offsets = hfmg_factors(state, asym)
    ref_s, ref_o = reference_hfmg(batches, asym, per_channel=True, num_of_bins=bins)
    for j in range(c):
        if scales[j].item() == pytest.approx(ref_s[j], rel=1e-6) and offsets[j].item() == ref_o[j]:
            continue
        # a differing choice is only allowed where the reference's float32 losses tie
        hist, lo, hi = state.hist[j], state.lo[j], state.hi[j]
        ranges = reference_search_ranges(hist)
        ref_losses = torch.stack([reference_hfmg_loss(hist.float(), lo, hi, a, b) for a, b in ranges])
        ours = hfmg_losses(hist[None], *[torch.tensor([[r[k] for r in ranges]]) for k in (0, 1)])[0]
        mine = int(torch.argmin(ours))
        assert ref_losses[mine] <= ref_losses.min() * (1 + 1e-4), (dists, j)


@settings(max_examples=30, deadline=None)
@given(dist=st.sampled_from(DISTS), n=st.integers(1, 500), seed=st.integers(0, 10_000),
       bins=st.sampled_from([1024, 2048, 4096]))
def test_search_ranges_equal_reference_walk(dist, n, seed, bins):
    x = make(dist, n, 2, seed)
    state = HistogramState.from_batch(x, bins)
    left, right, valid = search_ranges(state.hist)
    for j in range(2):
        got = [(int(a), int(b)) for a, b, v in zip(left[j], right[j], valid[j]) if v]
        assert got == reference_search_ranges(state.hist[j])


def test_losses_equal_pytorch_formula_in_float64():
    x = make("laplace", 5000, 1, 7) * 3
    state = HistogramState.from_batch(x, 2048)
    hist = state.hist[0]
    ranges = reference_search_ranges(hist)[::37]
    lefts = torch.tensor([[a for a, _ in ranges]])
    rights = torch.tensor([[b for _, b in ranges]])
    ours = hfmg_losses(state.hist, lefts, rights)[0]
    ref = torch.stack([reference_hfmg_loss(hist, torch.tensor(0.0, dtype=torch.float64),
                                           torch.tensor(2048.0, dtype=torch.float64), a, b)
                       for a, b in ranges])  # unit-width bins in float64: same units as ours
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)
