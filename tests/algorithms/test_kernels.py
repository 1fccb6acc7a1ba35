"""The compiled CPU kernels and the device-generic torch paths compute the same thing."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amct_hf.algorithms import kernels
from amct_hf.algorithms.hfmg import HistogramState, hfmg_factors, histc_per_channel
from amct_hf.algorithms.ifmr import ifmr_factors

from .test_ifmr import DISTS, make

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")


def torch_path(monkeypatch):
    monkeypatch.setattr(kernels, "use_kernels", lambda t: False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(dist=st.sampled_from(DISTS), n=st.integers(1, 600), c=st.integers(1, 6), seed=st.integers(0, 9999),
       asym=st.booleans(), pmax=st.sampled_from([0.999999, 0.99]))
def test_ifmr_kernel_equals_torch_path(monkeypatch, dist, n, c, seed, asym, pmax):
    x = make(dist, n, c, seed)
    fast = ifmr_factors(x, asymmetric=asym, max_percentile=pmax)
    with monkeypatch.context() as m:
        torch_path(m)
        slow = ifmr_factors(x, asymmetric=asym, max_percentile=pmax)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(dist=st.sampled_from(DISTS), n=st.integers(1, 600), c=st.integers(1, 4), seed=st.integers(0, 9999),
       asym=st.booleans(), bins=st.sampled_from([1024, 2048, 8192]))
def test_hfmg_kernels_equal_torch_path(monkeypatch, dist, n, c, seed, asym, bins):
    x = make(dist, n, c, seed) * 3
    lo, hi = x.amin(0), x.amax(0)
    fast_hist = histc_per_channel(x, lo, hi, bins)
    fast = hfmg_factors(HistogramState.from_batch(x, bins), asym)
    with monkeypatch.context() as m:
        torch_path(m)
        slow_hist = histc_per_channel(x, lo, hi, bins)
        slow = hfmg_factors(HistogramState.from_batch(x, bins), asym)
    assert torch.equal(fast_hist, slow_hist)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("with_offsets", [True, False])
def test_aligned_histogram_kernel_equals_torch_path(monkeypatch, with_offsets):
    from amct_hf.algorithms.aligned import AlignedHistogram
    xs = [make(d, 300, 5, i) * (i + 1) for i, d in enumerate(["normal", "outliers", "uniform", "grid"])]
    fast = AlignedHistogram.empty(5, 256, with_offsets=with_offsets)
    for x in xs:
        fast.update(x)
    with monkeypatch.context() as m:
        torch_path(m)
        slow = AlignedHistogram.empty(5, 256, with_offsets=with_offsets)
        for x in xs:
            slow.update(x)
    assert fast.offsets.shape == slow.offsets.shape == (5, 256 if with_offsets else 0)
    assert torch.equal(fast.counts, slow.counts) and torch.equal(fast.level, slow.level)
    assert torch.allclose(fast.offsets, slow.offsets, rtol=1e-9, atol=1e-9)
    if with_offsets:  # the compiled bin means are the torch formula's, bit for bit
        compiled = fast.means()
        with monkeypatch.context() as m:
            torch_path(m)
            assert torch.equal(compiled, fast.means())


@pytest.mark.parametrize("with_offsets", [True, False])
def test_per_tensor_update_split_over_threads_equals_one_thread(monkeypatch, with_offsets):
    """A single channel (per-tensor) is split between threads, each with a private
    histogram and extreme buffers merged afterwards: the same counts, offsets and extremes
    as one thread over all values, and as the torch path."""
    import numba

    from amct_hf.algorithms.aligned import AlignedHistogram
    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: nothing is split")
    xs = [make(d, 3 * kernels._SPLIT_MIN_VALUES // 2, 1, i) * (i + 1)
          for i, d in enumerate(["laplace", "outliers", "normal"])]
    results = []
    for path in ("split", "one_thread", "torch"):
        with monkeypatch.context() as m:
            if path == "one_thread":
                m.setattr(kernels, "_SPLIT_MIN_VALUES", 1 << 62)
            if path == "torch":
                torch_path(m)
            hist = AlignedHistogram.empty(1, 65536, with_offsets=with_offsets)
            top, bottom = torch.full((1, 64), float("-inf")), torch.full((1, 64), float("inf"))
            for x in xs:
                if not hist.update(x.t().contiguous(), top, bottom, channels_first=True):
                    top = torch.cat([top, x.t()], 1).topk(64, 1).values
                    bottom = torch.cat([bottom, x.t()], 1).topk(64, 1, largest=False).values
            results.append((hist, top, bottom))
    (split, top, bottom), (one, top1, bottom1), (slow, top2, bottom2) = results
    assert split.counts.sum() == sum(x.numel() for x in xs)
    assert torch.equal(split.counts, one.counts) and torch.equal(split.counts, slow.counts)
    assert torch.allclose(split.offsets, one.offsets, rtol=1e-12, atol=1e-12)
    assert torch.allclose(split.offsets, slow.offsets, rtol=1e-9, atol=1e-9)
    assert torch.equal(top, top1) and torch.equal(top, top2)
    assert torch.equal(bottom, bottom1) and torch.equal(bottom, bottom2)
    data = torch.cat(xs).reshape(-1)
    assert torch.equal(top[0], data.topk(64).values)
    assert torch.equal(bottom[0], data.topk(64, largest=False).values)


def test_streaming_ifmr_kernel_equals_torch_path(monkeypatch):
    from amct_hf.observers.streaming import StreamingIFMRObserver
    from amct_hf.settings.quant_params import parse_quant_algo_params
    params = parse_quant_algo_params({"quant_granularity": 1, "asymmetric": False})
    xs = [make(d, 400, 6, i) for i, d in enumerate(["laplace", "outliers", "normal", "grid"])]
    results = []
    for use in (True, False):
        with monkeypatch.context() as m:
            if not use:
                torch_path(m)
            obs = StreamingIFMRObserver(params, 6)
            for x in xs:
                obs.update(x)
            top, bottom = obs.top.clone(), obs.bottom.clone()
            results.append((*obs.compute(), obs.tolerance, top, bottom))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.allclose(results[0][2], results[1][2], rtol=1e-9)
    assert torch.equal(results[0][3], results[1][3]) and torch.equal(results[0][4], results[1][4])
    data = torch.cat(xs)
    assert torch.equal(results[0][3], data.topk(64, 0).values.t())
    assert torch.equal(results[0][4], data.topk(64, 0, largest=False).values.t())


@pytest.mark.parametrize("dist", DISTS)
def test_hfmg_pruned_walk_keeps_every_loss_that_can_win(dist):
    import math

    import numpy as np

    from amct_hf.algorithms.hfmg import DST_BINS, hfmg_losses, second_moment
    x = make(dist, 4000, 5, 7) * 3
    lo, hi = x.amin(0), x.amax(0)
    hist = histc_per_channel(x, lo, torch.where(hi > lo, hi, lo + 1), 2048)
    left, right, count = kernels.hfmg_walk(hist.numpy(), math.ceil(2048 / 4))
    args = [hist.numpy(), second_moment(hist).numpy(), left, right, count, DST_BINS]
    full = kernels.hfmg_losses(*args)
    valid = np.arange(left.shape[1])[None, :] < count[:, None]
    # the kernel's own prefix tables give the torch formula's losses
    reference = hfmg_losses(hist, torch.from_numpy(left), torch.from_numpy(right)).numpy()
    assert np.allclose(full[valid], reference[valid], rtol=1e-12, atol=1e-9 * float(hist.sum()))
    pruned = kernels.hfmg_losses(*args, np.ones(5, dtype=np.bool_))
    kept = np.isfinite(pruned)
    assert np.array_equal(pruned[kept], full[kept])  # what is computed is computed the same way
    full_valid = np.where(valid, full, np.inf)
    assert np.array_equal(np.argmin(np.where(kept, pruned, np.inf), 1), np.argmin(full_valid, 1))
    # skipped candidates all lose, by more than the selection's tie window
    best = full_valid.min(1, keepdims=True)
    assert np.all(full_valid[valid & ~kept] > (best * (1 + 1e-12)).repeat(left.shape[1], 1)[valid & ~kept])
    if dist in ("normal", "laplace", "outliers"):
        assert (valid & ~kept).sum() > valid.sum() / 4  # and the bound does skip work


@pytest.mark.parametrize("dist", ["normal", "outliers", "positive", "constant"])
def test_streaming_hfmg_kernels_equal_torch_path(monkeypatch, dist):
    from amct_hf.observers.streaming import StreamingHFMGObserver
    from amct_hf.settings.quant_params import parse_quant_algo_params
    params = parse_quant_algo_params({"act_algo": "hfmg", "quant_granularity": 1})
    xs = [make(dist, 700, 4, seed) * (seed + 1) for seed in range(3)]
    results = []
    for use in (True, False):
        with monkeypatch.context() as m:
            if not use:
                torch_path(m)
            obs = StreamingHFMGObserver(params, 4, bins=512)
            for x in xs:
                obs.update(x)
            h = obs.hist
            probe = torch.linspace(-30, 30, 999, dtype=torch.float64).repeat(4, 1)
            probe = torch.cat([probe, torch.stack([h.lo.double(), h.hi.double()], 1)], 1)
            results.append((h.cumulative_at(probe), *obs.compute()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("dist", ["normal", "outliers", "positive", "constant"])
def test_resample_kernel_equals_cumulative_difference(monkeypatch, dist):
    """The fused HFMG resample is bit for bit the torch path: cumulative counts at the
    ``num_of_bins`` edges over [lo, hi], differenced, a constant channel in the middle bin."""
    from amct_hf.algorithms.aligned import AlignedHistogram
    h = AlignedHistogram.empty(4, 512)
    for seed in range(3):
        h.update(make(dist, 700, 4, seed) * (seed + 1))
    fused = h.resample(4096)
    with monkeypatch.context() as m:
        torch_path(m)
        expected = h.resample(4096)
        step = (h.hi.double() - h.lo.double()) / 4096
        edges = h.lo.double()[:, None] + step[:, None] * torch.arange(4097, dtype=torch.float64)
        by_hand = h.cumulative_at(edges).diff(dim=1)
    const = h.lo == h.hi
    by_hand[const] = 0.0
    by_hand[const, 2048] = h.counts[const].sum(1)
    assert torch.equal(expected, by_hand)
    assert torch.equal(fused, expected)
    assert torch.allclose(fused.sum(1), h.counts.sum(1))  # every value lands in a bin
