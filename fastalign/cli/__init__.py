"""Command line: one module per command group, each with ``register(subparsers)``."""
import argparse
import importlib
import sys

# Each entry is a module of fastalign.cli with register(subparsers); new command groups add a line here.
COMMANDS = ("info", "train", "afd", "weights", "averaging", "diagnose")


def build_parser():
    p = argparse.ArgumentParser(prog="fastalign", description="Fast, lean preference optimization.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fastalign.cli.{name}").register(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from fastalign.config import ConfigError
    from fastalign.checkpoint import RunStateError
    from fastalign.data import DataError
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"fastalign: error: {exc}", file=sys.stderr)
        return 2
    except RunStateError as exc:  # another run holds the folder, resume mismatch, full disk, unsafe checkpoint
        print(f"fastalign: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
