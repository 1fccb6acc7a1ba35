"""The torch (accelerator) path, checked on CPU: the per-batch update never reads a value
back to the host, and its cost in operations does not grow with the channel count.

``kernels.torch_path()`` sends CPU tensors down the code that serves GPUs and NPUs; a
``TorchDispatchMode`` sees every aten operation it runs. On a device, the operations that
block the host are the scalar reads (``_local_scalar_dense``/``item``, behind ``.item()``,
``.tolist()``, ``bool(t)``, ``int(t)``), ``equal`` and the ops whose output shape depends on
the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, CUDA
``bincount``); a copy to the CPU shows as a ``_to_copy``/``copy_`` onto device ``cpu``.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amct_hf.algorithms import fused, kernels
from amct_hf.distributed import Comm
from amct_hf.errors import CalibrationInputError
from amct_hf.observers import OBSERVERS, make_observer
from amct_hf.observers.kv import KVBank
from amct_hf.settings.quant_params import parse_quant_algo_params

SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "equal", "masked_select",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "repeat_interleave"}


class OpLog(TorchDispatchMode):
    """Every aten op run inside the block, by name, the host syncs among them, and the ops
    that run a kernel (``kernels``: all but views, which only make a new tensor header)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.kernels = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops.append(name)
        if not func.is_view:
            self.kernels.append(name)
        if name in SYNC_OPS or self._bool_index(name, args) or self._to_host(name, args, kwargs):
            self.syncs.append(name)
        return func(*args, **kwargs)

    @staticmethod
    def _bool_index(name, args):
        if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
            return False
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)

    @staticmethod
    def _to_host(name, args, kwargs):
        # on CPU every tensor is already on the host; on a device this catches .cpu()/.to("cpu")
        if name in ("_to_copy", "to") and kwargs.get("device") is not None:
            src = args[0] if args else None
            return torch.device(kwargs["device"]).type == "cpu" and isinstance(src, torch.Tensor) \
                and src.device.type != "cpu"
        return False


def _batch(tokens, channels, seed, per_channel):
    """Every channel the same values times a power of two: identical histograms and walks in
    every channel, so any growth of the op count with channels comes from the code."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 1, generator=g) * torch.rand(tokens, 1, generator=g).pow(3) * 4
    x = base * torch.tensor([2.0 ** (c % 4 - 1) for c in range(channels)])
    return x if per_channel else x.reshape(-1, 1)


CASES = [(algo, mode, gran) for (algo, mode) in sorted(OBSERVERS) for gran in (0, 1)]


def _run(algo, mode, gran, channels, device="cpu"):
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    xs = [_batch(256, channels, seed, gran == 1).to(device) for seed in range(3)]
    logs = []
    with kernels.torch_path():
        # made on the torch path, as on a device (its histogram counts in int64)
        obs = make_observer(params, mode, xs[0].shape[1], torch.device(device))
        for x in xs:
            with OpLog() as log:
                obs.update(x)
            logs.append(log)
        with OpLog() as solve:
            scales, offsets = obs.compute()
    return logs, solve, (scales, offsets)


@pytest.mark.parametrize("algo,mode,gran", CASES)
def test_update_has_no_host_sync_and_a_channel_independent_op_count(algo, mode, gran):
    small, small_solve, _ = _run(algo, mode, gran, 64)
    large, large_solve, (scales, _) = _run(algo, mode, gran, 1024)
    for log in small + large:
        assert log.ops, "the update ran no tensor operation: the dispatch mode saw nothing"
        assert log.syncs == [], f"host syncs in the per-batch update: {log.syncs}"
    for a, b in zip(small, large):
        assert len(a.ops) == len(b.ops), (len(a.ops), len(b.ops))
    # the solve may read back (once per entry, or once per chunk of the HFMG walk), but
    # neither its reads nor its op count may depend on the channel count: no loop over channels
    assert len(small_solve.syncs) == len(large_solve.syncs)
    assert len(small_solve.ops) == len(large_solve.ops)
    assert scales.shape[0] == (1024 if gran else 1)


@pytest.mark.skipif(not fused.AVAILABLE, reason="Triton is not installed")
@pytest.mark.parametrize("algo,gran", [("ifmr", 0), ("ifmr", 1), ("hfmg", 0), ("hfmg", 1)])
def test_fused_update_has_no_host_sync_and_a_channel_independent_op_count(algo, gran):
    """The streaming observers as a CUDA device with Triton runs them: the count is one fused
    operation, and the rest neither reads back nor grows with the channels."""
    with fused.fused_path():
        small, _, _ = _run(algo, "streaming", gran, 64)
        large, _, _ = _run(algo, "streaming", gran, 1024)
    for a, b in zip(small, large):
        assert a.syncs == b.syncs == []
        assert a.ops == b.ops and a.kernels.count("count_on_grid") == 1
        assert "scatter_add_" not in a.kernels or gran == 0  # per-tensor tables keep the torch grid move


def test_update_ops_do_not_grow_with_batches_either():
    """Steady state: the second and third updates run the same operations."""
    logs, _, _ = _run("ifmr", "streaming", 1, 64)
    assert logs[1].ops == logs[2].ops


def test_the_dispatch_mode_sees_a_host_sync():
    """The detector itself: an .item() in the block is reported."""
    with OpLog() as log:
        torch.ones(3).sum().item()
    assert "_local_scalar_dense" in log.syncs


@pytest.mark.parametrize("groups", ["channel", "head"])
def test_bank_per_batch_is_sync_free_with_deferred_checks(groups):
    """The driver's sink, NaN/Inf check included, on the torch path: no host sync per batch."""
    params = parse_quant_algo_params({"act_algo": "ifmr", "quant_granularity": 1})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": groups, "value": groups},
                  head_dim=16, tokens=3 * 64, defer_checks=True)
    with kernels.torch_path():
        for seed in range(3):
            for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
                x = _batch(64, 32, seed, True)
                with OpLog() as log:
                    bank(name, x)
                assert log.syncs == [], log.syncs
        factors, _ = bank.finalize_all(Comm())
    assert len(factors) == 2 and all(len(s) == 32 for s, _ in factors.values())


def test_deferred_check_names_the_first_bad_layer_and_batch():
    params = parse_quant_algo_params({"act_algo": "ifmr", "quant_granularity": 0})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                  defer_checks=True)
    names = [f"model.layers.{i}.self_attn.{k}_proj" for i in range(2) for k in "kv"]
    with kernels.torch_path():
        for batch in range(3):
            for name in names:
                x = torch.randn(8, 4)
                if batch == 1 and name == names[3]:
                    x[2, 1] = float("inf")
                if batch == 2 and name == names[0]:
                    x[0, 0] = float("nan")  # later: must not be the one named
                bank(name, x)  # nothing raised yet: the flags stay on the device
        with pytest.raises(CalibrationInputError, match=r"'model.layers.1.self_attn.v_proj', batch 2: .*Inf"):
            bank.check_pending()
    bank.check_pending()  # read once: nothing left


def test_compiled_path_still_checks_each_batch_at_once():
    if not kernels.AVAILABLE:
        pytest.skip("numba not installed")
    params = parse_quant_algo_params({"act_algo": "ifmr", "quant_granularity": 0})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                  defer_checks=True)
    x = torch.randn(8, 4)
    x[1, 1] = float("nan")
    with pytest.raises(CalibrationInputError, match=r"k_proj', batch 1: .*NaN"):
        bank("model.layers.0.self_attn.k_proj", x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("algo,mode,gran", CASES)
def test_cuda_update_has_no_host_sync(algo, mode, gran):
    logs, _, _ = _run(algo, mode, gran, 256, device="cuda")
    for log in logs:
        assert log.syncs == [], log.syncs


def test_deferred_flags_are_read_back_every_check_every_batches():
    """Without waiting for the end: once check_every entries are flagged the flags go to
    the host (here, CPU: read at once) and the first bad batch stops the run at the end of
    its forward, before the next one."""
    params = parse_quant_algo_params({"act_algo": "hfmg", "quant_granularity": 1})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                  defer_checks=True)
    bank.checks.check_every = 3
    names = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    forwards = 0
    first_bad = r"layers.0.self_attn.v_proj', batch 1: .*NaN"
    with kernels.torch_path(), pytest.raises(CalibrationInputError, match=first_bad):
        for _ in range(3):
            for name in names:
                x = torch.randn(8, 4)
                if "0.self_attn.v" in name:
                    x[3, 3] = float("nan")
                bank(name, x)  # staged: nothing computed or read yet
            forwards += 1
            bank.flush()  # the driver, after each forward
    assert forwards == 1


def test_hfmg_entries_solved_together_equal_each_alone():
    """The torch path solves the channels of every entry in one walk: same factors as one
    entry at a time (each row's solve reads its own histogram only)."""
    from amct_hf.observers import StreamingHFMGObserver
    params = parse_quant_algo_params({"act_algo": "hfmg", "quant_granularity": 1})
    with kernels.torch_path():
        observers = []
        for i, channels in enumerate((3, 8, 5)):
            obs = StreamingHFMGObserver(params, channels)
            for seed in range(2):
                g = torch.Generator().manual_seed(10 * i + seed)
                obs.update(torch.randn(200, channels, generator=g) * (i + 1) + i)
            observers.append(obs)
        together = StreamingHFMGObserver.compute_many(observers)
        alone = [obs.compute() for obs in observers]
    for (s1, o1), (s2, o2) in zip(together, alone):
        assert torch.equal(s1, s2) and torch.equal(o1, o2)


@pytest.mark.parametrize("gran", [0, 1])
def test_ifmr_entries_solved_together_equal_each_alone(gran):
    """The torch path solves entries of one count together: the same factors and streaming
    tolerances as one entry at a time, and a few hundred operations for all of them."""
    from amct_hf.observers import StreamingIFMRObserver
    params = parse_quant_algo_params({"act_algo": "ifmr", "quant_granularity": gran})
    with kernels.torch_path():
        observers = []
        for i, channels in enumerate((3, 8, 5) if gran else (1, 1, 1, 1)):
            obs = StreamingIFMRObserver(params, channels, expected_count=400 * (1 if gran else 4))
            for seed in range(2):
                g = torch.Generator().manual_seed(10 * i + seed)
                x = torch.randn(200, channels if gran else 4, generator=g) * (i + 1) + i
                obs.update(x if gran else x.reshape(-1, 1))
            observers.append(obs)
        with OpLog() as together_log:
            together = StreamingIFMRObserver.compute_many(observers)
        bounds = [obs.tolerance.clone() for obs in observers]
        with OpLog() as alone_log:
            alone = [obs.compute() for obs in observers]
    for (s1, o1), (s2, o2), bound, obs in zip(together, alone, bounds, observers):
        assert torch.equal(s1, s2) and torch.equal(o1, o2)
        assert torch.equal(bound, obs.tolerance)
    assert len(together_log.syncs) < len(alone_log.syncs)
