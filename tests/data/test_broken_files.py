"""Broken dataset files get one line (DatasetError naming the file), as the other
formats do, not a pyarrow traceback."""
import pytest

from amct_hf.data.samples import load_texts
from amct_hf.errors import DatasetError


@pytest.mark.parametrize("content, why", [(b"", "size is 0 bytes"), (b"not a parquet file at all",
                                                                     "magic bytes")])
def test_empty_or_corrupt_parquet_is_one_line(tmp_path, content, why):
    path = tmp_path / "data.parquet"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=rf"could not read .*data\.parquet as parquet: .*{why}"):
        load_texts(str(path))
