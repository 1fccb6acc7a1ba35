"""The torch path's float32 bin index equals the float64 one (and the kernels') everywhere
the grid is used: tiny, subnormal, negative and large values, every level."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_hf.algorithms.aligned import MIN_LEVEL, _floor_index, _floor_index32, _pow2_float32

FLOATS = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(xs=st.lists(FLOATS, min_size=1, max_size=64), level=st.integers(MIN_LEVEL, 126))
def test_float32_index_equals_float64_index(xs, level):
    x = torch.tensor(xs, dtype=torch.float32)
    lv = torch.full_like(x, level, dtype=torch.int64)
    ref = _floor_index(x, lv)
    fits = (x.double() * 2.0 ** -level).abs() < 2.0 ** 62  # an index that fits int64
    assert torch.equal(_floor_index32(x, lv)[fits], ref[fits])


def test_edge_cases():
    tiny = torch.tensor([-1e-45, 1e-45, -0.0, 0.0, -1e-38, 3e38, -3e38, -1.0, 1.0], dtype=torch.float32)
    for level in (MIN_LEVEL, -1, 0, 5, 100, 126):
        lv = torch.full_like(tiny, level, dtype=torch.int64)
        fits = (tiny.double() * 2.0 ** -level).abs() < 2.0 ** 62
        assert torch.equal(_floor_index32(tiny, lv)[fits], _floor_index(tiny, lv)[fits]), level


def test_pow2_is_exact():
    e = torch.arange(-126, 128)
    assert torch.equal(_pow2_float32(e).double(), torch.ldexp(torch.ones(e.shape, dtype=torch.float64), e.double()))


@settings(max_examples=100, deadline=None)
@given(xs=st.lists(FLOATS, min_size=1, max_size=64), level=st.integers(MIN_LEVEL, 126))
def test_half_precision_values_are_indexed_as_their_float32_values(xs, level):
    """The torch path indexes bfloat16/float16 batches without converting them first."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.tensor(xs, dtype=torch.float32).to(dtype)
        lv = torch.full(x.shape, level, dtype=torch.int64)
        finite = torch.isfinite(x)
        ref = _floor_index(x.float()[finite], lv[finite])
        fits = (x.float()[finite].double() * 2.0 ** -level).abs() < 2.0 ** 62
        assert torch.equal(_floor_index32(x[finite], lv[finite])[fits], ref[fits])
