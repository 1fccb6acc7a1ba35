"""HFMG's candidate walk on the torch path, batched over channels.

The walk narrows a channel's histogram [left, right] step by step, trimming ``step`` of
mass from whichever end gains fewer bins, until at most a quarter of the bins remain; each
state is a candidate clip. :func:`search_ranges_stepwise` takes one step at a time (the
definition); :func:`search_ranges` computes the same walk in chunks of steps
(:func:`walk_chunk`), a few kernels a step instead of about twenty.
"""
from __future__ import annotations

import math

import torch

__all__ = ["search_ranges", "search_ranges_stepwise", "walk_chunk", "walk_step_size", "WALK_CHECK_EVERY"]

#: steps of the stepwise walk between two host reads of "is any channel still walking"
WALK_CHECK_EVERY = 64


def search_ranges_stepwise(hist: torch.Tensor):
    """The candidate walk one step at a time (about 20 small kernels a step): the
    definition that :func:`search_ranges` computes in chunks of steps."""
    c, bins = hist.shape
    dev = hist.device
    prefix = torch.cat([torch.zeros(c, 1, dtype=torch.float64, device=dev), hist.cumsum(1)], 1)
    total = prefix[:, -1]
    step = torch.clamp(torch.ceil(total / 100000.0), min=1.0)[:, None]
    min_bins = math.ceil(bins / 4)
    left = torch.zeros(c, 1, dtype=torch.int64, device=dev)
    right = torch.full((c, 1), bins - 1, dtype=torch.int64, device=dev)
    lefts, rights, valids = [], [], []
    # Every active step narrows [left, right] by at least one bin, so the walk ends within
    # bins - 1 - min_bins steps. Whether any channel is still active is read back to the
    # host only every WALK_CHECK_EVERY steps (finished channels pass through unchanged and
    # their extra columns are marked invalid), not once per step.
    for it in range(max(0, bins - 1 - min_bins)):
        active = (right - left) > min_bins
        if it % WALK_CHECK_EVERY == 0 and not bool(active.any()):
            break
        target = prefix.gather(1, left) + step
        tl = torch.minimum(torch.searchsorted(prefix, target, side="left"), right)
        target = prefix.gather(1, right + 1) - step
        u = torch.searchsorted(prefix, target, side="right") - 1
        tr = torch.maximum(u - 1, tl)
        move_right = (right - tr) >= (tl - left)
        right = torch.where(active & move_right, tr, right)
        left = torch.where(active & ~move_right, tl, left)
        lefts.append(left)
        rights.append(right)
        valids.append(active)
    if not lefts:
        empty = torch.zeros(c, 0, dtype=torch.int64, device=dev)
        return empty, empty.clone(), torch.zeros(c, 0, dtype=torch.bool, device=dev)
    return torch.cat(lefts, 1), torch.cat(rights, 1), torch.cat(valids, 1)


def walk_step_size(prefix: torch.Tensor) -> torch.Tensor:
    """The walk's step (mass trimmed per step) of every channel ([C, 1] float64) from its
    prefix sums ([C, bins + 1])."""
    return torch.clamp(torch.ceil(prefix[:, -1:] / 100000.0), min=1.0)


def walk_chunk(prefix: torch.Tensor, step: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
               steps: int, min_bins: int):
    """The next ``steps`` steps of the candidate walk from the states (``left``, ``right``)
    ([R] int64; ``prefix`` [R, bins + 1] and ``step`` [R, 1] of the same rows).

    Returns the states after each step ``(lefts, rights)`` ([R, steps]), ``valid`` (the
    step was taken: the state before it was active, and the step is determined, see
    below) and the state to continue from ``(left, right)`` ([R]) with ``ended`` (no step
    left to take).

    A step moves ``left`` to ``TL(left)`` (the first edge past ``step`` of mass from
    ``left``) or ``right`` to ``TR(right)`` (likewise from the right), whichever gains
    fewer bins (``right`` on a tie). While the two do not cross, the left and right ends
    follow two independent chains, ``l -> TL(l)`` and ``r -> TR(r)``, and the walk merges
    them: taking the larger gain first, with ties to the right, is a merge of the chains'
    running minima of the gains (a gain not below the running minimum of its chain goes
    with the step before it). So a chunk costs ``steps`` chain steps of a few [R, 1]
    kernels each, then a fixed number of [R, steps] operations, instead of ``steps``
    sequential steps of about 20 kernels. Every step is then checked against the exact
    step (with the clamps where the chains cross) from the state before it; from the
    first step that differs (the ends' chains crossed), the exact step is taken and the
    rest of the chunk is left undetermined (invalid; the next chunk goes on from there)."""
    r_n = left.shape[0]
    dev = left.device
    bins = prefix.shape[1] - 1
    lc, rc = [left[:, None]], [right[:, None]]
    e0, e1 = left[:, None], right[:, None] + 1
    for _ in range(steps + 1):
        # TL(l): the first edge i with prefix[i] >= prefix[l] + step (bins + 1 past the end)
        e0 = torch.searchsorted(prefix, prefix.gather(1, e0) + step, side="left").clamp_(max=bins)
        # TR(r) + 1: the last edge u with prefix[u] <= prefix[r + 1] - step, less one
        e1 = (torch.searchsorted(prefix, prefix.gather(1, e1) - step, side="right") - 1).clamp_(min=0)
        lc.append(e0)
        rc.append(e1 - 1)
    lc, rc = torch.cat(lc, 1), torch.cat(rc, 1)  # [R, steps + 2]
    a, b = lc[:, 1:-1] - lc[:, :-2], rc[:, :-2] - rc[:, 1:-1]  # gains of moves 1..steps
    ma, mb = torch.cummin(a, 1).values, torch.cummin(b, 1).values
    # position of the i-th left move: i plus the right moves before it (running minimum at
    # least the left one's); the number of left moves among the first p + 1 steps
    pos = torch.arange(steps, device=dev) + torch.searchsorted(-mb, -ma, right=True)
    n_left = torch.searchsorted(pos, torch.arange(steps, device=dev).expand(r_n, steps).contiguous(),
                                right=True)
    n_right = torch.arange(1, steps + 1, device=dev) - n_left
    lefts, rights = lc.gather(1, n_left), rc.gather(1, n_right)
    # the exact step from the state before each step (its own chain successors)
    nl0 = torch.cat([torch.zeros_like(n_left[:, :1]), n_left[:, :-1]], 1)
    nr0 = torch.arange(steps, device=dev) - nl0
    lb, rb = lc.gather(1, nl0), rc.gather(1, nr0)
    tl = torch.minimum(lc.gather(1, nl0 + 1), rb)
    tr = torch.maximum(rc.gather(1, nr0 + 1), tl)
    move_right = (rb - tr) >= (tl - lb)
    exact_l = torch.where(move_right, lb, tl)
    exact_r = torch.where(move_right, tr, rb)
    active = (rb - lb) > min_bins
    differs = active & ((exact_l != lefts) | (exact_r != rights))
    seen = differs.to(torch.int8).cumsum(1)
    determined = (seen - differs.to(torch.int8)) == 0  # at or before the first difference
    lefts = torch.where(differs, exact_l, lefts)
    rights = torch.where(differs, exact_r, rights)
    valid = active & determined
    last = determined.sum(1, keepdim=True) - 1
    left, right = lefts.gather(1, last)[:, 0], rights.gather(1, last)[:, 0]
    ended = (right - left) <= min_bins
    return lefts, rights, valid, left, right, ended


def search_ranges(hist: torch.Tensor, chunk: int = 64):
    """Candidate (left, right) bin ranges of every channel ([C, K] each) and a validity mask:
    the whole walk (:func:`search_ranges_stepwise`), in chunks of :func:`walk_chunk` steps
    over the channels still walking (one host read per chunk). The valid entries of a row,
    in order, are its walk; invalid ones are padding."""
    c, bins = hist.shape
    dev = hist.device
    prefix = torch.cat([torch.zeros(c, 1, dtype=torch.float64, device=dev), hist.cumsum(1)], 1)
    step = walk_step_size(prefix)
    min_bins = math.ceil(bins / 4)
    left = torch.zeros(c, dtype=torch.int64, device=dev)
    right = torch.full((c,), bins - 1, dtype=torch.int64, device=dev)
    rows = torch.arange(c, device=dev)
    parts = []
    if bins - 1 <= min_bins:
        rows = rows[:0]
    while rows.numel():
        lefts, rights, valid, nl, nr, ended = walk_chunk(prefix[rows], step[rows], left[rows], right[rows],
                                                         chunk, min_bins)
        parts.append((rows, lefts, rights, valid))
        left[rows], right[rows] = nl, nr
        rows = rows[~ended]
    k = sum(p[1].shape[1] for p in parts)
    out_l = torch.zeros(c, k, dtype=torch.int64, device=dev)
    out_r = torch.zeros(c, k, dtype=torch.int64, device=dev)
    out_v = torch.zeros(c, k, dtype=torch.bool, device=dev)
    col = 0
    for rows, lefts, rights, valid in parts:
        cols = torch.arange(col, col + lefts.shape[1], device=dev)
        out_l[rows[:, None], cols] = lefts
        out_r[rows[:, None], cols] = rights
        out_v[rows[:, None], cols] = valid
        col += lefts.shape[1]
    return out_l, out_r, out_v
