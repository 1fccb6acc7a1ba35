"""Bounded-memory observers: order/partition independence, stated IFMR tolerance, and the
comparison with exact IFMR on real SmolLM2 key/value activations."""
import pytest
import torch

from amct_hf.algorithms.aligned import AlignedHistogram
from amct_hf.algorithms.reference import reference_ifmr_channel
from amct_hf.observers import OneBatchHFMGObserver, StreamingHFMGObserver, StreamingIFMRObserver
from amct_hf.settings.quant_params import parse_quant_algo_params

from ..algorithms.test_ifmr import make


def batches(seed=0):
    return [make(d, 257, 4, seed + i) * s for i, (d, s) in
            enumerate([("normal", 1), ("outliers", 2), ("laplace", 0.5), ("uniform", 4), ("grid", 1)])]


def test_aligned_histogram_independent_of_batching_and_order():
    xs = batches()
    a = AlignedHistogram.empty(4, 512)
    for x in xs:
        a.update(x)
    b = AlignedHistogram.empty(4, 512)
    for x in reversed(xs):
        b.update(x)
    c = AlignedHistogram.empty(4, 512)
    c.update(torch.cat(xs))
    for other in (b, c):
        assert torch.equal(a.counts, other.counts)
        assert torch.equal(a.level, other.level) and torch.equal(a.origin, other.origin)
        assert torch.allclose(a.offsets, other.offsets, rtol=1e-9, atol=1e-9)
    assert a.counts.sum().item() == 4 * sum(x.shape[0] for x in xs)
    # every bin's mean lies inside the bin
    inside = (a.means() >= a.edges()) & (a.means() < a.edges() + a.width[:, None])
    assert bool(inside.all())


def test_memory_does_not_grow_with_tokens():
    params = parse_quant_algo_params({"quant_granularity": 1})
    obs = StreamingIFMRObserver(params, 8)
    obs.update(make("normal", 100, 8, 0))
    sizes = [t.numel() for t in (obs.hist.counts, obs.hist.offsets, obs.top, obs.bottom)]
    for i in range(20):
        obs.update(make("laplace", 1000, 8, i) * (i + 1))
    assert [t.numel() for t in (obs.hist.counts, obs.hist.offsets, obs.top, obs.bottom)] == sizes


def exact_losses_and_scale(data, asym):
    s, o, losses = reference_ifmr_channel(data, asymmetric=asym)
    return s, losses


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("bins", [64, 256, 2048])
def test_stated_tolerance_holds(asym, bins):
    """exact_loss(streaming choice) <= exact optimum + tolerance, on every channel."""
    xs = batches(3)
    params = parse_quant_algo_params({"quant_granularity": 1, "asymmetric": asym})
    obs = StreamingIFMRObserver(params, xs[0].shape[1], bins=bins)
    for x in xs:
        obs.update(x)
    scales, _ = obs.compute()
    data = torch.cat(xs)
    for j in range(data.shape[1]):
        ref_scale, losses = exact_losses_and_scale(data[:, j].contiguous(), asym)
        from amct_hf.algorithms.ifmr import ifmr_candidates, ifmr_initial_bounds
        srt = data[:, j].sort().values[None]
        cand = ifmr_candidates(*ifmr_initial_bounds(srt, 0.999999, 0.999999), asym)[2][0]
        chosen = int(torch.argmin((cand - scales[j]).abs()))
        # losses are means; the tolerance is in summed squared error
        gap = (losses[chosen] - losses.min()).item() * data.shape[0]
        assert gap <= obs.tolerance[j].item() * (1 + 1e-6) + 1e-6, (j, gap, obs.tolerance[j].item())


def test_streaming_hfmg_close_to_one_batch_hfmg():
    xs = batches(5)
    for gran in (0, 1):
        params = parse_quant_algo_params({"act_algo": "hfmg", "quant_granularity": gran})
        channels = xs[0].shape[1] if gran else 1
        stream, exact = StreamingHFMGObserver(params, channels), OneBatchHFMGObserver(params, channels)
        for x in xs:
            x = x if gran else x.reshape(-1, 1)
            stream.update(x)
            exact.update(x)
        s1, _ = stream.compute()
        s2, _ = exact.compute()
        assert torch.allclose(s1, s2, rtol=0.05)


def quant_mse(x, scale, offset):
    q = torch.clamp(torch.round(x / scale) + offset, -128, 127)
    return ((q - offset) * scale - x).pow(2).mean(0)


def test_bounded_ifmr_on_real_smollm2_activations(smollm2_dir):
    """On every layer: the stated tolerance holds, and the quantization MSE of the
    bounded-memory factors is within 0.1% of the exact IFMR factors'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amct_hf.algorithms.ifmr import ifmr_factors
    from amct_hf.data.bundled import news_corpus_path
    from amct_hf.data.samples import load_texts, make_batches, tokenize_samples
    from amct_hf.modeling.attention import kv_calibration
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    samples = tokenize_samples(tok, load_texts(str(news_corpus_path())), seq_len=256, num_samples=4)
    acts = {}
    with torch.no_grad(), kv_calibration(model, lambda n, x: acts.setdefault(n, []).append(x.clone())):
        for b in make_batches(samples, batch_size=2, pad_token_id=tok.pad_token_id):
            model(input_ids=b["input_ids"], use_cache=False)
    assert len(acts) == 60
    worst = 0.0
    for gran in (0, 1):
        params = parse_quant_algo_params({"quant_granularity": gran})
        for name, chunks in acts.items():
            data = torch.cat(chunks)
            flat = data if gran else data.reshape(-1, 1)
            obs = StreamingIFMRObserver(params, flat.shape[1])
            for c in chunks:
                obs.update(c if gran else c.reshape(-1, 1))
            s_stream, o_stream = obs.compute()
            s_exact, o_exact = ifmr_factors(flat)
            mse_stream = quant_mse(flat, s_stream, o_stream).sum()
            mse_exact = quant_mse(flat, s_exact, o_exact).sum()
            rel = ((mse_stream - mse_exact) / mse_exact).item()
            worst = max(worst, rel)
            assert rel <= 1e-3, (name, gran, rel)
    print(f"worst relative MSE excess of bounded-memory IFMR: {worst:.2e}")


@pytest.mark.parametrize("algo,gran", [("ifmr", 0), ("hfmg", 1)])
def test_int32_counts_widen_before_a_row_could_overflow(monkeypatch, algo, gran):
    """On a device the counts are int32 while no row can hold more values than int32 counts;
    the observer widens them to int64 before the values it is handed (one update, a staged
    group, or a merged part) could pass that. With the limit lowered to 300 values, the
    counts widen on the way and every factor equals that of int64 counts throughout."""
    import amct_hf.observers.streaming as streaming
    from amct_hf.algorithms import kernels
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(128, 8, generator=g) * (1 + i) for i in range(4)]
    cls = StreamingIFMRObserver if algo == "ifmr" else StreamingHFMGObserver
    results, dtypes = [], []
    for limit in (streaming.COUNT_LIMIT, 300):
        monkeypatch.setattr(streaming, "COUNT_LIMIT", limit)
        with kernels.torch_path():
            obs = cls(params, 8, expected_count=512) if algo == "ifmr" else cls(params, 8)
            seen = [obs.hist.counts.dtype]
            obs.update(xs[0])
            obs.update_parts(iter(xs[1:3]), torch.stack(xs[1:3]).amin((0, 1)), torch.stack(xs[1:3]).amax((0, 1)))
            seen.append(obs.hist.counts.dtype)
            other = cls(params, 8, expected_count=512) if algo == "ifmr" else cls(params, 8)
            other.update(xs[3])
            obs.merge(other)
            seen.append(obs.hist.counts.dtype)
            results.append(obs.compute())
        dtypes.append(seen)
    assert dtypes[0] == [torch.int32] * 3  # far from the limit: int32 throughout
    assert dtypes[1] == [torch.int32, torch.int64, torch.int64]  # 128 + 256 > 300: widened
    assert all(torch.equal(a, b) for a, b in zip(*results))
