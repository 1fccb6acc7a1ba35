import os
import warnings

import pytest
import torch
from torch import nn

from amct_hf import CalibrationInputError, QuantCalibrationOp, RecordOverwriteWarning, read_kv_factors


def test_seed_document_example_runs_with_only_the_import_changed(tmp_path, monkeypatch):
    # the seed document's example, verbatim apart from its import line
    monkeypatch.chdir(tmp_path)
    from amct_hf import QuantCalibrationOp  # noqa: F811  (the changed import line)

    class LinearNet(nn.Module):
        def __init__(self, quant_algo_params):
            super().__init__()
            self.quant_algo_params = quant_algo_params
            self.layer1 = nn.Linear(28, 1024, bias=False)
            self.ptq_1 = QuantCalibrationOp(record_file, quant_algo_params=self.quant_algo_params,
                                            quant_method="kv_cache_quant")

        def forward(self, layer_name, x):
            x = self.layer1(x)
            x = self.ptq_1(layer_name, x)

    temp_folder = "./"
    record_file = os.path.join(temp_folder, 'kv_cache.txt')
    input_data = torch.randn((2, 2, 28, 28))
    quant_algo_params = {"act_algo": "hfmg"}
    model = LinearNet(quant_algo_params).to(torch.device("cpu"))
    model.eval()
    model("qat_1", input_data)

    got = read_kv_factors(tmp_path / "kv_cache.txt")
    assert list(got) == ["qat_1"]
    scales, offsets = got["qat_1"]
    assert len(scales) == len(offsets) == 1 and scales[0] > 0 and -128 <= offsets[0] <= 127


def test_forward_returns_input_object_and_does_not_modify_it(tmp_path):
    op = QuantCalibrationOp(str(tmp_path / "kv.txt"))
    x = torch.randn(4, 16)
    copy = x.clone()
    assert op("a", x) is x
    assert torch.equal(x, copy)


def test_one_op_writes_every_layer_name(tmp_path):
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record), {"quant_granularity": 1})
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "kv"]
    for i, name in enumerate(names):
        op(name, torch.randn(2, 8, 4 + i % 2))
    got = read_kv_factors(record)
    assert list(got) == names
    assert [len(got[n][0]) for n in names] == [4, 5] * 3


def test_batch_num_accumulates_then_finalises_and_ignores_later_batches(tmp_path):
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record), {"batch_num": 3})
    x = [torch.randn(32, 8) * (i + 1) for i in range(4)]
    op("l", x[0])
    op("l", x[1])
    assert read_kv_factors(record) == {}
    op("l", x[2])
    first = read_kv_factors(record)["l"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rewrite, so no overwrite warning
        op("l", x[3] * 100)
    assert read_kv_factors(record)["l"] == first
    # the same three batches as one batch give the same IFMR factors
    one = QuantCalibrationOp(str(tmp_path / "one.txt"))
    one("l", torch.cat(x[:3]))
    assert read_kv_factors(tmp_path / "one.txt")["l"] == first


@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
@pytest.mark.parametrize("gran", [0, 1])
def test_half_and_bfloat16_equal_float32_of_same_values(tmp_path, algo, gran):
    torch.manual_seed(0)
    x = (torch.randn(64, 16) * 3 + 1).to(torch.bfloat16)  # values exact in fp32, fp16 and bf16
    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        op = QuantCalibrationOp(str(tmp_path / f"{dtype}.txt"),
                                {"act_algo": algo, "quant_granularity": gran})
        op("l", x.to(dtype))
        results.append(op.factors["l"])
    assert torch.equal(x.to(torch.float16).float(), x.float())
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_names_layer_and_records_nothing(tmp_path, bad):
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record))
    op("good", torch.randn(8, 8))
    before = record.read_bytes()
    x = torch.randn(8, 8)
    x[3, 4] = bad
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(CalibrationInputError, match=f"'model.layers.7.self_attn.v_proj', batch 1: .*{kind}"):
        op("model.layers.7.self_attn.v_proj", x)
    assert record.read_bytes() == before
    assert op.calls("model.layers.7.self_attn.v_proj") == 0


def test_channel_count_change_is_a_clear_error(tmp_path):
    op = QuantCalibrationOp(str(tmp_path / "kv.txt"), {"quant_granularity": 1, "batch_num": 2})
    op("k", torch.randn(4, 8))
    with pytest.raises(CalibrationInputError, match=r"'k'.*6 channels.*earlier batches had 8"):
        op("k", torch.randn(4, 6))


@pytest.mark.parametrize("x", [torch.zeros(3, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.float64),
                               torch.zeros(0, 4), torch.tensor(1.0)])
def test_unsupported_inputs(tmp_path, x):
    op = QuantCalibrationOp(str(tmp_path / "kv.txt"))
    with pytest.raises(CalibrationInputError, match="'l'"):
        op("l", x)


def test_constructor_keeps_existing_record_and_overwrite_warns(tmp_path):
    record = tmp_path / "kv.txt"
    QuantCalibrationOp(str(record))("a", torch.randn(16, 4))
    QuantCalibrationOp(str(record))("b", torch.randn(16, 4))
    assert set(read_kv_factors(record)) == {"a", "b"}
    op = QuantCalibrationOp(str(record))
    with pytest.warns(RecordOverwriteWarning, match="'a'"):
        op("a", torch.randn(16, 4) * 10)
    assert set(read_kv_factors(record)) == {"a", "b"}


def test_unparsable_record_is_refused_at_construction(tmp_path):
    from amct_hf import RecordFileError
    record = tmp_path / "kv.txt"
    record.write_text("this is { not a record")
    with pytest.raises(RecordFileError):
        QuantCalibrationOp(str(record))
    assert record.read_text() == "this is { not a record"


def test_bad_record_paths(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        QuantCalibrationOp(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        QuantCalibrationOp(str(tmp_path / "missing" / "kv.txt"))
    with pytest.raises(ValueError, match="layer_name"):
        QuantCalibrationOp(str(tmp_path / "kv.txt"))("", torch.randn(2, 2))


def test_hfmg_range_too_wide_for_float32_binning_is_refused(tmp_path):
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record), {"act_algo": "hfmg"})
    x = torch.randn(64, 8) * 1e35
    with pytest.raises(CalibrationInputError, match="'l'.*too wide for HFMG"):
        op("l", x)
    assert not record.exists()


def test_a_failed_solve_leaves_the_layer_calibratable(tmp_path):
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record), {"act_algo": "ifmr"})
    huge = torch.tensor([[3.3e38], [-3.3e38], [1.0]])  # IFMR's 1.3x candidates overflow float32
    with pytest.raises(CalibrationInputError, match="'l': the algorithm produced unusable factors"):
        op("l", huge)
    assert "l" not in op.factors and op.calls("l") == 0 and not record.exists()
    op("l", torch.randn(100, 4))
    assert op.calls("l") == 1 and read_kv_factors(record)["l"] == op.factors["l"]


@pytest.mark.parametrize("make, problem", [
    (lambda: torch.randn(4, 4).to_sparse(), "sparse"),
    (lambda: torch.empty(4, 4, device="meta"), "meta device"),
])
def test_sparse_and_meta_tensors_name_the_layer(tmp_path, make, problem):
    op = QuantCalibrationOp(str(tmp_path / "kv.txt"))
    with pytest.raises(CalibrationInputError, match=f"'l', batch 1: .*{problem}"):
        op("l", make())
