"""The torch path's float32 bin index equals the float64 one (and the kernels') everywhere
the grid is used: tiny, subnormal, negative and large values, every level."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amct_hf.algorithms.aligned import MIN_LEVEL, _bins_on_grid, _floor_index, _floor_quotient, _pow2_float32, fit_level


def _floor_index32(x, level):
    return _floor_quotient(x, level).to(torch.int64)

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


@settings(max_examples=300, deadline=None)
@given(ends=st.lists(FLOATS, min_size=2, max_size=2), fractions=st.lists(st.floats(0, 1), min_size=1, max_size=64),
       bins=st.sampled_from([64, 2048, 65536]))
def test_bin_on_the_grid_equals_the_int64_one(ends, fractions, bins):
    """The torch path's bin, computed in float32 relative to the origin, equals the float64
    index minus the origin for every value of the range, near zero or far from it."""
    lo, hi = sorted(torch.tensor(ends, dtype=torch.float32).tolist())
    span = torch.tensor(hi, dtype=torch.float64) - lo
    x = (lo + span * torch.tensor(fractions, dtype=torch.float64)).to(torch.float32).clamp(lo, hi)
    x = torch.cat([x, torch.tensor([lo, hi])])[:, None]
    level = fit_level(torch.tensor([lo]), torch.tensor([hi]), bins)
    origin = _floor_index(torch.tensor([lo]), level)
    if max(abs(lo), abs(hi)) * 2.0 ** -level.item() >= 2 ** 62:
        return  # an index that does not fit int64 (a constant channel beyond 2**30 at level -32)
    ref = _floor_index(x, level[None, :]) - origin
    _, rel = _bins_on_grid(x, level, origin, bins)
    assert torch.equal(rel, ref)


def test_a_nan_lands_inside_the_table():
    x = torch.tensor([[float("nan")], [float("inf")], [-float("inf")], [1.0]])
    level, origin = torch.tensor([-4]), torch.tensor([0])
    _, rel = _bins_on_grid(x, level, origin, 64)
    assert rel.min() >= 0 and rel.max() <= 63 and rel[3, 0] == 16
