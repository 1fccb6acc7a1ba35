"""``amct-hf`` command line: calibrate, eval, export, report.

Each subcommand lives in the module that owns its concern and exposes
``add_parser(subparsers)``; the parser's ``func`` default runs it."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main", "build_parser"]

# subcommand -> module providing add_parser(subparsers)
_SUBCOMMANDS = {
    "calibrate": "amct_hf.calibrate_cli",
    "eval": "amct_hf.evaluate",
    "export": "amct_hf.export",
    "report": "amct_hf.report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-hf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue  # subcommand not built yet
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .record import RecordFileError
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, RecordFileError) as err:
        # user-facing errors: one clear line, no traceback
        print(f"amct-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
