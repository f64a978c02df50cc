"""Command line: ``ntk-diag report RUN_DIR`` (also ``python -m ntk_diag``)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ntk-diag",
      description="Lazy-training diagnostics for Flax. Reads the TensorBoard event files "
                  "written by ntk_diag.LazyTrainingHook.")
  commands = parser.add_subparsers(dest="command", required=True)
  report = commands.add_parser(
      "report", help="Write PNG plots and a Markdown summary of a run.",
      description="Reads every run (directory with event files) under RUN_DIR and writes PNG plots "
                  "of kappa, kernel drift, twin gap and weight change vs step, the NTK spectrum at "
                  "the last snapshot, and report.md with first/last values of every metric.")
  report.add_argument("run_dir", metavar="RUN_DIR", help="Directory holding the hook's event files (searched recursively).")
  report.add_argument("--out", default=None, help="Output directory (default: RUN_DIR/report).")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "report":
    from ntk_diag import report
    try:
      path = report.write_report(args.run_dir, args.out)
    except ValueError as error:
      print(f"ntk-diag report: {error}", file=sys.stderr)
      return 2
    print(f"Wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
