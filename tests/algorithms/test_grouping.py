"""amct_hf.algorithms.grouping: the reshapes tie exactly the channels they promise."""
import pytest
import torch

from amct_hf.algorithms.grouping import check_channel_groups, expand_groups, group_channels, num_groups

HEADS, DIM = 3, 8
CHANNELS = HEADS * DIM


def partner_groups(groups):
    """Group id of every channel from the definition (channel = head * DIM + d)."""
    ids = []
    for c in range(CHANNELS):
        h, d = divmod(c, DIM)
        ids.append({"channel": c, "head": h, "rope_pair": h * (DIM // 2) + d % (DIM // 2)}[groups])
    return ids


@pytest.mark.parametrize("groups", ["channel", "rope_pair", "head"])
def test_each_column_holds_exactly_its_groups_channels(groups):
    tokens = 5
    # value = channel index + token / 100: the column's values name their channels
    x = torch.arange(CHANNELS).float().repeat(tokens, 1) + torch.arange(tokens).float()[:, None] / 100
    g = group_channels(x, groups, DIM)
    want = partner_groups(groups)
    assert g.shape[1] == num_groups(groups, CHANNELS, DIM) == len(set(want))
    for col in range(g.shape[1]):
        members = sorted({int(v) for v in g[:, col].floor().tolist()})
        assert members == [c for c in range(CHANNELS) if want[c] == col]
        assert g[:, col].numel() == tokens * len(members)  # every value of every member, once


@pytest.mark.parametrize("groups", ["channel", "rope_pair", "head"])
def test_expanded_group_range_is_the_max_over_the_groups_channels(groups):
    torch.manual_seed(0)
    x = torch.randn(50, CHANNELS) * torch.linspace(0.5, 4, CHANNELS)
    per_group = group_channels(x, groups, DIM).abs().amax(0)
    got = expand_groups(per_group, groups, CHANNELS, DIM)
    want = partner_groups(groups)
    for c in range(CHANNELS):
        partners = [k for k in range(CHANNELS) if want[k] == want[c]]
        assert got[c] == x[:, partners].abs().max()


def test_rope_pair_ties_d_with_d_plus_half_in_the_same_head_only():
    ids = expand_groups(torch.arange(num_groups("rope_pair", CHANNELS, DIM)), "rope_pair", CHANNELS, DIM)
    assert ids[0] == ids[DIM // 2] and ids[1] == ids[DIM // 2 + 1]
    assert ids[0] != ids[DIM]  # channel 0 of head 1 is another group
    assert len(set(ids.tolist())) == CHANNELS // 2


@pytest.mark.parametrize("groups, head_dim, match", [
    ("layer", DIM, "not supported"),
    ("head", None, "head_dim"),
    ("head", 5, "head_dim"),
    ("rope_pair", 3, "even head_dim"),
])
def test_bad_groupings_are_refused(groups, head_dim, match):
    channels = 3 * 3 if head_dim == 3 else CHANNELS
    with pytest.raises(ValueError, match=match):
        check_channel_groups(groups, channels, head_dim)


def test_expand_refuses_the_wrong_number_of_factors():
    with pytest.raises(ValueError, match="expected 3 group factors"):
        expand_groups(torch.ones(4), "head", CHANNELS, DIM)
