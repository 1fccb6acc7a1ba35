"""Records and exports on the real SmolLM2, shared by the deploy tests (one calibration
per session: symmetric per-channel IFMR, post-RoPE, as the Ascend recipe calibrates)."""
import pytest


@pytest.fixture(scope="session")
def sym_record(smollm2_dir, tmp_path_factory):
    """Path of a symmetric per-channel record calibrated on the news corpus (2 x 64 tokens)."""
    import amct_hf
    from amct_hf.data import bundled as assets

    path = tmp_path_factory.mktemp("records") / "sym_per_channel.txt"
    amct_hf.calibrate_kv_cache(
        str(smollm2_dir), str(assets.default_corpus_file()), record_file=str(path),
        quant_algo_params={"act_algo": "ifmr", "quant_granularity": "per_channel",
                           "asymmetric": False},
        num_samples=2, seq_len=64, progress=False)
    return path


@pytest.fixture(scope="session")
def per_tensor_record(sym_record, tmp_path_factory):
    """A real per-tensor record derived from the calibrated one: each layer's widest channel."""
    from amct_hf.record.files import read_kv_factors, write_kv_factors

    factors = read_kv_factors(sym_record)
    path = tmp_path_factory.mktemp("records") / "sym_per_tensor.txt"
    write_kv_factors(path, {name: ([max(s)], [0]) for name, (s, _) in factors.items()})
    return path



@pytest.fixture(scope="session")
def centred_record(smollm2_dir, tmp_path_factory):
    """Path of a record calibrated as target="ascend-c8" calibrates a Llama: symmetric keys,
    asymmetric values (news corpus, 2 x 64 tokens)."""
    import amct_hf
    from amct_hf.data import bundled as assets

    path = tmp_path_factory.mktemp("records") / "centred.txt"
    amct_hf.calibrate_kv_cache(str(smollm2_dir), str(assets.default_corpus_file()), record_file=str(path),
                               target="ascend-c8", num_samples=2, seq_len=64, progress=False)
    return path
