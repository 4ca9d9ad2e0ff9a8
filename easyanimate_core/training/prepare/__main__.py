"""``python -m easyanimate_core.training.prepare SRC --out DATASET [options]``: the prepare command on its own."""

import argparse
import sys

from .command import add_prepare_arguments, prepare_main


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run prepare; the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m easyanimate_core.training.prepare",
        description="Split, filter and caption a folder of videos into a training dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_prepare_arguments(parser)
    return prepare_main(parser.parse_args(argv))


# The guard matters: worker processes (forkserver / spawn) import this module again under another name.
if __name__ == "__main__":
    sys.exit(main())
