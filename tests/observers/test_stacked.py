"""Grouped updates on the torch path: the entries of one forward fed to one observer of all
their channels give every entry exactly the statistics and factors it has alone, and the
cost of a batch in operations does not grow with the number of entries."""
import pytest
import torch

from amct_hf.algorithms import fused, kernels
from amct_hf.distributed import Comm
from amct_hf.observers import LayerBank
from amct_hf.observers.kv import KVBank
from amct_hf.settings.quant_params import parse_quant_algo_params
from tests.observers.test_device_path import OpLog


def names(layers):
    return [f"model.layers.{i}.self_attn.{k}_proj" for i in range(layers) for k in "kv"]


def batches(layers, rounds, tokens=48, width=8, seed=0):
    """Entries with different ranges per layer (so groups really hold different rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rounds):
        out.append({n: torch.randn(tokens, width, generator=g) * (1 + i) ** 1.5 + 0.3 * i
                    for i, n in enumerate(names(layers))})
    return out


def factors(bank_kind, params, rounds, stage_bytes=None, flush=True, device="cpu"):
    rounds = [{n: x.to(device) for n, x in batch.items()} for batch in rounds]
    with kernels.torch_path():
        if bank_kind == "alone":
            banks = {k: LayerBank(params, "streaming", tokens=len(rounds) * 48) for k in "kv"}
        else:
            bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                          tokens=len(rounds) * 48, defer_checks=True)
            banks = {k: bank.banks[kind] for k, kind in (("k", "key"), ("v", "value"))}
            assert all(b.stacks is not None for b in banks.values())
            if stage_bytes:
                for b in banks.values():
                    b.stacks.stage_bytes = stage_bytes
        for batch in rounds:
            for name, x in batch.items():
                banks[name[-6]](name, x)
            if flush and bank_kind != "alone":
                bank.flush()
        got = {}
        for b in banks.values():
            got.update(b.finalize_all(Comm())[0])
    return got


CONFIGS = [("ifmr", 0), ("ifmr", 1), ("hfmg", 0), ("hfmg", 1)]


@pytest.mark.parametrize("algo,gran", CONFIGS)
@pytest.mark.parametrize("flush", [True, False], ids=["one-batch", "batches-staged"])
def test_grouped_updates_give_each_entry_its_own_factors(algo, gran, flush):
    """Fed after every forward, or with every batch staged until the solve."""
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    data = batches(3, 3)
    alone = factors("alone", params, data)
    grouped = factors("grouped", params, data, flush=flush)
    assert sorted(alone) == sorted(grouped) == sorted(names(3))
    for name in alone:
        assert grouped[name] == alone[name], name


@pytest.mark.skipif(not fused.AVAILABLE, reason="Triton is not installed")
@pytest.mark.parametrize("algo,gran", CONFIGS)
def test_the_fused_kernels_give_the_factors_of_the_torch_operations(algo, gran):
    """The driver's grouped, staged updates with the fused count and grid move (Triton's
    interpreter on CPU: the source a GPU compiles) against the torch operations: HFMG's
    integer counts exactly; IFMR's float64 offset sums may be added in another order."""
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    data = batches(3, 3)
    with fused.fused_path(False):
        plain = factors("grouped", params, data, flush=False)
    with fused.fused_path():
        fast = factors("grouped", params, data, flush=False)
    for name in plain:
        assert fast[name][1] == plain[name][1], name
        if algo == "hfmg":
            assert fast[name][0] == plain[name][0], name
        else:
            torch.testing.assert_close(torch.tensor(fast[name][0]), torch.tensor(plain[name][0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("algo,gran", [("ifmr", 1), ("hfmg", 0)])
def test_an_entry_split_across_groups_is_merged(algo, gran):
    """A staging limit that flushes in the middle of a forward (and no flush between
    forwards) puts an entry into several groups; merged, its factors are those it has alone."""
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    data = batches(3, 4)
    data[-1] = {n: x[:20] for n, x in data[-1].items()}  # a shorter last batch: other groups
    alone = factors("alone", params, data)
    split = factors("grouped", params, data, stage_bytes=2 * 48 * 8 * 4 + 1, flush=False)
    for name in alone:
        assert split[name][1] == alone[name][1], name  # offsets
        torch.testing.assert_close(torch.tensor(split[name][0]), torch.tensor(alone[name][0]),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("algo,gran", CONFIGS)
def test_a_batch_costs_the_same_operations_for_4_and_12_entries(algo, gran):
    """One forward's entries and the flush after it: no host sync, and the kernels run are
    those of one update whatever the number of entries (handing an entry over makes views only)."""
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    counts = {}
    for layers in (2, 6):
        bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                      tokens=3 * 48, defer_checks=True)
        logs = []
        with kernels.torch_path():
            for batch in batches(layers, 3):
                with OpLog() as log:
                    for name, x in batch.items():
                        bank(name, x)
                    bank.flush()
                logs.append(log)
            bank.finalize_all(Comm())
        for log in logs:
            assert log.ops and log.syncs == [], log.syncs
        counts[layers] = [len(log.kernels) for log in logs]
    assert counts[2][1:] == counts[6][1:], counts


def test_grouped_nan_names_the_first_bad_layer_and_batch_in_feeding_order():
    """Key and value entries are flagged by different banks; the first in feeding order wins."""
    from amct_hf.errors import CalibrationInputError
    params = parse_quant_algo_params({"act_algo": "hfmg", "quant_granularity": 0})
    bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                  defer_checks=True)
    with kernels.torch_path():
        for b, batch in enumerate(batches(2, 3)):
            for name, x in batch.items():
                if b == 1 and name.endswith("0.self_attn.v_proj"):
                    x[0, 0] = float("inf")
                if b == 1 and name.endswith("1.self_attn.k_proj"):
                    x[0, 0] = float("nan")  # fed later in the same forward
                if b == 2 and name.endswith("0.self_attn.k_proj"):
                    x[1, 1] = float("nan")
                bank(name, x)
            bank.flush()
        with pytest.raises(CalibrationInputError, match=r"layers.0.self_attn.v_proj', batch 2: .*Inf"):
            bank.check_pending()


def _llama(layers):
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("algo,gran", [("ifmr", 0), ("hfmg", 1)])
def test_calibration_adds_the_same_kernels_and_no_host_read_for_2_and_6_layers(algo, gran):
    """The driver's path (attention hooks, then the bank) over whole forwards, torch path
    forced on CPU: beyond the model's own forward, calibration adds no host read and a
    number of kernels that does not depend on the number of layers."""
    from amct_hf.modeling.attention import KVCalibrationHooks, KVStatesComplete
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    extra = {}
    for layers in (2, 6):
        model = _llama(layers)
        bank = KVBank({"key": params, "value": params}, "streaming", {"key": "channel", "value": "channel"},
                      head_dim=16, tokens=4 * 32, defer_checks=True)
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, 96, (1, 32), generator=g) for _ in range(4)]
        with torch.no_grad():
            with OpLog() as plain:
                for i in ids:
                    model(input_ids=i, use_cache=False, logits_to_keep=1)
            with kernels.torch_path(), KVCalibrationHooks(model, bank, stop_when_complete=True), OpLog() as log:
                for i in ids:
                    try:
                        model(input_ids=i, use_cache=False, logits_to_keep=1)
                    except KVStatesComplete:
                        pass
                bank.flush()
            bank.check_pending()  # the run's one read of the flags, after the last batch
        assert len(log.syncs) == len(plain.syncs), (log.syncs, plain.syncs)  # the model's own reads only
        extra[layers] = len(log.kernels) - len(plain.kernels)
    assert extra[2] == extra[6] > 0, extra


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("algo,gran", CONFIGS)
def test_cuda_grouped_updates_give_each_entry_its_own_factors(algo, gran):
    """On the device: the groups' tables live there too, and each entry gets its own factors
    (HFMG's integer counts exactly; IFMR's float64 offset sums are added by atomics in any
    order there, so its scales may move in the last bits)."""
    params = parse_quant_algo_params({"act_algo": algo, "quant_granularity": gran})
    data = batches(3, 3)
    alone = factors("alone", params, data, device="cuda")
    grouped = factors("grouped", params, data, flush=False, device="cuda")
    for name in alone:
        if algo == "hfmg":
            assert grouped[name] == alone[name], name
        else:
            assert grouped[name][1] == alone[name][1], name
            torch.testing.assert_close(torch.tensor(grouped[name][0]), torch.tensor(alone[name][0]),
                                       rtol=1e-6, atol=0)
