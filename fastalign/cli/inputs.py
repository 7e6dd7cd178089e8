"""Checks the research commands (weights, merge, tax, diagnose, afd, sample, best-of-n) share: number options
refused at parse time (argparse names the option), and report folders held by one run and never overwritten by
accident."""
import argparse
import contextlib
import math
import os


def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def positive_int(text):
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text):
    """An integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text):
    """A finite number > 0."""
    value = _number(text, float)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def unit_interval(text):
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def accuracy_threshold(text):
    """A reward accuracy in (0, 1]."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a reward accuracy in (0, 1], got {text!r}")
    return value


def add_overwrite_flag(parser, outputs):
    parser.add_argument("--overwrite-output-dir", dest="overwrite_output_dir", action="store_true",
                        help=f"replace the report ({', '.join(outputs)}) of an earlier run in --output-dir "
                        "(default: refuse a folder that holds one)")


@contextlib.contextmanager
def report_folder(output_dir, outputs, *, overwrite=False, option="--output-dir"):
    """Hold ``output_dir`` for one run (``OutputDirLock``: a second run into it is refused while this one lasts)
    and refuse a folder that already holds one of ``outputs`` (file names) unless ``overwrite``, which deletes
    them first (so no file of the earlier report is left beside the new one)."""
    from fastalign.trainers.runlog import OutputDirLock
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"{option} {output_dir!r} is a file; expected a folder for the report")
    created = not os.path.exists(output_dir)
    try:
        with OutputDirLock(output_dir):
            found = [n for n in outputs if os.path.exists(os.path.join(output_dir, n))]
            if found and not overwrite:
                raise FileExistsError(f"{option} {output_dir} already holds the report of an earlier run "
                                      f"({', '.join(found)}); pass another {option}, or --overwrite-output-dir to "
                                      "replace it")
            for name in found:
                os.remove(os.path.join(output_dir, name))
            yield output_dir
    except BaseException:
        if created:  # a run that failed leaves no empty folder of its own behind
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)
        raise
