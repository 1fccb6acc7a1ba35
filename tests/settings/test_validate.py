"""One validator per kind of value."""
import pytest

from amct_hf.errors import ExportError, InvalidArgumentError
from amct_hf.settings.validate import lock_timeout_seconds, positive_int, range_margin, size_in_bytes


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "4", None])
def test_positive_int_refuses(value):
    with pytest.raises(InvalidArgumentError, match=rf"n must be a positive integer, got {value!r}"):
        positive_int("n", value)


def test_positive_int_error_type_is_the_callers():
    assert positive_int("n", 7) == 7
    with pytest.raises(ExportError):
        positive_int("n", 0, ExportError)


@pytest.mark.parametrize("value", [-0.1, 10, 10.5, True, "0.1", float("nan")])
def test_range_margin_refuses(value):
    with pytest.raises(InvalidArgumentError, match="range_margin must be a number in"):
        range_margin(value, "key")


@pytest.mark.parametrize("value,want", [(None, None), (-1, None), (0, 0.0), (2, 2.0), (0.5, 0.5)])
def test_lock_timeout_values(value, want):
    assert lock_timeout_seconds(value) == want


@pytest.mark.parametrize("text,want", [("5GB", 5 * 10 ** 9), ("4GiB", 4 * 2 ** 30), (" 512 kb ", 512000),
                                       ("1.5MB", 1500000), (42, 42), ("7", 7)])
def test_size_in_bytes(text, want):
    assert size_in_bytes(text, "size") == want


@pytest.mark.parametrize("bad", ["", "5XB", "-1GB", "GB", True, 1.5, 0])
def test_size_in_bytes_refuses_naming_the_value(bad):
    with pytest.raises(InvalidArgumentError, match="size"):
        size_in_bytes(bad, "size")
