"""Every golden case computed with the original AMCT implementation (tests/fixtures/golden,
copied from ../shared/golden) goes through a fresh QuantCalibrationOp and record file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amct_hf import QuantCalibrationOp, read_kv_factors

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())["cases"]
INPUTS = np.load(GOLDEN / "inputs.npz")


def _batches(case):
    out = []
    for b in case["batches"]:
        t = torch.from_numpy(INPUTS[b["key"]])
        dtype = case.get("torch_dtype") or b.get("dtype")
        out.append(t.to(getattr(torch, dtype)))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case(case, tmp_path):
    record = tmp_path / "kv_cache.txt"
    exp = case["expected"]
    if exp["status"] == "error" and exp["stage"] == "init":
        with pytest.raises(Exception) as info:
            QuantCalibrationOp(str(record), quant_algo_params=case["params"])
        for word in exp.get("message_mentions", []):
            assert word in str(info.value)
        assert not record.exists()
        return
    op = QuantCalibrationOp(str(record), quant_algo_params=case["params"])
    batches = _batches(case)
    if exp["status"] == "error":
        with pytest.raises(Exception) as info:
            for b in batches:
                op(case["layer_name"], b)
        assert case["layer_name"] in str(info.value)
        assert read_kv_factors(record) == {}
        return
    for b in batches:
        assert op(case["layer_name"], b) is b
    got = read_kv_factors(record)
    if exp["status"] == "no_record":
        assert got == {}
        return
    scales, offsets = got[case["layer_name"]]
    expected = np.array(exp["scales"], dtype=np.float64)
    rel = np.abs(np.array(scales, dtype=np.float64) - expected) / np.abs(expected)
    assert rel.max() <= 1e-5, (scales[:4], exp["scales"][:4])
    assert offsets == exp["offsets"]


def test_golden_record_text_matches_scales_text(tmp_path):
    """The record carries the float32 scales AMCT wrote, digit for digit."""
    case = next(c for c in CASES if c["name"] == "dev_ifmr_perchannel_kv_4d")
    record = tmp_path / "kv.txt"
    op = QuantCalibrationOp(str(record), case["params"])
    for b in _batches(case):
        op(case["layer_name"], b)
    text = record.read_text()
    for s in case["expected"]["scales_text"]:
        assert f"scale: {s}\n" in text
