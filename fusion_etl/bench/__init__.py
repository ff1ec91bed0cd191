"""Benchmarks: speed and size targets, measured side by side in one run, printed as ratios.

    fusion-etl bench extract [--size demo|test] [--docs N]
    fusion-etl bench align [--size demo|test] [--docs N]
    fusion-etl bench train [--size demo|test] [--steps N]
    fusion-etl bench quality --mode table7|hetero [--seeds 0,1,2]
    fusion-etl bench pipeline [--size demo|test] [--repeats N] [--factor N]

One module per benchmark (`fusion_etl.bench.<name>`), each adding its own subcommand. A
baseline is always the real thing it stands for, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

from fusion_etl.errors import UserError
from fusion_etl.redaction import scrub

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from fusion_etl.bench import align, extract, pipeline, quality, train

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fusion-etl bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    for module in (extract, align, train, pipeline, quality):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except UserError as exc:
        # A bad option or input is one line, as in every other command.
        print(scrub("error: " + " ".join(str(exc).split())), file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
