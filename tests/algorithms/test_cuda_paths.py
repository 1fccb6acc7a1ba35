"""CPU == device semantics. Off CPU the algorithms take the torch path (the numba kernels
serve CPU tensors only); it must choose what the CPU kernels choose for the same values:

* integer statistics (histogram counts, candidate walks, exact extremes) equal;
* the same candidate chosen, so scales and offsets equal; or, where float64 losses summed
  in another order differ in the last bits, another candidate that ties: its loss,
  evaluated on CPU, within ``CROSS_DEVICE_RTOL`` of the CPU's best, never a candidate
  outside the tie (its offset is then that candidate's).

Every test runs on the torch path forced on CPU tensors (``kernels.torch_path()``), so CI
checks the device code without a GPU, and on CUDA where there is one (skipped otherwise;
run by benchmarks/gpu_check.sh on a GPU machine)."""
import pytest
import torch

from amct_hf.algorithms import hfmg as hfmg_mod
from amct_hf.algorithms import ifmr as ifmr_mod
from amct_hf.algorithms import kernels
from amct_hf.algorithms.convention import factors_from_clip
from amct_hf.algorithms.hfmg import HistogramState, hfmg_factors, histc_per_channel, search_ranges
from amct_hf.algorithms.ifmr import ifmr_candidates, ifmr_factors, ifmr_initial_bounds, ifmr_losses_sorted
from amct_hf.observers import StreamingHFMGObserver, StreamingIFMRObserver
from amct_hf.settings.quant_params import parse_quant_algo_params

from .test_ifmr import DISTS, make

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["torch-cpu", pytest.param("cuda", marks=CUDA)]


def on(device, x):
    return x if device == "torch-cpu" else x.cuda()


def cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def ifmr_tie(scores_losses, sum_sq, cands, ref, got):
    """Per channel: same scale, or the got candidate's (CPU) loss ties the reference's."""
    for c in range(cands.shape[0]):
        if got[c] == ref[c]:
            continue
        i_ref = int((cands[c] == ref[c]).to(torch.int8).argmax())
        i_got = int((cands[c] == got[c]).to(torch.int8).argmax())
        assert cands[c, i_got] == got[c], f"channel {c}: {got[c]} is not a candidate"
        gap = float(scores_losses[c, i_got] - scores_losses[c, i_ref])
        assert gap <= ifmr_mod.CROSS_DEVICE_RTOL * float(sum_sq[c]), (c, gap, float(sum_sq[c]))


def check_ifmr(x, asym, pmax, ref, got):
    """``x`` [N, C] on CPU; ``ref``/``got`` (scales, offsets) of the CPU kernels / the device."""
    s_ref, o_ref = ref
    s_got, o_got = (cpu(t) for t in got)
    same = s_ref == s_got
    assert torch.equal(o_ref[same], o_got[same]), "same scale, different offset"
    if bool(same.all()):
        return
    srt = x.t().contiguous().sort(1).values
    max0, min0 = ifmr_initial_bounds(srt, pmax, 0.999999)
    hi, lo, cands = ifmr_candidates(max0, min0, asym)
    losses = ifmr_losses_sorted(srt, hi, lo, cands)
    ifmr_tie(losses, srt.double().pow(2).sum(1), cands, s_ref, s_got)


def check_hfmg(state, asym, ref, got):
    """``state`` the CPU histogram; (scales, offsets) of the CPU kernels / the device."""
    s_ref, o_ref = ref
    s_got, o_got = (cpu(t) for t in got)
    same = (s_ref == s_got) & (o_ref == o_got)
    if bool(same.all()):
        return
    hist, lo, hi = state.hist, state.lo, state.hi
    left, right, valid = search_ranges(hist)
    losses = hfmg_mod.hfmg_losses(hist, left, right)
    w = (hi - lo) / hist.shape[1]
    dst_w = w[:, None] * (right - left + 1).to(torch.float32) / hfmg_mod.DST_BINS
    losses = torch.where(dst_w < 1.192092896e-7, torch.zeros_like(losses), losses)
    losses = torch.where(valid, losses, torch.full_like(losses, float("inf")))
    scales, offsets = factors_from_clip(lo[:, None] + (right + 1).to(torch.float32) * w[:, None],
                                        lo[:, None] + left.to(torch.float32) * w[:, None], asym)
    best = losses.min(1).values
    for c in torch.nonzero(~same)[:, 0].tolist():
        match = (scales[c] == s_got[c]) & (offsets[c] == o_got[c]) & valid[c]
        assert bool(match.any()), f"channel {c}: ({s_got[c]}, {o_got[c]}) is no candidate's factors"
        chosen = float(losses[c][match].min())
        assert chosen <= float(best[c]) * (1 + hfmg_mod.CROSS_DEVICE_RTOL) + 1e-300, (c, chosen, float(best[c]))


def device_run(device, fn):
    with kernels.torch_path(device == "torch-cpu"):
        return fn()


def test_cuda_tensors_do_not_take_the_numba_kernels():
    with kernels.torch_path():
        assert not kernels.use_kernels(torch.zeros(1))
    if torch.cuda.is_available():
        assert not kernels.use_kernels(torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("dist", DISTS)
def test_ifmr_on_device_equals_cpu(device, dist, asym):
    x = make(dist, 600, 6, 3)
    ref = ifmr_factors(x, asymmetric=asym)
    got = device_run(device, lambda: ifmr_factors(on(device, x), asymmetric=asym))
    assert got[0].device.type == ("cpu" if device == "torch-cpu" else "cuda")
    check_ifmr(x, asym, 0.999999, ref, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bins", [1024, 8192])
@pytest.mark.parametrize("dist", DISTS)
def test_hfmg_on_device_equals_cpu(device, dist, bins):
    x = make(dist, 600, 4, 5) * 3
    lo, hi = x.amin(0), x.amax(0)
    hist = histc_per_channel(x, lo, hi, bins)
    dev_hist = device_run(device, lambda: histc_per_channel(on(device, x), on(device, lo), on(device, hi), bins))
    assert torch.equal(hist, cpu(dev_hist))  # counts are integers: exact
    state = HistogramState.from_batch(x, bins)
    ref = hfmg_factors(state, True)
    got = device_run(device, lambda: hfmg_factors(HistogramState.from_batch(on(device, x), bins), True))
    check_hfmg(state, True, ref, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
@pytest.mark.parametrize("granularity", [0, 1])
def test_streaming_observers_on_device_equal_cpu(device, algo, granularity):
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": granularity})
    cls = StreamingIFMRObserver if algo == "ifmr" else StreamingHFMGObserver
    xs = [make(d, 500, 8, i) * (i + 1) for i, d in enumerate(["laplace", "outliers", "normal", "grid"])]
    if granularity == 0:
        xs = [x.reshape(-1, 1) for x in xs]
    ref_obs = cls(params, xs[0].shape[1])
    for x in xs:
        ref_obs.update(x)

    def run():
        obs = cls(params, xs[0].shape[1], torch.device("cpu" if device == "torch-cpu" else "cuda"))
        for x in xs:
            obs.update(on(device, x))
        hist = obs.hist
        return obs, (hist.counts.cpu(), hist.offsets.cpu(), hist.level.cpu()), obs.compute()

    dev_obs, (counts, offsets, level), got = device_run(device, run)
    h = ref_obs.hist
    assert torch.equal(h.counts, counts.double()) and torch.equal(h.level, level)  # integers: exact
    assert torch.allclose(h.offsets, offsets, rtol=1e-9, atol=1e-9)
    ref = ref_obs.compute()
    if algo == "ifmr":
        assert torch.equal(ref_obs.top, dev_obs.top.cpu()) and torch.equal(ref_obs.bottom, dev_obs.bottom.cpu())
        s_ref, s_got = ref[0], cpu(got[0])
        same = s_ref == s_got
        assert torch.equal(ref[1][same], cpu(got[1])[same])
        if not bool(same.all()):  # a tie on the CPU histogram's bin means
            from amct_hf.algorithms.streaming import streaming_ifmr_bounds
            max0, min0, _ = streaming_ifmr_bounds(h, ref_obs.top, ref_obs.bottom, ref_obs.count, params)
            hi, lo, cands = ifmr_candidates(max0, min0, params.asymmetric)
            _, losses = ifmr_mod.choose_scale(h.means(), ifmr_mod.prefix_sums(h.means(), h.counts), hi, lo, cands)
            ifmr_tie(losses, (h.counts * h.means() ** 2).sum(1), cands, s_ref, s_got)
    else:
        state = HistogramState(h.resample(params.num_of_bins), h.lo, h.hi)
        check_hfmg(state, params.asymmetric, ref, got)


def test_the_tie_check_refuses_a_different_candidate():
    """The semantics check itself: a scale two candidates away from the best fails it."""
    x = make("laplace", 600, 3, 1)
    ref = ifmr_factors(x)
    srt = x.t().contiguous().sort(1).values
    _, _, cands = ifmr_candidates(*ifmr_initial_bounds(srt, 0.999999, 0.999999), True)
    i = [int((cands[c] == ref[0][c]).to(torch.int8).argmax()) for c in range(3)]
    wrong = torch.stack([cands[c, i[c] + 2 if i[c] + 2 < cands.shape[1] else i[c] - 2] for c in range(3)])
    with pytest.raises(AssertionError):
        check_ifmr(x, True, 0.999999, ref, (wrong, ref[1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
@pytest.mark.parametrize("data", ["heavy", "levels", "constant"])
def test_hfmg_solve_on_device_equals_cpu_where_it_prunes_or_not(device, scale, data):
    """The device solve walks and evaluates only as far as the pruning needs; channels whose
    range is small enough for a candidate's destination bins to fall below FLT_EPSILON (a
    loss forced to zero, so the kernel does not prune) walk to the end: both choose as the
    CPU kernels, with any first chunk length."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3000, 6, generator=g) ** 3
    if data == "levels":
        x = torch.randint(-3, 4, (3000, 6), generator=g).float()
    elif data == "constant":
        x[:, :3] = 0.25
    x = x * scale
    state = HistogramState.from_batch(x, 4096)
    ref = hfmg_factors(state, True)
    for first in (1, 4, 64):
        got = device_run(device, lambda: hfmg_factors(
            HistogramState(on(device, state.hist), on(device, state.lo), on(device, state.hi)), True, first))
        check_hfmg(state, True, ref, got)
        if first == 1:
            first_got = [cpu(t) for t in got]
        else:  # the same losses, whatever the chunks: the same choice
            assert all(torch.equal(a, cpu(b)) for a, b in zip(first_got, got))
