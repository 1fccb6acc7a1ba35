import pytest

from amct_hf import QuantCalibrationOp, QuantParamsError, parse_quant_algo_params

SEED_EXAMPLE = {"act_algo": "hfmg", "num_bits": 8, "quant_granularity": "1", "with_offset": True,
                "batch_num": 1}


def test_seed_example_is_accepted():
    p = parse_quant_algo_params(SEED_EXAMPLE)
    assert (p.act_algo, p.per_channel, p.asymmetric, p.batch_num, p.num_of_bins) == \
        ("hfmg", True, True, 1, 4096)


def test_defaults():
    p = parse_quant_algo_params(None)
    assert (p.act_algo, p.asymmetric, p.per_channel, p.batch_num) == ("ifmr", True, False, 1)
    assert (p.max_percentile, p.min_percentile, p.search_range, p.search_step) == \
        (0.999999, 0.999999, (0.7, 1.3), 0.01)


@pytest.mark.parametrize("value,per_channel", [
    (0, False), ("0", False), ("per_tensor", False), (1, True), ("1", True), ("per_channel", True)])
def test_granularity_spellings(value, per_channel):
    assert parse_quant_algo_params({"quant_granularity": value}).per_channel is per_channel


@pytest.mark.parametrize("params,asym", [
    ({"with_offset": False}, False), ({"asymmetric": False}, False),
    ({"with_offset": False, "asymmetric": True}, True), ({"with_offset": True, "asymmetric": False}, False)])
def test_asymmetric_wins_over_with_offset(params, asym):
    assert parse_quant_algo_params(params).asymmetric is asym


# (params, field named in the message, a fragment of what is allowed)
BAD = [
    ({"act_algo": "kl"}, "act_algo", "'ifmr', 'hfmg'"),
    ({"act_algo": 1}, "act_algo", "'ifmr', 'hfmg'"),
    ({"num_bits": 4}, "num_bits", "8"),
    ({"num_bits": 8.0}, "num_bits", "8"),
    ({"num_bits": True}, "num_bits", "8"),
    ({"with_offset": 1}, "with_offset", "bool"),
    ({"with_offset": "true"}, "with_offset", "bool"),
    ({"asymmetric": 0}, "asymmetric", "bool"),
    ({"quant_granularity": 2}, "quant_granularity", "per_channel"),
    ({"quant_granularity": True}, "quant_granularity", "per_channel"),
    ({"quant_granularity": "channel"}, "quant_granularity", "per_channel"),
    ({"batch_num": 0}, "batch_num", "> 0"),
    ({"batch_num": -3}, "batch_num", "> 0"),
    ({"batch_num": 2.0}, "batch_num", "int"),
    ({"batch_num": True}, "batch_num", "int"),
    ({"max_percentile": 0.5}, "max_percentile", "(0.5, 1]"),
    ({"max_percentile": 1.01}, "max_percentile", "(0.5, 1]"),
    ({"max_percentile": "0.99"}, "max_percentile", "(0.5, 1]"),
    ({"min_percentile": 0.2}, "min_percentile", "(0.5, 1]"),
    ({"min_percentile": True}, "min_percentile", "(0.5, 1]"),
    ({"search_range": [1.3, 0.7]}, "search_range", "0 < start < end"),
    ({"search_range": [0, 1.3]}, "search_range", "0 < start < end"),
    ({"search_range": [0.7]}, "search_range", "0 < start < end"),
    ({"search_range": "0.7,1.3"}, "search_range", "0 < start < end"),
    ({"search_step": 0}, "search_step", "(0,"),
    ({"search_step": 0.7}, "search_step", "(0,"),
    ({"search_step": "0.01"}, "search_step", "(0,"),
    ({"act_algo": "hfmg", "num_of_bins": 1000}, "num_of_bins", "1024, 2048, 4096, 8192"),
    ({"act_algo": "hfmg", "num_of_bins": 4096.0}, "num_of_bins", "1024, 2048, 4096, 8192"),
    ({"act_algo": "hfmg", "num_of_bins": True}, "num_of_bins", "1024, 2048, 4096, 8192"),
    # a field of the other algorithm
    ({"num_of_bins": 4096}, "num_of_bins", "act_algo is 'ifmr'"),
    ({"act_algo": "hfmg", "search_step": 0.01}, "search_step", "act_algo is 'hfmg'"),
    ({"act_algo": "hfmg", "max_percentile": 0.99}, "max_percentile", "act_algo is 'hfmg'"),
    # unknown field
    ({"bins": 10}, "bins", "fields allowed"),
    ({"act_algo": "hfmg", "granularity": 1}, "granularity", "fields allowed"),
]


@pytest.mark.parametrize("params,field,allowed", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_params_name_field_value_and_allowed(params, field, allowed, tmp_path):
    record = tmp_path / "kv.txt"
    with pytest.raises(QuantParamsError) as info:
        QuantCalibrationOp(str(record), quant_algo_params=params)
    msg = str(info.value)
    assert repr(field) in msg
    assert repr(params[field]) in msg
    assert allowed in msg
    assert not record.exists()


def test_bad_params_leave_existing_record_untouched(tmp_path):
    record = tmp_path / "kv.txt"
    record.write_text('record {\n  key: "a"\n  kv_cache_value {\n    scale: 0.5\n    offset: 1\n  }\n}\n')
    before = record.read_bytes()
    with pytest.raises(QuantParamsError):
        QuantCalibrationOp(str(record), quant_algo_params={"batch_num": 0})
    assert record.read_bytes() == before


def test_bad_quant_method(tmp_path):
    with pytest.raises(ValueError, match="kv_cache_quant"):
        QuantCalibrationOp(str(tmp_path / "kv.txt"), quant_method="weight_quant")
    assert not (tmp_path / "kv.txt").exists()


def test_a_quant_params_object_is_validated_like_its_dict():
    from amct_hf.settings.quant_params import QuantParams
    with pytest.raises(QuantParamsError, match="num_bits"):
        parse_quant_algo_params(QuantParams(num_bits=4))
    with pytest.raises(QuantParamsError, match="num_bits"):
        QuantCalibrationOp("kv.txt", QuantParams(num_bits=4))
    ok = QuantParams(act_algo="hfmg", per_channel=True, num_of_bins=2048)
    assert parse_quant_algo_params(ok) == ok


@pytest.mark.parametrize("params, field", [
    ({"search_step": 1e-9}, "search_step"),
    ({"quant_granularity": 1, "search_range": [0.5, 1e6]}, "search_range"),
])
def test_ifmr_candidate_count_is_bounded_at_construction(params, field, tmp_path):
    from amct_hf.settings.quant_params import MAX_IFMR_CANDIDATES
    with pytest.raises(QuantParamsError, match=rf"\['{field}'\].*at most {MAX_IFMR_CANDIDATES} candidate"):
        QuantCalibrationOp(str(tmp_path / "kv.txt"), params)
    assert not list(tmp_path.iterdir())
    # the largest allowed count still builds
    QuantCalibrationOp(str(tmp_path / "kv.txt"), {"search_range": [0.5, 1.5],
                                                  "search_step": 1.0 / (MAX_IFMR_CANDIDATES - 1)})
