"""amct-hf command line: calibrate, eval, export, report.

Every subcommand's parser lives here; the library modules only return results and
raise. Nothing heavy is imported until a subcommand runs, so --help is instant. An
error of amct_hf's own (bad input, unusable file or model) prints as one line with
exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

__all__ = ["main", "build_parser", "recipe_args", "quant_algo_params_from_args", "load_params"]

# flag attribute -> quant_algo_params field
_FLAG_FIELDS = (("algo", "act_algo"), ("granularity", "quant_granularity"),
                ("asymmetric", "asymmetric"), ("num_of_bins", "num_of_bins"))


#: what ``amct-hf calibrate`` runs without quantization flags: the measured-best general
#: setting (docs/accuracy.md); AMCT's own defaults are one flag away (e.g. ``--algo ifmr``)
DEFAULT_TARGET = "transformers"
#: how ``amct-hf calibrate`` renders its text without --chat-template/--no-chat-template: through
#: the tokenizer's chat template when it has one (instruct models serve chat-formatted text;
#: docs/accuracy.md); the library's own default is plain text
DEFAULT_CHAT_TEMPLATE = "auto"

# --------------------------------------------------------------------------- shared arguments

def _add_model_data(p, *, num_samples: int, seq_len: int, dataset_default: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="ID_OR_DIR",
                   help="model id or local folder (default: the bundled SmolLM2-135M-Instruct, "
                        "converted once into the amct_hf cache)")
    g.add_argument("--dataset", metavar="FILE_OR_NAME",
                   help="text/json/jsonl/parquet/csv file, folder or cached datasets name "
                        f"(default: {dataset_default})")
    g.add_argument("--split", default="train", help="dataset split of a datasets name (default: train)")
    g.add_argument("--text-column", default="text", help="text column (default: text)")
    g.add_argument("--num-samples", type=int, default=num_samples, metavar="N",
                   help=f"samples (default: {num_samples})")
    g.add_argument("--seq-len", type=int, default=seq_len, metavar="N",
                   help=f"tokens per sample (default: {seq_len})")
    g.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="samples per forward pass (default: 1)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"),
                   help="model dtype (default: transformers' default)")
    g.add_argument("--device-map", metavar="MAP", help="from_pretrained device_map, e.g. auto")
    g.add_argument("--max-memory", metavar="SPEC",
                   help="memory per device for placing the model, e.g. cpu=2GiB,0=20GiB "
                        "(implies --device-map auto)")
    g.add_argument("--offload-folder", metavar="DIR",
                   help="folder for weights that fit no device (disk offload; implies --device-map auto)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model folder/repo")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_chat_template(p, default_help: str) -> None:
    chat = p.add_argument_group("chat template").add_mutually_exclusive_group()
    chat.add_argument("--chat-template", dest="chat_template", action="store_const", const=True,
                      help="render every text through the tokenizer's chat template (its first half as a "
                           "user turn, the rest as the assistant's reply; a conversation column such as "
                           f"--text-column messages as it is) before packing; {default_help}")
    chat.add_argument("--no-chat-template", dest="chat_template", action="store_const", const=False,
                      help="plain text, even for a tokenizer with a chat template")


def _add_calibrate_arguments(p) -> None:
    _add_model_data(p, num_samples=128, seq_len=2048, dataset_default="the bundled news corpus")
    _add_chat_template(p, "default: when the tokenizer has a template (docs/accuracy.md: it serves "
                          "chat-formatted text better)")
    q = p.add_argument_group(
        "quantization (override the fields of --params; unset fields keep the library defaults: "
        "IFMR, per-tensor, asymmetric)")
    q.add_argument("--params", metavar="JSON_OR_FILE",
                   help="quant_algo_params: a JSON object inline, or a .json file holding one")
    q.add_argument("--algo", choices=("ifmr", "hfmg"), help="act_algo")
    q.add_argument("--granularity", choices=("per_tensor", "per_channel"), help="quant_granularity")
    sym = q.add_mutually_exclusive_group()
    # both directions, so a flag can override either value coming from --params
    sym.add_argument("--symmetric", dest="asymmetric", action="store_const", const=False,
                     help="symmetric factors (offset 0)")
    sym.add_argument("--asymmetric", dest="asymmetric", action="store_const", const=True,
                     help="asymmetric factors (the default)")
    q.add_argument("--num-of-bins", type=int, metavar="N",
                   help="HFMG histogram bins: 1024, 2048, 4096 or 8192")
    q.add_argument("--target", choices=("ascend-c8", "transformers", "vllm-fp8"),
                   help="the engine that will serve the factors: picks the configuration measured "
                        "best for it (docs/accuracy.md); other quantization flags must agree with it")
    q.add_argument("--no-value-centering", dest="value_centering", action="store_false",
                   help="with --target ascend-c8: symmetric values even for a Llama whose attention "
                        "biases could carry the value centres (for an engine that does not read "
                        "attention_bias)")
    q.add_argument("--channel-groups", choices=("channel", "rope_pair", "head"),
                   help="per-channel ranges shared by each RoPE pair or each KV head "
                        "(default: one per channel, as AMCT)")
    r = p.add_argument_group("run")
    r.add_argument("--tap", choices=("cache", "proj"), default="cache",
                   help="cache: K/V as stored in the KV cache (post-RoPE, default); "
                        "proj: raw k_proj/v_proj outputs, as AMCT taps them")
    r.add_argument("--mode", choices=("streaming", "exact"), default="streaming",
                   help="streaming: bounded-memory histograms (default); exact: keep all values")
    r.add_argument("--range-margin", type=float, default=0.0, metavar="M",
                   help="widen every calibrated range by this fraction (e.g. 0.1), a remedy "
                        "for per-channel ranges clipping on text unlike the calibration data")
    r.add_argument("--record", default="kv_cache.txt", metavar="FILE",
                   help="record file to merge the factors into (default: kv_cache.txt)")
    r.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                   help="give up after this long waiting for another writer's record lock "
                        "(default: wait forever)")
    r.add_argument("--export-ascend-c8", metavar="OUT_DIR",
                   help="after calibrating, write the ascend-c8 model directory (vllm-ascend / MindIE) "
                        "of the local model folder with these factors; needs symmetric keys")


# --------------------------------------------------------------------------- calibrate

def load_params(value: str) -> dict:
    """quant_algo_params from ``--params``: an inline JSON object, or a JSON file."""
    from .errors import InvalidArgumentError, MissingFileError
    text, where = value, "--params"
    if not value.lstrip().startswith("{"):
        if not os.path.isfile(value):
            raise MissingFileError(f"--params file {value} does not exist (nor is it an inline "
                                   "JSON object)")
        with open(value, "rb") as f:
            text, where = f.read().decode("utf-8", "replace"), f"--params file {value}"
    try:
        params = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgumentError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(params, dict):
        raise InvalidArgumentError(f"{where} must hold a JSON object of quant_algo_params "
                                   f"fields, got a JSON {type(params).__name__}")
    return params


def quant_algo_params_from_args(args) -> dict:
    """--params fields, overridden by the flags that were given (None = not given).

    Only given fields are included, so the library's per-algorithm validation sees exactly
    what the user asked for rather than CLI-invented defaults."""
    params = load_params(args.params) if getattr(args, "params", None) else {}
    for attr, name in _FLAG_FIELDS:
        value = getattr(args, attr, None)
        if value is not None:
            params[name] = value
    return params


def _check_positive(args, flags) -> None:
    # checked before the default model is converted, with the flag's own name
    from .errors import InvalidArgumentError
    for flag in flags:
        value = getattr(args, flag)
        if value <= 0:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def _quiet_loading(args) -> None:
    if args.no_progress:  # transformers' own "Loading weights" bars too
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def _default_model(args, log) -> str:
    if args.model is not None:
        return args.model
    from .data.bundled import smollm2_folder
    folder = str(smollm2_folder())
    log(f"model: bundled SmolLM2-135M-Instruct at {folder}")
    return folder


def _placement(args) -> dict:
    from .modeling.placement import parse_max_memory
    return {"max_memory": parse_max_memory(args.max_memory) if args.max_memory else None,
            "offload_folder": args.offload_folder}


def calibration_options(args) -> dict:
    """The option objects (``{"quant", "data", "load"}``) from parsed calibrate arguments;
    without any quantization flag, the measured-best general setting (``--target
    transformers``)."""
    from .calibrate import options_from_keywords
    params = quant_algo_params_from_args(args) or None
    target = args.target
    if target is None and params is None and args.channel_groups is None and not args.range_margin:
        target = DEFAULT_TARGET
    return options_from_keywords(
        quant_algo_params=params, target=target, value_centering=args.value_centering,
        channel_groups=args.channel_groups, split=args.split, text_column=args.text_column,
        num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size, tap=args.tap,
        device_map=args.device_map, dtype=args.dtype, **_placement(args),
        trust_remote_code=args.trust_remote_code, mode=args.mode, range_margin=args.range_margin,
        chat_template=DEFAULT_CHAT_TEMPLATE if args.chat_template is None else args.chat_template)


def run_calibrate(args) -> int:
    from .errors import InvalidArgumentError
    main_process = _is_main_process()
    log = (lambda msg: print(msg, file=sys.stderr)) if main_process else (lambda msg: None)
    if not args.value_centering and args.target != "ascend-c8":
        raise InvalidArgumentError("--no-value-centering applies to --target ascend-c8 only")
    _check_positive(args, ("num_samples", "seq_len", "batch_size"))
    from .calibrate import calibrate_kv_cache, resolve_calibration
    # resolved once, before any weights are loaded; the driver runs with exactly this
    settings = resolve_calibration(args.model, **calibration_options(args))
    if args.export_ascend_c8 and (settings.kv.params["key"].asymmetric or args.tap != "cache"):
        raise InvalidArgumentError("--export-ascend-c8 needs symmetric keys of the KV cache (--target "
                                   "ascend-c8, or --symmetric; --tap cache): the Ascend engines dequantize "
                                   "without offsets")
    dataset = args.dataset
    if dataset is None:
        from .data.bundled import default_corpus_file
        dataset = str(default_corpus_file())
        log(f"dataset: bundled news corpus at {dataset}")
    model = _default_model(args, log)
    if args.export_ascend_c8:
        from .export.precheck import check_calibrate_export
        check_calibrate_export(args.record, args.export_ascend_c8, model, trust_remote_code=args.trust_remote_code)
    _quiet_loading(args)
    result = calibrate_kv_cache(model, dataset, record_file=args.record, progress=not args.no_progress,
                                lock_timeout=args.lock_timeout, settings=settings)
    if main_process:
        print(result.totals() if args.no_progress else result.summary())
        print(f"settings: {describe_settings(settings.kv)}")
        if args.no_progress and result.shortfall:
            print(f"warning: {result.shortfall}")
        if args.export_ascend_c8:
            from .export.formats import export_format
            print(export_format("ascend-c8").export(args.record, args.export_ascend_c8, model=model,
                                                    trust_remote_code=args.trust_remote_code))
            print(f"serve it with: vllm serve {args.export_ascend_c8} --quantization ascend")
        model_hint = "" if args.model is None else f" --model {args.model}"
        log(f"next: amct-hf eval{model_hint} --record {args.record}   "
            "(perplexity on held-out text, with and without these factors)")
    return 0


def describe_settings(kv) -> str:
    """One line: the target (or "explicit parameters"), the model family whose own
    settings it took (if any) and each kind's algorithm."""
    def kind(k):
        p = kv.params[k]
        groups = "" if kv.groups[k] == "channel" else f", {kv.groups[k]} groups"
        margin = f", range +{kv.range_margin[k]:g}" if kv.range_margin[k] else ""
        return (f"{k}s {p.act_algo.upper()} {p.granularity.replace('_', '-')} "
                f"{'asymmetric' if p.asymmetric else 'symmetric'}{groups}{margin}")
    head = f"target {kv.target}" if kv.target else "explicit parameters"
    if kv.family:
        head += f", {kv.family} settings"
    return f"{head} ({kind('key')}; {kind('value')})"


def _is_main_process() -> bool:
    for var in ("RANK", "LOCAL_RANK"):  # torchrun / accelerate launch
        if os.environ.get(var, "0") != "0":
            return False
    return True


# --------------------------------------------------------------------------- eval

def run_eval(args) -> int:
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    _check_positive(args, ("num_samples", "seq_len", "batch_size"))
    _check_per_layer_flags(args)
    dataset = args.dataset
    from .data.bundled import default_corpus_file, shakespeare_texts
    if dataset is None:
        dataset = shakespeare_texts()
        log(f"dataset: bundled Shakespeare plays (held out from calibration's news corpus), "
            f"{len(dataset)} files under {dataset[0].parent}")
    elif args.skip_tokens == 0 and os.path.abspath(str(dataset)) == os.path.abspath(str(default_corpus_file())):
        log("warning: evaluating on the calibration corpus from its first token scores the very "
            "tokens calibration used; pass --skip-tokens N (N = calibration samples x seq-len)")
    if args.export is not None:
        from .errors import InvalidArgumentError
        if args.model is not None or args.record is not None:
            raise InvalidArgumentError("--export evaluates the export's own model and scales; drop "
                                       "--model/--record")
        model, record, served = None, None, {"export_dir": args.export, "fp8_query": args.fp8_query}
    else:
        model, record, served = _default_model(args, log), args.record or "kv_cache.txt", {}
    _quiet_loading(args)
    if args.per_layer:
        if args.export is not None:
            from .errors import InvalidArgumentError
            raise InvalidArgumentError("--per-layer ranks the layers of a record (--record); it does not "
                                       "evaluate an export (--export)")
        return _run_per_layer(args, model, dataset, record)
    from .evaluation.perplexity import evaluate_kv_quant
    result = evaluate_kv_quant(
        model, dataset, record, **served, num_samples=args.num_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, skip_tokens=args.skip_tokens, split=args.split,
        text_column=args.text_column, references=not args.no_references,
        device_map=args.device_map, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress, chat_template=bool(args.chat_template), **_placement(args))
    print(result.table(worst=args.worst))
    if args.json:
        from .fileio import write_text_atomic
        data = {**result.to_dict(), "model": model or args.export, "dataset": [str(d) for d in dataset]
                if isinstance(dataset, list) else str(dataset)}

        write_text_atomic(args.json, json.dumps(data, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


def _check_per_layer_flags(args) -> None:
    from .errors import InvalidArgumentError
    if args.skip_layers_out and not args.per_layer:
        raise InvalidArgumentError("--skip-layers-out needs --per-layer (it lists the layers --per-layer ranks)")
    if args.skip_layers < 0:
        raise InvalidArgumentError(f"--skip-layers must be a non-negative integer, got {args.skip_layers}")


def _run_per_layer(args, model, dataset, record) -> int:
    from .evaluation.per_layer import per_layer_cost, skip_layers_arg
    from .fileio import write_text_atomic
    result = per_layer_cost(
        model, dataset, record, num_samples=args.num_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, skip_tokens=args.skip_tokens, split=args.split,
        text_column=args.text_column, chat_template=bool(args.chat_template), device_map=args.device_map,
        dtype=args.dtype, trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
        **_placement(args))
    print(result.table())
    if args.skip_layers_out:
        value = skip_layers_arg(result.most_costly(args.skip_layers))
        write_text_atomic(args.skip_layers_out, value + "\n")
        print(f"wrote the {args.skip_layers} most costly layer(s) to {args.skip_layers_out}: serve with "
              f"--kv-cache-dtype-skip-layers {value}")
    if args.json:
        data = {"baseline_ppl": result.baseline_ppl, "layers": result.layers, "num_samples": result.num_samples,
                "seq_len": result.seq_len, "num_tokens": result.num_tokens, "record_file": result.record_file,
                "model": model}
        write_text_atomic(args.json, json.dumps(data, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- export, report

def run_export(args) -> int:
    from .export.formats import export_format
    options = {"overwrite": args.overwrite, "max_shard_size": args.max_shard_size,
               "trust_remote_code": args.trust_remote_code}
    if args.kv_strategy is not None:
        if args.format != "vllm-fp8":
            from .errors import InvalidArgumentError
            raise InvalidArgumentError(f"--kv-strategy is for --format vllm-fp8, not {args.format}")
        options["kv_strategy"] = args.kv_strategy
    if args.query_dataset is not None:
        from .errors import InvalidArgumentError
        if args.format != "vllm-fp8" or args.model is None:
            raise InvalidArgumentError("--query-dataset calibrates vllm-fp8 query scales: it needs "
                                       "--format vllm-fp8 and --model")
        from .export.query import calibrate_query_scales
        options["query_scales"] = calibrate_query_scales(
            args.model, args.query_dataset, num_samples=args.query_samples, seq_len=512,
            per_head=args.kv_strategy == "attn_head", trust_remote_code=args.trust_remote_code)
    print(export_format(args.format).export(args.record, args.out, model=args.model, **options))
    return 0


def run_report(args) -> int:
    from .evaluation.report import OUTLIER_RATIO, plot_report
    out = args.out or os.path.splitext(args.record)[0] + ".png"
    summary = plot_report(args.record, out, title=args.title)
    n = len(summary["layers"])
    print(f"wrote report for {n} K/V entr{'ies' if n != 1 else 'y'} to {out}")
    if summary["outliers"]:
        parts = [f"{name} (ch {summary['layers'][name]['worst_channel']}, "
                 f"{summary['layers'][name]['range_ratio']:.1f}x)" for name in summary["outliers"]]
        print(f"outlier layers (widest channel range > {OUTLIER_RATIO:g}x median): " + "; ".join(parts))
    elif any(s["channels"] > 1 for s in summary["layers"].values()):
        print("no outlier layers")
    return 0


def run_verify(args) -> int:
    from .export.verify import verify_export
    report = verify_export(args.path, num_layers=args.num_layers)
    if report.rows:
        print(report.table())
    for problem in report.problems[1:]:
        print(f"also: {problem}", file=sys.stderr)
    print(report.verdict())
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .export.formats import FORMATS
    parser = argparse.ArgumentParser(prog="amct-hf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each step (layers calibrated, records written) on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="calibrate INT8 KV-cache factors and write an AMCT record",
                       description="Run a causal LM over calibration text and write per-layer INT8 "
                                   "key/value scales and offsets (IFMR or HFMG) into an AMCT record "
                                   "file. Without --model/--dataset: the bundled SmolLM2-135M on "
                                   "the bundled news corpus.")
    _add_calibrate_arguments(p)
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("eval", help="perplexity with a record's INT8 K/V vs full precision",
                       description="Perplexity on packed chunks with the full-precision KV cache and "
                                   "with K/V quantize-dequantized by the record's factors, plus "
                                   "min-max (oracle, on the eval data) and dynamic per-token INT8 "
                                   "references, and per-layer K/V relative MSE. Without "
                                   "--model/--dataset: the bundled SmolLM2-135M on the bundled "
                                   "Shakespeare plays (text calibration never saw).")
    _add_model_data(p, num_samples=8, seq_len=512,
                    dataset_default="the bundled Shakespeare plays, held out from calibration")
    p.add_argument("--record", metavar="FILE", help="AMCT record file (default: kv_cache.txt)")
    p.add_argument("--export", metavar="DIR",
                   help="instead of a record: an ascend-c8, vllm-fp8 or modelopt-fp8 export directory, "
                        "evaluated as its engine serves it (its own weights; scale-only INT8 or FP8 "
                        "E4M3 with its scales), beside FP8 with scale 1.0 and dynamic per-token INT8")
    p.add_argument("--fp8-query", action="store_true",
                   help="with an FP8 --export: also quantize the query to FP8 with the export's q_scale "
                        "(1.0 without one), as vLLM's FlashAttention 3 / Triton / FlashInfer backends do")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--skip-tokens", type=int, default=0, metavar="N",
                   help="skip the first N tokens of the packed text, e.g. the calibration tokens "
                        "when evaluating on the calibration corpus (default 0)")
    p.add_argument("--no-references", action="store_true",
                   help="skip the min-max and dynamic per-token reference runs")
    p.add_argument("--worst", type=int, default=3, help="layers to mark as worst (default 3)")
    _add_chat_template(p, "default: plain text")
    pl = p.add_argument_group("per-layer cost")
    pl.add_argument("--per-layer", action="store_true",
                    help="quantize one attention layer (K and V) at a time with the record and rank the "
                         "layers by perplexity cost (one full-precision pass, then one pass per layer)")
    pl.add_argument("--skip-layers-out", metavar="FILE",
                    help="with --per-layer: write the --skip-layers most costly layer indices as vLLM's "
                         "--kv-cache-dtype-skip-layers takes them (space-separated, ascending)")
    pl.add_argument("--skip-layers", type=int, default=2, metavar="N",
                    help="how many layers --skip-layers-out lists (default 2)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("export", help="export a record's factors for serving engines and other tools",
                       description="Export the kv_cache_value entries of an AMCT record file. Formats: "
                                   + "; ".join(f"{f.name} ({f.writes} for {f.engines})" for f in FORMATS.values())
                                   + ".")
    p.add_argument("--record", required=True, metavar="FILE", help="AMCT record file")
    p.add_argument("--format", choices=list(FORMATS), default="json", help="output format (default: json)")
    p.add_argument("--out", metavar="PATH",
                   help="output file, or directory for ascend-c8 / vllm-fp8 (default for files: the "
                        "record path with the format's suffix)")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="ascend-c8 / vllm-fp8 / lmdeploy-ascend (checks the layer count): the local model "
                        "folder the record was calibrated on")
    p.add_argument("--kv-strategy", choices=("tensor", "attn_head"),
                   help="vllm-fp8: one FP8 scale per K/V tensor (default; every vLLM backend) or one "
                        "per KV head (attn_head: read by vLLM's FlashAttention 3 backend only)")
    p.add_argument("--query-dataset", metavar="FILE_OR_NAME",
                   help="vllm-fp8: also write calibrated q_scale tensors, the query amax / 448 over "
                        "--query-samples chunks of 512 tokens of this text (without: vLLM uses 1.0)")
    p.add_argument("--query-samples", type=int, default=16, metavar="N",
                   help="chunks of 512 tokens for --query-dataset (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="ascend-c8 / vllm-fp8: weight shard size cap, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code when reading the model's config")
    p.set_defaults(func=run_export)

    p = sub.add_parser("verify", help="check an export as its engine would read it",
                       description="Read an ascend-c8, vllm-fp8 or modelopt-fp8 directory, or an "
                                   "lmdeploy-ascend record, as its engine does: file set, names, shapes, "
                                   "dtypes, description/config keys, offsets zero where the engine ignores "
                                   "them, scales finite and positive and not the placeholder 1.0, every "
                                   "attention layer covered. Prints a per-layer table and one verdict line; "
                                   "exits 1 on a problem.")
    p.add_argument("path", metavar="DIR_OR_FILE", help="the export directory (or lmdeploy record file)")
    p.add_argument("--num-layers", type=int, metavar="N",
                   help="lmdeploy-ascend record: the model's decoder layers (pairs must be N or 2N)")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("report", help="plot the clip ranges of a record's factors",
                       description="Plot per-layer (and, for per-channel records, per-channel) INT8 "
                                   "clip ranges implied by the kv_cache_value factors of an AMCT "
                                   "record, flagging outlier layers.")
    p.add_argument("--record", required=True, metavar="FILE", help="AMCT record file")
    p.add_argument("--out", metavar="PATH", help="image to write (default: the record path with .png)")
    p.add_argument("--title", help="figure title (default: names the record)")
    p.set_defaults(func=run_report)
    return parser


def recipe_args(defaults: dict, argv=None, description: str | None = None,
                model_required: str | None = None) -> argparse.Namespace:
    """The calibrate arguments for a recipe script: the CLI's own flags, with the recipe's
    ``defaults`` (flag destinations such as ``model``, ``params``, ``algo``) in place of
    the CLI's. With a target, the recipe's ``params`` give way to the target's settings
    (``--params`` on the command line still counts, and must agree with a ``--target`` given
    there); quantization flags on the command line (``--algo ifmr``, ``--params``, ...)
    replace the recipe's own target.
    ``model_required``: the usage error to give when no model is set."""
    p = argparse.ArgumentParser(description=description)
    _add_calibrate_arguments(p)
    unknown = set(defaults) - {a.dest for a in p._actions}
    if unknown:
        raise ValueError(f"recipe defaults name no calibrate flag: {sorted(unknown)}")
    unset = object()  # tells a flag on the command line (abbreviated or not) from the recipe's
    p.set_defaults(**{**defaults, "params": unset, "target": unset})
    args = p.parse_args(argv)
    explicit = args.params is not unset or any(getattr(args, attr) is not None for attr, _ in _FLAG_FIELDS) \
        or args.channel_groups is not None
    if args.target is unset:
        # quantization flags on the command line replace the recipe's target
        args.target = None if explicit else defaults.get("target")
    if args.params is unset:
        # with a target, the target sets the quantization; the recipe's own is only a default
        args.params = None if args.target else defaults.get("params")
    if model_required and args.model is None:
        p.error(model_required)  # usage + the message, exit status 2
    return args


def run_recipe(defaults: dict, argv=None, description: str | None = None,
               model_required: str | None = None) -> int:
    """Parse a recipe's flags and calibrate, reporting errors as the CLI does."""
    args = recipe_args(defaults, argv, description, model_required)
    args.command = "calibrate"
    import warnings
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _run(args, run_calibrate)
    finally:
        warnings.showwarning = previous


def _run(args, func) -> int:
    from .errors import AmctHfError
    try:
        return int(func(args) or 0)
    except AmctHfError as err:
        print(f"amct-hf {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # a user reads "what happened", not the library line that raised it
    print(f"amct-hf: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv=None) -> int:
    from .errors import AmctHfError
    try:
        parser = build_parser()
    except AmctHfError as err:  # an unsupported transformers, met while importing the formats
        print(f"amct-hf: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import warnings
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _run(args, args.func)
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
