"""Command line: one module per command group, each with ``register(subparsers)``.

Errors caused by the user's input (``fastalign.errors.FastalignError`` and the ValueError / OSError family
raised for bad options, data, models and paths) print ``fastalign: error: ...`` and exit with status 2;
``--debug`` (anywhere on the command line) or FASTALIGN_DEBUG=1 shows the traceback instead.
"""
import argparse
import importlib
import os
import sys

# Each entry is a module of fastalign.cli with register(subparsers); new command groups add a line here.
COMMANDS = ("info", "train", "afd", "weights", "averaging", "diagnose", "bench")


DESCRIPTION = ("Fast, lean preference optimization for Hugging Face causal LMs: DPO-family, SimPO, ORPO, reward "
               "models and SFT on fused kernels that never materialize the logits.")
EXIT_USER_ERROR = 2


def _version():
    from fastalign import __version__
    return f"fastalign {__version__}"


def _add_debug_flag(parser, top=False):
    """--debug on the top parser and every sub-command's (so it may follow the sub-command too)."""
    if "--debug" not in parser._option_string_actions:  # a command may define its own
        parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                            help="on an error, show the full traceback instead of one line")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def build_parser():
    p = argparse.ArgumentParser(prog="fastalign", description=DESCRIPTION,
                                epilog="`fastalign <command> --help` describes each command's options.")
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS:
        importlib.import_module(f"fastalign.cli.{name}").register(sub)
    _add_debug_flag(p, top=True)
    return p


def user_errors():
    """The exception types that mean bad input (not a bug in fastalign): reported in one line, exit 2."""
    from fastalign.errors import FastalignError
    kinds = [FastalignError, ValueError, OSError]  # OSError: missing files, permissions, a full disk
    for module, name in (("fastalign.config", "ConfigError"), ("fastalign.data", "DataError")):
        try:
            kinds.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fastalign.checkpoint import RunStateError
    debug = getattr(args, "debug", False) or os.environ.get("FASTALIGN_DEBUG", "0") == "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("fastalign: interrupted", file=sys.stderr)
        return 130
    except RunStateError as exc:  # another run holds the folder, resume mismatch, full disk, unsafe checkpoint
        if debug:
            raise
        print(f"fastalign: error: {exc}", file=sys.stderr)
        return 1
    except user_errors() as exc:
        if debug:
            raise
        print(f"fastalign: error: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
