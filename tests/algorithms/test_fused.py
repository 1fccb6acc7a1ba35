"""The fused (Triton) kernels of the aligned histogram against its torch operations.

On CPU tensors the kernels run in Triton's interpreter: the same source a GPU compiles, so
the arithmetic checked here is the device's. Counts and grids must be equal; the float64
offset sums may differ in the last bits only (addition order)."""
import pytest
import torch

from amct_hf.algorithms import fused, kernels
from amct_hf.algorithms.aligned import AlignedHistogram
from tests.observers.test_device_path import OpLog

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="Triton is not installed")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stream(channels, dtype, seed, batches=4, tokens=300):
    """Batches of growing spread, with the values a bin index gets wrong first: exact bin
    edges (powers of two and their multiples), signed zeros, values whose quotient
    underflows, and a wide dynamic range."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        x = torch.randn(tokens, channels, generator=g) * torch.rand(channels, generator=g) * 4.0 ** b
        x[:8] = torch.tensor([0.0, -0.0, 2.0 ** -20, -(2.0 ** -20), 0.5, -0.5, 3 * 2.0 ** (b - 3), -1.0])[:, None]
        x[9] = -1e-40  # subnormal in float32 and bfloat16 (zero in float16): a flush to zero must not move it
        if dtype == torch.float32:
            x[8] = -1e-38  # far below the finest bin: its quotient may underflow
        out.append(x.to(dtype))
    return out


def _fill(stream, channels, bins, with_offsets, use_fused, device, narrow=False):
    with kernels.torch_path(), fused.fused_path(use_fused):
        h = AlignedHistogram.empty(channels, bins, torch.device(device), with_offsets, narrow=narrow)
        for x in stream:
            x = x.to(device)
            lo, hi = torch.aminmax(x.float(), dim=0)
            h.regrid(torch.minimum(h.lo, lo), torch.maximum(h.hi, hi))
            h.add_on_grid(x)
    return h


def _assert_same(a: AlignedHistogram, b: AlignedHistogram):
    assert torch.equal(a.level, b.level) and torch.equal(a.origin, b.origin)
    assert torch.equal(a.counts.long(), b.counts.long())
    assert a.offsets.shape == b.offsets.shape
    torch.testing.assert_close(a.offsets, b.offsets, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels,bins,with_offsets", [(1, 65536, True), (37, 2048, True), (70, 2048, False),
                                                        (5, 64, True)])
def test_fused_count_and_move_equal_the_torch_operations(device, dtype, channels, bins, with_offsets):
    """int64 tables, and the int32 ones the observers keep while no row can overflow them."""
    for seed in range(2):
        stream = _stream(channels, dtype, seed)
        eager = _fill(stream, channels, bins, with_offsets, False, device)
        assert eager.counts.sum() == sum(x.numel() for x in stream)
        for narrow in (False, True):
            fast = _fill(stream, channels, bins, with_offsets, True, device, narrow=narrow)
            assert fast.counts.dtype == (torch.int32 if narrow else torch.int64)
            _assert_same(eager, fast)


@pytest.mark.parametrize("device", DEVICES)
def test_a_strided_batch_is_read_where_it_lies(device):
    """The grouped batches are views (a transposed or sliced staging buffer): the kernel
    follows the strides instead of assuming a contiguous [N, C]."""
    x = _stream(24, torch.bfloat16, 3, batches=1)[0].to(device)
    view = x.t().contiguous().t()[::2]  # column-major, every other row
    assert not view.is_contiguous()
    _assert_same(_fill([view.contiguous()], 24, 2048, True, False, device),
                 _fill([view], 24, 2048, True, True, device))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_infinities_land_in_an_end_bin(device):
    """Only data the NaN/Inf check rejects holds these; they must still land inside the table
    (an index outside it would abort a GPU kernel), in an end bin, whichever path counts."""
    grid = torch.tensor([-1.0, 0.5, 2.0], device=device)
    bad = torch.tensor([[float("nan"), float("inf"), float("-inf")]] * 2, device=device)
    for use_fused in (False, True):
        with kernels.torch_path(), fused.fused_path(use_fused):
            h = AlignedHistogram.empty(3, 64, torch.device(device))
            h.regrid(grid, grid + 1)
            h.add_on_grid(bad)
        counts = h.counts.cpu()
        assert torch.equal(counts[:, 0] + counts[:, -1], torch.full((3,), 2)), (use_fused, counts.nonzero())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_offsets", [True, False])
def test_moving_some_rows_leaves_the_others_and_equals_the_torch_move(device, with_offsets):
    """Rows whose range grows on one side, on both, by a little (same level, new origin) or by
    a lot (several levels coarser), next to rows whose grid stays."""
    channels, bins = 12, 256
    g = torch.Generator().manual_seed(7)
    first = torch.randn(500, channels, generator=g)
    grow = torch.tensor([0, 0, 1.1, -1.1, 3, -3, 40, -40, 1e3, 0, 0, 5.0])
    second = first[:3] + grow  # only the non-zero columns leave their grid
    kept = [c for c in range(channels) if grow[c] == 0]
    hists = [_fill([first], channels, bins, with_offsets, use_fused, device) for use_fused in (False, True)]
    grid = hists[1].level.clone(), hists[1].origin.clone()
    before = hists[1].counts.clone()
    for use_fused, h in zip((False, True), hists):
        with kernels.torch_path(), fused.fused_path(use_fused):
            lo, hi = torch.aminmax(second.to(device), dim=0)
            h.regrid(torch.minimum(h.lo, lo), torch.maximum(h.hi, hi))
            h.add_on_grid(second.to(device))
    _assert_same(*hists)
    level, origin = hists[1].level, hists[1].origin
    coarser, shifted = level != grid[0], (level == grid[0]) & (origin != grid[1])
    assert coarser.sum() >= 3 and shifted.sum() >= 1  # both kinds of move happened
    assert torch.equal(level[kept], grid[0][kept]) and torch.equal(origin[kept], grid[1][kept])
    added = hists[1].counts[kept] - before[kept]  # a kept row only gained the three new values
    assert (added >= 0).all() and torch.equal(added.sum(1), torch.full((len(kept),), 3, device=added.device))


def test_a_fused_update_is_two_operations_without_a_host_read():
    """Grid move and count are one operation each, with the same operations for 64 and 1024
    channels; nothing reads a value back (which rows move is decided on the device)."""
    logs = []
    for channels in (64, 1024):
        stream = _stream(channels, torch.bfloat16, 1, batches=2, tokens=64)
        with kernels.torch_path(), fused.fused_path():
            h = AlignedHistogram.empty(channels, 2048)
            h.regrid(*torch.aminmax(stream[0].float(), dim=0))
            with OpLog() as log:
                lo, hi = torch.aminmax(stream[1], dim=0)
                h.regrid(torch.minimum(h.lo, lo), torch.maximum(h.hi, hi))
                h.add_on_grid(stream[1])
        assert log.syncs == []
        assert log.kernels.count("count_on_grid") == 1 and log.kernels.count("move_rows") == 1
        assert "scatter_add_" not in log.kernels and "floor_divide" not in log.kernels
        logs.append(log.ops)
    assert logs[0] == logs[1]


def test_wide_rows_keep_the_torch_move_and_the_meta_device_counts_without_running():
    """Per-tensor tables (65536 bins) move with the torch operations; on the ``meta`` device the
    fused operations run their shape-only form (what benchmarks/device_cost.py counts)."""
    with kernels.torch_path(), fused.fused_path(), OpLog() as log:
        h = AlignedHistogram.empty(4, 65536, torch.device("meta"))
        x = torch.empty(1000, 4, dtype=torch.bfloat16, device="meta")
        h.regrid(torch.full((4,), -1.0, device="meta"), torch.ones(4, device="meta"))
        h.add_on_grid(x)
    assert "move_rows" not in log.kernels and "scatter_add_" in log.kernels
    assert log.kernels.count("count_on_grid") == 1


def test_the_fused_path_serves_cuda_only_unless_asked():
    assert not fused.use_fused(torch.empty(1))
    with fused.fused_path():
        assert fused.use_fused(torch.empty(1))
        with fused.fused_path(False):
            assert not fused.use_fused(torch.empty(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fine_bins,bins", [(2048, 4096), (65536, 4096), (64, 100), (2048, 7)])
def test_fused_resample_is_the_compiled_kernels_bit_for_bit(device, fine_bins, bins):
    """HFMG's histogram on its own bins, from the fine one: rows of several scales and
    offsets, one constant (its middle bin takes everything), one with a single value."""
    g = torch.Generator().manual_seed(fine_bins + bins)
    x = torch.randn(3000, 6, generator=g) * torch.tensor([1, 10, 1e-3, 1, 5, 0.0]) + torch.tensor([0, 3, 0, -2, 0, 1.5])
    x[1:, 3] = x[0, 3]
    results = {}
    for mode in ("cpu kernels", "torch", "fused"):
        with kernels.torch_path(mode != "cpu kernels"), fused.fused_path(mode == "fused"):
            h = AlignedHistogram.empty(6, fine_bins, torch.device(device if mode != "cpu kernels" else "cpu"))
            h.update(x.to(device) if mode != "cpu kernels" else x)
            results[mode] = h.resample(bins).cpu()
    if kernels.AVAILABLE:
        assert torch.equal(results["fused"], results["cpu kernels"])
    assert torch.equal(results["fused"], results["torch"])
    torch.testing.assert_close(results["fused"].sum(1), torch.full((6,), 3000.0, dtype=torch.float64))
    assert results["fused"][5, bins // 2] == 3000 and results["fused"][3, bins // 2] == 3000


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("asymmetric", [True, False])
def test_fused_ifmr_losses_are_the_compiled_kernels(device, asymmetric):
    """Every candidate's loss on the streaming histogram (to rounding: the buckets are summed
    as a tree), the tolerance's count of crossed bins exactly, and the same candidate chosen;
    rows of different scales, a clipped range and one whose range holds a single bin."""
    from amct_hf.algorithms.ifmr import first_min, ifmr_candidates
    g = torch.Generator().manual_seed(int(asymmetric))
    x = torch.randn(3000, 3, generator=g) * torch.tensor([1.0, 7.0, 1e-3]) + torch.tensor([0.0, 2.0, 0.0])
    with kernels.torch_path(False):
        h = AlignedHistogram.empty(3, 2048)
        h.update(x)
    top = torch.quantile(x, 0.99, dim=0).clamp(min=0)  # a clipped upper end
    hi, lo, scales = ifmr_candidates(top, x.min(0).values.clamp(max=0), asymmetric, (0.7, 1.3), 0.01)
    points = h.means()
    inverse = torch.ldexp(torch.ones(3, dtype=torch.float64), -h.level.double())
    with fused.fused_path():
        losses, sum_sq, crossed = (t.cpu() for t in fused.ifmr_losses(
            *(t.to(device) for t in (points, h.counts, hi, lo, scales, inverse, h.origin))))
    if not kernels.AVAILABLE:
        pytest.skip("the compiled CPU kernels are the reference")
    ref, ref_sq, ref_tol = (torch.from_numpy(a) for a in kernels.ifmr_losses(
        points.numpy(), hi.numpy(), lo.numpy(), scales.numpy(), h.counts.numpy(), (h.level.numpy(), h.origin.numpy())))
    torch.testing.assert_close(losses, ref, rtol=1e-12, atol=1e-12 * float(ref_sq.max()))
    torch.testing.assert_close(sum_sq, ref_sq, rtol=1e-13, atol=0)
    assert torch.equal((2.0 * (2.0 * scales.double() * h.width[:, None] * crossed)).max(1).values, ref_tol)
    assert torch.equal(first_min(losses, sum_sq), first_min(ref, ref_sq))


def test_the_fused_solve_step_is_one_operation():
    with kernels.torch_path(), fused.fused_path(), OpLog() as log:
        h = AlignedHistogram.empty(4, 2048, torch.device("meta"))
        h.resample(4096)
    assert log.kernels.count("cumulative_at_edges") == 1 and "gather" not in log.kernels


def _compile(kernel, signature, constexprs, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    source = ASTSource(fn=fused._COMPILED[kernel], constexprs=constexprs,
                       signature={**signature, **dict.fromkeys(constexprs, "constexpr")})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=fused._OPTIONS)


@pytest.mark.parametrize("capability", [80, 90])
def test_the_kernels_compile_for_a_gpu_with_64_bit_relaxed_atomics(capability):
    """Triton's compiler and ptxas run without a GPU: the source the interpreter checks also
    builds for Ampere and Hopper, adding counts and offsets with 64-bit relaxed reductions
    (no fence per value) and moving a row behind one barrier."""
    narrow = _compile(fused._count_kernel, {
        "x_ptr": "*bf16", "stride_n": "i64", "stride_c": "i64", "n": "i32", "c": "i32", "inverse_ptr": "*fp32",
        "origin_ptr": "*fp32", "width_ptr": "*fp64", "counts_ptr": "*i32", "offsets_ptr": "*fp64", "bins": "i32"},
        {"WITH_OFFSETS": False, "BLOCK_N": 32, "BLOCK_C": 64}, capability).asm["ptx"]
    assert "red.global.gpu.relaxed.add.s32" in narrow or "red.global.gpu.relaxed.add.u32" in narrow
    counts = _compile(fused._count_kernel, {
        "x_ptr": "*bf16", "stride_n": "i64", "stride_c": "i64", "n": "i32", "c": "i32", "inverse_ptr": "*fp32",
        "origin_ptr": "*fp32", "width_ptr": "*fp64", "counts_ptr": "*i64", "offsets_ptr": "*fp64", "bins": "i32"},
        {"WITH_OFFSETS": True, "BLOCK_N": 32, "BLOCK_C": 64}, capability).asm["ptx"]
    move = _compile(fused._move_kernel, {
        "counts_ptr": "*i64", "offsets_ptr": "*fp64", "level_ptr": "*i64", "origin_ptr": "*i64",
        "new_level_ptr": "*i64", "new_origin_ptr": "*i64", "width_ptr": "*fp64", "new_width_ptr": "*fp64",
        "bins": "i32"}, {"WITH_OFFSETS": True, "BLOCK": 2048}, capability).asm["ptx"]
    for ptx in (counts, move):
        assert "red.global.gpu.relaxed.add.u64" in ptx and "red.global.gpu.relaxed.add.f64" in ptx
        assert "acq_rel" not in ptx
    assert "bar.sync" in move
    edges = _compile(fused._edges_kernel, {
        "counts_ptr": "*fp64", "prefix_ptr": "*fp64", "width_ptr": "*fp64", "inverse_ptr": "*fp64",
        "origin_ptr": "*i64", "lo_ptr": "*fp64", "hi_ptr": "*fp64", "out_ptr": "*fp64", "fine_bins": "i32",
        "bins": "i32"}, {"BLOCK": 1024}, capability).asm["ptx"]
    assert "div.rn.f64" in edges and "fma.rn.f64" not in edges  # IEEE division, no contraction
    ifmr = _compile(fused._ifmr_kernel, {
        "points_ptr": "*fp64", "weights_ptr": "*fp64", "p0_ptr": "*fp64", "p1_ptr": "*fp64", "p2_ptr": "*fp64",
        "hi_ptr": "*fp32", "lo_ptr": "*fp32", "scales_ptr": "*fp32", "inverse_ptr": "*fp64", "origin_ptr": "*i64",
        "losses_ptr": "*fp64", "crossed_ptr": "*fp64", "n": "i32", "candidates": "i32"},
        {"CANDIDATES": 1, "BUCKETS": 512}, capability).asm["ptx"]
    # the clip ends' quotients rounded as the CPU rounds them: IEEE float32 division
    assert "div.rn.f32" in ifmr and "div.full.f32" not in ifmr and "div.approx" not in ifmr


def test_a_table_the_kernels_cannot_address_is_refused_before_any_launch():
    x = torch.zeros(4, 3)
    grid = torch.ones(3), torch.zeros(3), torch.ones(3, dtype=torch.float64)
    level = torch.zeros(3, dtype=torch.int64)
    wide = torch.zeros(64, 3, dtype=torch.int64).t()  # [3, 64] with the wrong strides
    with pytest.raises(ValueError, match="contiguous int32/int64"):
        fused.count_on_grid(x, *grid, wide, torch.zeros(3, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match="offsets must be"):
        fused.move_rows(torch.zeros(3, 64, dtype=torch.int64), torch.zeros(3, 64), level, level, level, level,
                        grid[2], grid[2])
