"""Mutation testing: does the test suite notice plausible bugs in the package?

Each mutant in ``tests/mutants/mutants.toml`` replaces one exact snippet of package
code with a plausible wrong version (wrong normalisation, off-by-one step,
dropped term, swapped sign, mean vs sum, unbounded tiling, ...) and names the
tests that should catch it. For every mutant this script

1. copies the repository (tracked and untracked, non-ignored files; no
   ``.venv``) to a temporary directory,
2. applies the replacement; a snippet not found exactly once makes the mutant
   STALE (the code moved: update the list),
3. runs the named tests there with ``python -m pytest -x -q`` (the copy's
   ``ntk_diag`` is imported: checked once against the pristine copy),
4. reports KILLED (a test failed), SURVIVED (all passed) or TIMEOUT.

A baseline run of every named test on the unmutated copy must pass first,
so a failure can be blamed on the mutant. The kill rate is
``killed / (killed + survived)``; timeouts count as killed, stale mutants
not at all (they are listed, and make the exit status nonzero).

Usage::

  python tests/mutants/mutants.py [--jobs 2] [--only ID[,ID...]] [--file ntk.py]
                          [--list] [--check] [--no-baseline] [--timeout 900]
                          [--json out.json]

``--check`` only reports stale mutants (no tests run): run it after moving code.

``make mutants`` runs it with the project's virtual environment. It takes
several minutes and is not part of ``make test`` or CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mutants.toml")
# Kill rate below which the run fails (the target of issue 14).
TARGET = 0.9


@dataclasses.dataclass(frozen=True)
class Mutant:
  id: str
  file: str
  description: str
  original: str
  replacement: str
  tests: tuple[str, ...]


@dataclasses.dataclass
class Outcome:
  mutant: Mutant
  status: str  # KILLED, SURVIVED, TIMEOUT, STALE, ERROR
  seconds: float
  detail: str = ""


def load(path: str = LIST) -> list[Mutant]:
  with open(path, "rb") as f:
    data = tomllib.load(f)
  mutants, seen = [], set()
  for entry in data["mutant"]:
    mutant = Mutant(id=entry["id"], file=entry["file"], description=entry["description"],
                    original=entry["original"], replacement=entry["replacement"],
                    tests=tuple(entry["tests"]))
    if mutant.id in seen:
      raise ValueError(f"duplicate mutant id {mutant.id!r} in {path}")
    if mutant.original == mutant.replacement:
      raise ValueError(f"mutant {mutant.id!r}: replacement equals the original")
    if not mutant.tests:
      raise ValueError(f"mutant {mutant.id!r} names no tests")
    seen.add(mutant.id)
    mutants.append(mutant)
  return mutants


def repo_files(root: str = ROOT) -> list[str]:
  """Tracked and untracked files that git does not ignore (so new tests count too)."""
  out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=root, capture_output=True, check=True).stdout
  files = [f for f in out.decode().split("\0") if f]
  return [f for f in files if os.path.isfile(os.path.join(root, f))]


def make_copy(files: list[str], dest: str, source: str = ROOT) -> None:
  for rel in files:
    target = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(source, rel), target)


def environment(copy: str) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = copy + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  env["COLUMNS"] = "400"  # pytest's summary lines keep the exception and its message
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return env


def pytest_command(tests: tuple[str, ...], workers: int = 0) -> list[str]:
  command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
  if workers > 1:
    command += ["-n", str(workers)]
  return command + list(tests)


def stale_reason(mutant: Mutant, root: str) -> str | None:
  """Why the mutant cannot be applied in ``root`` (None if it can)."""
  path = os.path.join(root, mutant.file)
  if not os.path.isfile(path):
    return f"{mutant.file} does not exist"
  with open(path, encoding="utf-8") as f:
    count = f.read().count(mutant.original)
  if count != 1:
    return f"original snippet found {count} times in {mutant.file} (expected once)"
  return None


def apply(mutant: Mutant, copy: str) -> str | None:
  """Applies the mutant in ``copy``; returns why it is stale, or None."""
  stale = stale_reason(mutant, copy)
  if stale:
    return stale
  path = os.path.join(copy, mutant.file)
  with open(path, encoding="utf-8") as f:
    source = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(source.replace(mutant.original, mutant.replacement))
  return None


def check_import_location(copy: str) -> None:
  """The tests in a copy must import the copy's package, not the installed one."""
  out = subprocess.run([sys.executable, "-c", "import ntk_diag; print(ntk_diag.__file__)"],
                       cwd=copy, env=environment(copy), capture_output=True, text=True,
                       check=True).stdout.strip()
  if not os.path.realpath(out).startswith(os.path.realpath(copy) + os.sep):
    raise SystemExit(f"the copy imports ntk_diag from {out}, not from {copy}: aborting")


def run_mutant(mutant: Mutant, files: list[str], pristine: str, timeout: float) -> Outcome:
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as copy:
    make_copy(files, copy, pristine)
    stale = apply(mutant, copy)
    if stale:
      return Outcome(mutant, "STALE", time.monotonic() - start, stale)
    try:
      result = subprocess.run(pytest_command(mutant.tests), cwd=copy, env=environment(copy),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return Outcome(mutant, "TIMEOUT", time.monotonic() - start, f"> {timeout:.0f} s")
  seconds = time.monotonic() - start
  tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
  if result.returncode == 0:
    return Outcome(mutant, "SURVIVED", seconds, tail[0])
  if result.returncode in (1, 2):  # test failures, or a collection error caused by the mutant
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return Outcome(mutant, "KILLED", seconds, (failed or tail)[0][:300])
  return Outcome(mutant, "ERROR", seconds, f"pytest exit status {result.returncode}: {tail[0]}")


def baseline(mutants: list[Mutant], files: list[str], pristine: str, jobs: int,
             timeout: float) -> None:
  tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
  print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as copy:
    make_copy(files, copy, pristine)
    check_import_location(copy)
    result = subprocess.run(pytest_command(tests, workers=jobs), cwd=copy, env=environment(copy),
                            capture_output=True, text=True, timeout=timeout * 2)
  if result.returncode != 0:
    print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
    raise SystemExit("baseline failed: the named tests must pass on the unmutated code")
  print(f"baseline passed in {time.monotonic() - start:.0f} s", flush=True)


def report(outcomes: list[Outcome]) -> float:
  counts = {s: sum(o.status == s for o in outcomes)
            for s in ("KILLED", "TIMEOUT", "SURVIVED", "STALE", "ERROR")}
  killed = counts["KILLED"] + counts["TIMEOUT"]
  scored = killed + counts["SURVIVED"]
  rate = killed / scored if scored else 0.0
  # The table of docs/testing.md.
  print("\n| mutant | file | the bug | caught by | result |\n|---|---|---|---|---|")
  names = {"KILLED": "killed", "TIMEOUT": "killed (timeout)", "SURVIVED": "**survived**"}
  for o in outcomes:
    m = o.mutant
    tests = ", ".join(t.removeprefix("tests/") for t in m.tests)
    print(f"| `{m.id}` | `{m.file.removeprefix('ntk_diag/')}` | {m.description.replace('|', '/')}"
          f" | {tests} | {names.get(o.status, o.status)} |")
  print(f"\nkilled {killed} / {scored} = {100 * rate:.1f} % "
        f"(survived {counts['SURVIVED']}, timeout {counts['TIMEOUT']}, stale {counts['STALE']}, "
        f"error {counts['ERROR']})")
  for o in outcomes:
    if o.status in ("SURVIVED", "STALE", "ERROR"):
      print(f"  {o.status}: {o.mutant.id}: {o.mutant.description} [{o.detail}]")
  return rate


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel")
  parser.add_argument("--only", default="", help="comma-separated mutant ids")
  parser.add_argument("--file", default="", help="only mutants of files ending with this")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--check", action="store_true", help="report stale mutants and exit")
  parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
  parser.add_argument("--json", default="", help="write the outcomes to this file")
  args = parser.parse_args(argv)

  mutants = load()
  if args.only:
    wanted = set(args.only.split(","))
    unknown = wanted - {m.id for m in mutants}
    if unknown:
      raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
    mutants = [m for m in mutants if m.id in wanted]
  if args.file:
    mutants = [m for m in mutants if m.file.endswith(args.file)]
  if args.list:
    for m in mutants:
      print(f"{m.id:45s} {m.file:24s} {m.description}")
    return 0

  if args.check:
    stale = [(m, why) for m in mutants if (why := stale_reason(m, ROOT))]
    for m, why in stale:
      print(f"STALE {m.id}: {why}")
    print(f"{len(mutants) - len(stale)} of {len(mutants)} mutants apply")
    return 1 if stale else 0

  files = repo_files()
  outcomes = []
  # One snapshot of the working tree: edits made while the mutants run do not leak in.
  with tempfile.TemporaryDirectory(prefix="mutant-pristine-") as pristine:
    make_copy(files, pristine)
    if args.no_baseline:
      check_import_location(pristine)
    else:
      baseline(mutants, files, pristine, args.jobs, args.timeout)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
      futures = [pool.submit(run_mutant, m, files, pristine, args.timeout) for m in mutants]
      for future in concurrent.futures.as_completed(futures):
        outcome = future.result()
        outcomes.append(outcome)
        print(f"[{len(outcomes)}/{len(mutants)}] {outcome.status:8s} {outcome.mutant.id} "
              f"({outcome.seconds:.0f} s) {outcome.detail}", flush=True)
  order = {m.id: i for i, m in enumerate(mutants)}
  outcomes.sort(key=lambda o: order[o.mutant.id])
  rate = report(outcomes)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump([dict(id=o.mutant.id, file=o.mutant.file, status=o.status,
                      seconds=round(o.seconds, 1), detail=o.detail) for o in outcomes], f, indent=1)
  bad = any(o.status in ("STALE", "ERROR") for o in outcomes)
  return 0 if rate >= TARGET and not bad else 1


if __name__ == "__main__":
  sys.exit(main())
