"""``amct-hf calibrate``: calibrate a model's KV cache from the command line.

Without ``--model``/``--dataset`` it runs on the offline assets (SPEC §6): the real
SmolLM2-135M and the news corpus. ``quant_algo_params`` are built from the flags the user
actually gave (on top of an optional ``--params`` JSON file), so the library's IFMR/HFMG
field validation applies unchanged: ``--num-of-bins`` with ``--algo ifmr`` is refused with
the same message as in Python.
"""
from __future__ import annotations

import json
import os

__all__ = ["add_parser", "run", "quant_algo_params_from_args", "load_params_file"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="calibrate INT8 KV-cache factors and write an AMCT record",
        description="Run a causal LM over calibration text and write per-layer INT8 key/value "
                    "scales and offsets (IFMR or HFMG) into an AMCT record file. Without "
                    "--model/--dataset: the bundled SmolLM2-135M on the bundled news corpus.")
    data = p.add_argument_group("model and data")
    data.add_argument("--model", metavar="ID_OR_DIR",
                      help="model id or local folder (default: the bundled SmolLM2-135M-Instruct, "
                           "converted once into the amct_hf cache)")
    data.add_argument("--dataset", metavar="FILE_OR_NAME",
                      help="text/json/jsonl/parquet/csv file, folder or cached datasets name "
                           "(default: the bundled news corpus)")
    data.add_argument("--split", default="train", help="dataset split (default: train)")
    data.add_argument("--text-column", default="text", help="text column (default: text)")
    data.add_argument("--num-samples", type=int, default=128, metavar="N",
                      help="calibration samples (default: 128)")
    data.add_argument("--seq-len", type=int, default=2048, metavar="N",
                      help="tokens per sample (default: 2048)")
    data.add_argument("--batch-size", type=int, default=1, metavar="N",
                      help="samples per forward pass (default: 1)")

    quant = p.add_argument_group(
        "quantization (override the fields of --params; unset fields keep the library defaults: "
        "IFMR, per-tensor, asymmetric)")
    quant.add_argument("--params", metavar="FILE.json",
                       help="JSON object with quant_algo_params fields")
    quant.add_argument("--algo", choices=("ifmr", "hfmg"), help="act_algo")
    quant.add_argument("--granularity", choices=("per_tensor", "per_channel"),
                       help="quant_granularity")
    sym = quant.add_mutually_exclusive_group()
    # both directions, so a flag can override either value coming from --params
    sym.add_argument("--symmetric", dest="asymmetric", action="store_const", const=False,
                     help="symmetric factors (offset 0)")
    sym.add_argument("--asymmetric", dest="asymmetric", action="store_const", const=True,
                     help="asymmetric factors (the default)")
    quant.add_argument("--num-of-bins", type=int, metavar="N",
                       help="HFMG histogram bins: 1024, 2048, 4096 or 8192")

    run_ = p.add_argument_group("run")
    run_.add_argument("--tap", choices=("cache", "proj"), default="cache",
                      help="cache: K/V as stored in the KV cache (post-RoPE, default); "
                           "proj: raw k_proj/v_proj outputs, as AMCT taps them")
    run_.add_argument("--mode", choices=("streaming", "exact"), default="streaming",
                      help="streaming: bounded-memory histograms (default); exact: keep all values")
    run_.add_argument("--range-margin", type=float, default=0.0, metavar="M",
                      help="widen every calibrated range by this fraction (e.g. 0.2), a remedy "
                           "for per-channel ranges clipping on text unlike the calibration data")
    run_.add_argument("--record", default="kv_cache.txt", metavar="FILE",
                      help="record file to merge the factors into (default: kv_cache.txt)")
    run_.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"),
                      help="model dtype (default: transformers' default)")
    run_.add_argument("--device-map", metavar="MAP", help="from_pretrained device_map, e.g. auto")
    run_.add_argument("--trust-remote-code", action="store_true",
                      help="allow custom model code from the model folder/repo")
    run_.add_argument("--no-progress", action="store_true",
                      help="no progress bar and summary table; print one result line")
    p.set_defaults(func=run)


def load_params_file(path: str | os.PathLike) -> dict:
    """The quant_algo_params dict in a JSON file; errors name the file and the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--params file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--params file {path} is not valid JSON: {err}") from err
    if not isinstance(params, dict):
        raise ValueError(f"--params file {path} must hold a JSON object of quant_algo_params "
                         f"fields, got a JSON {type(params).__name__}")
    return params


# flag attribute -> quant_algo_params field
_FLAG_FIELDS = (("algo", "act_algo"), ("granularity", "quant_granularity"),
                ("asymmetric", "asymmetric"), ("num_of_bins", "num_of_bins"))


def quant_algo_params_from_args(args) -> dict:
    """--params file fields, overridden by the flags that were given (None = not given).

    Only given fields are included, so the library's per-algorithm validation sees exactly
    what the user asked for rather than CLI-invented defaults.
    """
    params = load_params_file(args.params) if args.params else {}
    for attr, name in _FLAG_FIELDS:
        value = getattr(args, attr)
        if value is not None:
            params[name] = value
    return params


def _check_positive(args) -> None:
    # checked here too (calibrate_kv_cache checks them as well) so that a bad value fails
    # before the default model is converted, with the flag's own name in the message
    for flag in ("num_samples", "seq_len", "batch_size"):
        value = getattr(args, flag)
        if value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def run(args) -> int:
    from .calibrate import calibrate_kv_cache
    from .params import parse_quant_algo_params
    from .record import RecordFileError

    params = quant_algo_params_from_args(args)
    parse_quant_algo_params(params)  # fail fast, before any model or data is touched
    _check_positive(args)
    model, dataset = args.model, args.dataset
    if dataset is None:
        from .assets import default_corpus_file
        dataset = str(default_corpus_file())
    if model is None:
        from .assets import smollm2_folder
        model = str(smollm2_folder())
    try:
        result = calibrate_kv_cache(
            model, dataset, record_file=args.record, quant_algo_params=params, split=args.split,
            text_column=args.text_column, num_samples=args.num_samples, seq_len=args.seq_len,
            batch_size=args.batch_size, tap=args.tap, device_map=args.device_map, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code, mode=args.mode,
            range_margin=args.range_margin, progress=not args.no_progress)
    except RecordFileError as err:
        # not a ValueError/OSError subclass; re-raise as one the CLI reports in one line
        raise RuntimeError(str(err)) from err
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        # some wrapped messages span lines (transformers' offline hint); the CLI
        # promises one error line
        if "\n" not in str(err):
            raise
        base = next(b for b in (FileNotFoundError, ValueError, RuntimeError) if isinstance(err, b))
        raise base(" ".join(str(err).split())) from err
    if args.no_progress and _is_main_process():
        print(result.summary().splitlines()[-1])
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState
    return PartialState().is_main_process
