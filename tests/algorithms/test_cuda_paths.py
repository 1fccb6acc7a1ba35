"""On a CUDA device the algorithms take the batched torch paths (the numba kernels serve CPU
tensors only); they must choose the factors the CPU kernels choose for the same values.
Skipped without CUDA (run by benchmarks/gpu_check.sh on a GPU machine)."""
import pytest
import torch

from amct_hf.algorithms import kernels
from amct_hf.algorithms.hfmg import HistogramState, hfmg_factors, histc_per_channel
from amct_hf.algorithms.ifmr import ifmr_factors
from amct_hf.settings.quant_params import parse_quant_algo_params

from .test_ifmr import DISTS, make

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_tensors_do_not_take_the_numba_kernels():
    assert not kernels.use_kernels(torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("dist", DISTS)
def test_ifmr_on_cuda_equals_cpu(dist, asym):
    x = make(dist, 600, 6, 3)
    cpu = ifmr_factors(x, asymmetric=asym)
    gpu = ifmr_factors(x.cuda(), asymmetric=asym)
    assert gpu[0].is_cuda
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("bins", [1024, 8192])
@pytest.mark.parametrize("dist", DISTS)
def test_hfmg_on_cuda_equals_cpu(dist, bins):
    x = make(dist, 600, 4, 5) * 3
    lo, hi = x.amin(0), x.amax(0)
    assert torch.equal(histc_per_channel(x, lo, hi, bins),
                       histc_per_channel(x.cuda(), lo.cuda(), hi.cuda(), bins).cpu())
    cpu = hfmg_factors(HistogramState.from_batch(x, bins), True)
    gpu = hfmg_factors(HistogramState.from_batch(x.cuda(), bins), True)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
@pytest.mark.parametrize("granularity", [0, 1])
def test_streaming_observers_on_cuda_equal_cpu(algo, granularity):
    from amct_hf.streaming import StreamingHFMGObserver, StreamingIFMRObserver
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": granularity})
    cls = StreamingIFMRObserver if algo == "ifmr" else StreamingHFMGObserver
    xs = [make(d, 500, 8, i) * (i + 1) for i, d in enumerate(["laplace", "outliers", "normal", "grid"])]
    if granularity == 0:
        xs = [x.reshape(-1, 1) for x in xs]
    results = []
    for device in ("cpu", "cuda"):
        obs = cls(params)
        for x in xs:
            obs.update(x.to(device))
        counts = obs.hist.counts.cpu()
        results.append((counts, *(t.cpu() for t in obs.compute())))
    assert torch.equal(results[0][0], results[1][0])  # bin counts are integers: exact
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
