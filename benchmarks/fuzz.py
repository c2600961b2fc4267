"""The long fuzz run: every property of :mod:`pocketseg.benchmarks.fuzz_cases` with many more inputs.

Run as ``python -m pocketseg.benchmarks.fuzz [--examples 2000] [--properties nifti,dicom,manifest,predict]
[--model PKG_DIR] [--random]``. The test suite runs the same properties with a few dozen inputs each
(``tests/test_fuzz_cases.py``); this is the profile that searches longer. Derandomised by default, so a
run is reproducible; ``--random`` draws new inputs every run. The ``predict`` property needs a model
package (``--model``; a tiny untrained one is fine, its labels are not judged) and is left out without one.
A failure prints hypothesis's minimal failing input and ends with exit status 1.

hypothesis is a test dependency (``pip install "pocketseg[test]"``); without it the run says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from pocketseg.errors import MissingDependencyError, require

log = logging.getLogger("pocketseg.benchmarks.fuzz")

PROPERTY_NAMES = ("nifti", "dicom", "manifest", "predict")


def run(properties: Sequence[str], examples: int, *, model: Path | None = None, derandomize: bool = True
        ) -> list[dict]:
    """Run each property with ``examples`` inputs; one row per property: name, examples, seconds, result."""
    require("hypothesis", "The fuzz benchmark", "test")
    from pocketseg.benchmarks.fuzz_cases import PROPERTIES, run_property  # hypothesis (test extra) at its top

    rows = []
    for name in properties:
        prop = PROPERTIES[name]
        if prop.needs_package and model is None:
            rows.append({"property": name, "examples": 0, "seconds": 0.0, "result": "skipped: needs --model"})
            continue
        if prop.needs and importlib.util.find_spec(prop.needs) is None:
            rows.append({"property": name, "examples": 0, "seconds": 0.0, "result": f"skipped: needs {prop.needs}"})
            continue
        t0 = time.perf_counter()
        try:
            run_property(name, examples, package=model, derandomize=derandomize)
            result = "passed"
        except Exception as exc:  # the property failed: hypothesis raised the minimal example's exception
            traceback.print_exception(exc)
            result = f"FAILED: {type(exc).__name__}"
        rows.append({"property": name, "examples": examples, "seconds": round(time.perf_counter() - t0, 1),
                     "result": result})
        log.info("%s: %s in %.1f s", name, result, rows[-1]["seconds"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketseg.benchmarks.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per property [2000]")
    parser.add_argument("--properties", default=",".join(PROPERTY_NAMES),
                        help=f"comma-separated subset of {','.join(PROPERTY_NAMES)} [all]")
    parser.add_argument("--model", type=Path, default=None, help="model package for the predict property")
    parser.add_argument("--random", action="store_true", help="new random inputs every run (not derandomised)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.properties.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PROPERTY_NAMES))
    if unknown or args.examples < 1:
        parser.error(f"unknown properties {unknown}" if unknown else "--examples must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The inputs are broken on purpose: the readers' warnings about them (nibabel fixing a code) are noise here.
    quiet = {name: logging.getLogger(name) for name in ("nibabel", "pocketseg")}
    levels = {name: logger.level for name, logger in quiet.items()} | {log.name: log.level}
    for logger in quiet.values():
        logger.setLevel(logging.ERROR)
    log.setLevel(logging.INFO)
    try:
        rows = run(names, args.examples, model=args.model, derandomize=not args.random)
    except MissingDependencyError as exc:
        print(f"pocketseg.benchmarks.fuzz: error: {exc}", file=sys.stderr)
        return 2
    finally:  # as they were, for callers in the same process
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    print("| property | examples | seconds | result |\n|:--|--:|--:|:--|")
    for row in rows:
        print(f"| {row['property']} | {row['examples']} | {row['seconds']} | {row['result']} |")
    return 1 if any(row["result"].startswith("FAILED") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
