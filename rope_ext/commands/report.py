"""``rope-ext report RUN_DIR``: Markdown tables, CSV and PNG plots from a run directory's results."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write the report (Markdown, CSV, PNG) of an eval run directory",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `rope-ext eval`")
    parser.add_argument("--repair", action="store_true", help="drop damaged records from results.jsonl (after naming them) instead of stopping")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rope_ext.eval.report import write_report

    print(write_report(args.run_dir, repair=args.repair))
    return 0
