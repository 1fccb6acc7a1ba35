"""Streaming IFMR reads AMCT's order statistic exactly at any size: the exact extreme
buffers are sized from the token count the driver knows in advance; without it (count
unknown) the histogram fallback is said once per run, not once per entry."""
import logging

import pytest
import torch

from amct_hf.algorithms import kernels
from amct_hf.algorithms.ifmr import ifmr_initial_bounds
from amct_hf.algorithms.streaming import extreme_ranks, streaming_ifmr_bounds
from amct_hf.distributed import Comm
from amct_hf.observers.kv import KVBank
from amct_hf.observers.streaming import DEFAULT_TOPK, extremes_for_count
from amct_hf.settings.quant_params import parse_quant_algo_params

NAMES = [f"model.layers.{i}.self_attn.{k}_proj" for i in range(3) for k in "kv"]


def feed(bank, batches=4, tokens=64, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for _ in range(batches):
        for name in NAMES:
            x = torch.randn(tokens, width, generator=g) * torch.rand(tokens, 1, generator=g).pow(4) * 5
            data.setdefault(name, []).append(x)
            bank(name, x)
    return {n: torch.cat(v) for n, v in data.items()}


@pytest.mark.parametrize("torch_path", [False, True])
@pytest.mark.parametrize("granularity,groups", [(0, "channel"), (1, "channel"), (1, "head")])
def test_deep_rank_is_read_exactly_when_the_token_count_is_known(caplog, torch_path, granularity, groups):
    # 0.95 on 2048 values per entry (per-tensor): rank 103, beyond the 64 extremes kept by default
    params = parse_quant_algo_params({"act_algo": "ifmr", "quant_granularity": granularity,
                                      "max_percentile": 0.95, "min_percentile": 0.97})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": groups, "value": groups},
                  head_dim=4, tokens=4 * 64, defer_checks=True)
    with kernels.torch_path(torch_path), caplog.at_level(logging.WARNING, logger="amct_hf"):
        data = feed(bank)
        observers = {n: o for b in bank.banks.values() for n, o in b.observers.items()}
        for name, obs in observers.items():
            x = data[name]
            cols = x.reshape(-1, 1) if granularity == 0 else (
                x if groups == "channel" else x.reshape(-1, 2, 4).transpose(1, 2).reshape(-1, 2))
            assert obs.count == cols.shape[0]
            assert obs.topk >= max(extreme_ranks(obs.count, params))
            if granularity == 0:
                assert max(extreme_ranks(obs.count, params)) > DEFAULT_TOPK  # the case that fell back
            max0, min0, exact = streaming_ifmr_bounds(obs.hist, obs.top, obs.bottom, obs.count, params)
            ref_max, ref_min = ifmr_initial_bounds(cols.t().contiguous().sort(1).values, 0.95, 0.97)
            assert exact and torch.equal(max0, ref_max) and torch.equal(min0, ref_min), name
        factors, _ = bank.finalize_all(Comm())
    assert len(factors) == len(NAMES)
    assert not [r for r in caplog.records if "exact extremes" in r.getMessage()]


def test_unknown_count_falls_back_and_says_so_once_per_run(caplog):
    params = parse_quant_algo_params({"act_algo": "ifmr", "quant_granularity": 0, "max_percentile": 0.95})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"})
    with caplog.at_level(logging.WARNING, logger="amct_hf"):
        feed(bank)
        factors, _ = bank.finalize_all(Comm())
    assert len(factors) == len(NAMES)  # six entries fell back, across both banks
    said = [r for r in caplog.records if "exact extremes" in r.getMessage()]
    assert len(said) == 1 and "once per run" in said[0].getMessage()


def test_extremes_for_count():
    params = parse_quant_algo_params({"act_algo": "ifmr"})  # 0.999999
    assert extremes_for_count(params, 1, None) == DEFAULT_TOPK
    # 8B geometry per-tensor: 64 x 2048 tokens x 1024 values per token -> rank 135
    assert extremes_for_count(params, 1, 64 * 2048 * 1024) == 135 + 16
    assert extremes_for_count(params, 1024, 64 * 2048) == DEFAULT_TOPK  # rank 1 per channel
    deep = parse_quant_algo_params({"act_algo": "ifmr", "max_percentile": 0.6})
    assert extremes_for_count(deep, 1024, 10**9) == (1 << 22) // 1024  # capped, then read from the histogram


def test_driver_sizes_the_extremes_from_its_token_count(tiny_dir, tmp_path, caplog):
    """calibrate_kv_cache: a deep percentile rank on a tiny model reads exactly, nothing logged."""
    from amct_hf.calibrate import calibrate_kv_cache
    from amct_hf.observers import streaming
    seen = []
    real = streaming.StreamingIFMRObserver.compute

    def compute(obs):
        out = real(obs)
        seen.append((obs.count, obs.topk, obs.extremes_exact))
        return out

    streaming.StreamingIFMRObserver.compute = compute
    try:
        with caplog.at_level(logging.WARNING, logger="amct_hf"):
            calibrate_kv_cache(str(tiny_dir), str(tiny_dir / "corpus.txt"), record_file=tmp_path / "kv.txt",
                               quant_algo_params={"max_percentile": 0.9, "min_percentile": 0.95},
                               num_samples=4, seq_len=32, progress=False, write=False)
    finally:
        streaming.StreamingIFMRObserver.compute = real
    assert seen and all(exact for *_, exact in seen)
    assert max(count for count, *_ in seen) * 0.1 > DEFAULT_TOPK  # the rank would have fallen back
    assert not [r for r in caplog.records if "exact extremes" in r.getMessage()]
