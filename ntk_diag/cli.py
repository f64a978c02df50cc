"""Command line: ``ntk-diag report RUN_DIR`` and ``ntk-diag compare WORKDIR`` (also ``python -m ntk_diag``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any

COMPARE_HELP = """\
The model comes from --model MODULE:FACTORY, a callable returning apply_fn or (apply_fn,
params_like) (called with --model-kwargs, a JSON object); MODULE is an importable module
(the current directory is on the path) or a path to a .py file. Parameters are .npz files
keyed by dotted leaf names (write them with ntk_diag.params_io.save_params). θ0 is restored
from the hook's WORKDIR. Data: --data FILE.npz with arrays x_train, y_train, x_test, y_test,
or --dataset NAME (ntk_diag.datasets.load_numpy, features as stored). Integer labels become
one-hot targets for --loss mse.
"""


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
                  "the last snapshot, and report.md with a verdict per run (lazy, drifting or "
                  "feature learning) and first/last values of every metric. With --params (and "
                  "--model, --data or --dataset) it adds the comparison of `ntk-diag compare`, "
                  "with θ0 from --workdir (default RUN_DIR).",
      epilog=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  report.add_argument("run_dir", metavar="RUN_DIR", help="Directory holding the hook's event files (searched recursively).")
  report.add_argument("--out", default=None, help="Output directory (default: RUN_DIR/report).")
  report.add_argument("--workdir", default=None, help="The hook's workdir holding θ0 (default: RUN_DIR).")
  _add_comparison_arguments(report, required=False)

  compare = commands.add_parser(
      "compare", help="Compare the trained network with its twin and the NTK kernel predictor.",
      description="Prints the table of ntk_diag.compare: test loss, accuracy, argmax agreement "
                  "and function-space distance of the network, its lockstep linearized twin "
                  "(--twin-params), the kernel predictor at t = --steps and, for mse, the kernel "
                  "interpolator (t = ∞).",
      epilog=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  compare.add_argument("workdir", metavar="WORKDIR", help="The hook's workdir (θ0 is restored from it).")
  compare.add_argument("--out", default=None, help="Also write the table as Markdown to this file.")
  _add_comparison_arguments(compare, required=True)
  return parser


def _add_comparison_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
  group = parser.add_argument_group("comparison with the kernel regime")
  group.add_argument("--params", required=required, help="Trained parameters θ (.npz).")
  group.add_argument("--model", required=False, help="MODULE:FACTORY building apply_fn.")
  group.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of FACTORY.")
  group.add_argument("--twin-params", default=None, help="Parameters of the lockstep twin (.npz).")
  group.add_argument("--data", default=None, help=".npz with x_train, y_train, x_test, y_test.")
  group.add_argument("--dataset", default=None, help="A dataset name for ntk_diag.datasets.load_numpy.")
  group.add_argument("--data-dir", default=None, help="TFDS data_dir for --dataset.")
  group.add_argument("--num-train", type=int, default=None, help="Use the first N training examples.")
  group.add_argument("--num-test", type=int, default=None, help="Use the first M test examples.")
  group.add_argument("--loss", default="mse", choices=("mse", "softmax_cross_entropy"))
  group.add_argument("--learning-rate", type=float, default=None, help="The optimiser's learning rate.")
  group.add_argument("--steps", type=float, default=None, help="Optimiser steps taken.")
  group.add_argument("--momentum", type=float, default=0.0, help="SGD momentum β.")
  group.add_argument("--batch-size", type=int, default=None, help="Batch size (for --reduction sum).")
  group.add_argument("--reduction", default="mean", choices=("mean", "sum"),
                     help="How the training loss was reduced over a batch.")


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "report":
      from ntk_diag import report
      comparison = None
      if args.params is not None:
        comparison = run_comparison(args, args.workdir or args.run_dir)
      path = report.write_report(args.run_dir, args.out, comparison=comparison)
      print(f"Wrote {path}")
    elif args.command == "compare":
      comparison = run_comparison(args, args.workdir)
      print(comparison)
      if args.out:
        with open(args.out, "w") as f:
          f.write(comparison.to_markdown())
        print(f"Wrote {args.out}")
  except (ValueError, TypeError, FileNotFoundError) as error:
    print(f"ntk-diag {args.command}: {error}", file=sys.stderr)
    return 2
  return 0


def run_comparison(args: argparse.Namespace, workdir: str):
  """:func:`ntk_diag.compare` on the inputs named by the command-line arguments."""
  import numpy as np

  from ntk_diag import _model
  from ntk_diag import params_io
  from ntk_diag.compare import compare

  if args.model is None:
    raise ValueError("--model MODULE:FACTORY is required with --params.")
  if (args.data is None) == (args.dataset is None):
    raise ValueError("Pass exactly one of --data FILE.npz and --dataset NAME.")
  apply_fn, like = _build_model(args.model, json.loads(args.model_kwargs))
  params = params_io.load_params(args.params, like=like)
  twin_params = None
  if args.twin_params is not None:
    twin_params = params_io.load_params(args.twin_params, like=params)
  x_train, y_train, x_test, y_test = _load_data(args)
  if args.loss == "mse":
    out_shape = _model.example_output_shape(apply_fn, params, x_train)
    one_hot = lambda y: np.eye(out_shape[-1], dtype=np.float32)[y] if (
        np.issubdtype(y.dtype, np.integer) and y.ndim == 1 and out_shape and out_shape[-1] > 1) else y
    y_train, y_test = one_hot(y_train), one_hot(y_test)
  return compare(apply_fn, workdir, params, x_train, y_train, x_test, y_test, loss=args.loss,
                 twin_params=twin_params, learning_rate=args.learning_rate, steps=args.steps,
                 momentum=args.momentum, batch_size=args.batch_size, reduction=args.reduction)


def _build_model(spec: str, kwargs: dict[str, Any]):
  """``(apply_fn, params_like or None)`` from ``MODULE:FACTORY``."""
  module_name, sep, attr = spec.rpartition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"--model must be MODULE:FACTORY (or path/to/file.py:FACTORY); got {spec!r}.")
  if module_name.endswith(".py"):
    if not os.path.isfile(module_name):
      raise ValueError(f"--model: no file {module_name!r}.")
    name = "ntk_diag_cli_model_" + os.path.splitext(os.path.basename(module_name))[0]
    module_spec = importlib.util.spec_from_file_location(name, module_name)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # flax dataclasses resolve annotations through it
    module_spec.loader.exec_module(module)
  else:
    if os.getcwd() not in sys.path:
      sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise ValueError(f"--model: {module_name} has no callable {attr!r}.")
  built = factory(**kwargs)
  if isinstance(built, tuple) and len(built) == 2 and callable(built[0]):
    return built
  if callable(built):
    return built, None
  raise TypeError(f"--model: {spec} must return apply_fn or (apply_fn, params); got {type(built).__name__}.")


def _load_data(args: argparse.Namespace):
  import numpy as np

  if args.data is not None:
    with np.load(args.data) as data:
      missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data.files]
      if missing:
        raise ValueError(f"--data {args.data!r} lacks arrays {missing}; it has {data.files}.")
      x_train, y_train, x_test, y_test = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
  else:
    from ntk_diag.datasets import load_numpy
    x_train, y_train = load_numpy(args.dataset, split="train", data_dir=args.data_dir)
    x_test, y_test = load_numpy(args.dataset, split="test", data_dir=args.data_dir)
  train, test = slice(args.num_train), slice(args.num_test)
  return x_train[train], y_train[train], x_test[test], y_test[test]


if __name__ == "__main__":
  sys.exit(main())
