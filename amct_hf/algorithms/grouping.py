"""Channel groups that share one quantization range, as pure reshapes.

A per-channel record has one (scale, offset) per K/V channel, ``channel = head * head_dim
+ d`` (head-major, as the hooks flatten ``[B, kv_heads, S, head_dim]``). Fitting every
channel alone on a few thousand tokens underestimates the range of channels whose
values on other text reach further. Two groupings tie channels that share a
distribution:

* ``"rope_pair"``: Hugging Face's ``rotate_half`` RoPE rotates channel ``d`` with
  ``d + head_dim/2`` of the same head; over positions the pair's post-RoPE values have
  the same distribution, so they get one range;
* ``"head"``: one range per KV head (all ``head_dim`` channels of the head).

Both are reshapes of the ``[tokens, channels]`` calibration batch into ``[tokens', groups]``
(the group's channels become extra rows), so every algorithm, observer mode and the
cross-process reduction run unchanged on "one channel per group"; the group factors
are then repeated back onto the channels, and the record keeps ``kv_heads * head_dim``
entries. ``"channel"`` is the identity (one range per channel, AMCT's per-channel).
"""
from __future__ import annotations

import torch

__all__ = ["CHANNEL_GROUPS", "check_channel_groups", "group_channels", "expand_groups", "num_groups"]

CHANNEL_GROUPS = ("channel", "rope_pair", "head")


def check_channel_groups(groups: str, channels: int, head_dim: int | None) -> None:
    """ValueError unless ``groups`` can split ``channels`` K/V channels of ``head_dim``."""
    if groups not in CHANNEL_GROUPS:
        raise ValueError(f"channel_groups={groups!r} is not supported; use one of {CHANNEL_GROUPS}")
    if groups == "channel":
        return
    if not isinstance(head_dim, int) or head_dim <= 0 or channels % head_dim:
        raise ValueError(f"channel_groups={groups!r} needs a head_dim dividing the {channels} "
                         f"K/V channels, got head_dim={head_dim!r}")
    if groups == "rope_pair" and head_dim % 2:
        raise ValueError(f"channel_groups='rope_pair' needs an even head_dim, got {head_dim}")


def num_groups(groups: str, channels: int, head_dim: int | None) -> int:
    check_channel_groups(groups, channels, head_dim)
    if groups == "channel":
        return channels
    heads = channels // head_dim
    return heads if groups == "head" else heads * head_dim // 2


def group_channels(x: torch.Tensor, groups: str, head_dim: int | None) -> torch.Tensor:
    """``[tokens, kv_heads * head_dim]`` -> ``[tokens * k, groups]``: column ``g`` holds every
    value of group ``g``'s ``k`` channels."""
    tokens, channels = x.shape
    check_channel_groups(groups, channels, head_dim)
    if groups == "channel":
        return x
    heads = channels // head_dim
    if groups == "head":  # [T, H, D] -> [T, D, H] -> [T*D, H]
        return x.reshape(tokens, heads, head_dim).transpose(1, 2).reshape(-1, heads)
    # rope_pair: [T, H, 2, D/2] -> [T, 2, H, D/2] -> [T*2, H*D/2]; group h*D/2 + j holds
    # channels h*D + j and h*D + D/2 + j
    half = head_dim // 2
    return x.reshape(tokens, heads, 2, half).transpose(1, 2).reshape(-1, heads * half)


def expand_groups(values: torch.Tensor, groups: str, channels: int, head_dim: int | None) -> torch.Tensor:
    """Group factors ``[groups]`` -> channel factors ``[channels]`` (the inverse of the
    grouping: every channel gets its group's value)."""
    want = num_groups(groups, channels, head_dim)
    values = values.reshape(-1)
    if values.numel() != want:
        raise ValueError(f"expected {want} group factors for channel_groups={groups!r}, got {values.numel()}")
    if groups == "channel":
        return values
    heads = channels // head_dim
    if groups == "head":
        return values.repeat_interleave(head_dim)
    half = head_dim // 2
    return values.reshape(heads, 1, half).expand(heads, 2, half).reshape(-1)
