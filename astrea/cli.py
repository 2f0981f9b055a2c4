"""The ``astrea`` command line (also ``python -m astrea``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astrea", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled extension, and the backend of every op")
    args = parser.parse_args(argv)

    if args.command == "info":
        from astrea import info

        info.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
