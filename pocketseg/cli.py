"""The ``pocketseg`` command line: a thin layer over the package's public functions.

Every flag of a subcommand is a keyword argument of the function it calls, so
``pocketseg X --help`` documents the Python API too (the arguments themselves
are defined in :mod:`pocketseg.commands`). Errors about user input are printed
as one line (``pocketseg: error: ...``) with exit status 2.

The CLI sits on top of every room. It imports the training room and the
exporter only when their command runs, because they need torch, an optional
dependency that inference installs (and the Jetson image) do not have.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pocketseg.benchmarks.backends import benchmark_backends
from pocketseg.benchmarks.bench import run_bench
from pocketseg.benchmarks.report import BACKEND_COLUMNS, bench_table_markdown, markdown_table, write_demo_report
from pocketseg.commands import build_parser
from pocketseg.deploy.doctor import diagnose, format_report
from pocketseg.engine_build.tensorrt_build import build_package_engines
from pocketseg.errors import PocketsegError, require
from pocketseg.evaluation.evaluate import evaluate_folders, format_table, label_scoring
from pocketseg.imageio import volume_info
from pocketseg.runtime.distributed import predict_ray
from pocketseg.runtime.predict import predict
from pocketseg.signing import generate_keys, sign_package
from pocketseg.synth.dataset import synthesize_dataset

__all__ = ["build_parser", "main"]

log = logging.getLogger("pocketseg")

# Options that steer the CLI itself rather than the called function.
_CLI_ONLY = {"command", "verbose", "quiet", "json"}


def _cmd_synth(args: argparse.Namespace) -> int:
    out = synthesize_dataset(**_kwargs(args), progress=not args.quiet)
    print(out)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = volume_info(**_kwargs(args))
    if args.json:
        print(json.dumps(info))
    elif "series" in info:
        print(f"{info['path']}: DICOM study tree, {len(info['series'])} image series")
        for s in info["series"]:
            what = f"skipped: {s['skipped']}" if s["skipped"] else f"case {s['case']}"
            print(f"  {s['folder']}  series {s['series_number']}  {s['modality'] or '?'}  "
                  f"{s['description'] or '(no description)'!r}  {s['n_files']} file(s)  {what}")
    else:
        sp = " x ".join(f"{s:g}" for s in info["spacing_mm"])
        print(f"{info['path']}\n  shape        {' x '.join(map(str, info['shape']))} (i, j, k)\n"
              f"  spacing      {sp} mm\n  orientation  {info['orientation']}{' (oblique)' if info['oblique'] else ''}\n"
              f"  dtype        {info['dtype']}\n  range        {info['min']:g} .. {info['max']:g}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    require("torch", "Network presets", "train")
    from pocketseg.trainer.presets import model_info  # needs torch (see the module docstring)

    rows = model_info(**_kwargs(args))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'preset':<12} {'stage':<7} {'params':>10} {'GFLOP/patch':>12}  {'spacing mm (z,y,x)':<20} {'patch (z,y,x)':<15} description")
    for r in rows:
        sp = "x".join(f"{v:g}" for v in r["spacing_mm_zyx"])
        patch = "x".join(map(str, r["patch_zyx"]))
        gflops = f"{r['gflops_per_patch']:.1f}" if "gflops_per_patch" in r else "-"
        print(f"{r['name']:<12} {r['stage']:<7} {r['params'] / 1e6:>9.3f}M {gflops:>12}  {sp:<20} {patch:<15} {r['description']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    require("torch", "Training", "train")
    from pocketseg.trainer.train import train  # needs torch

    out = train(**_kwargs(args), progress=not args.quiet)
    print(out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    require("torch", "Export", "export")
    from pocketseg.trainer.package import export_package  # needs torch

    print(export_package(**_kwargs(args)))
    return 0


def _cmd_import_nnunet(args: argparse.Namespace) -> int:
    require("torch", "Importing nnU-Net models", "export")
    from pocketseg.engine_build.nnunet_import import import_nnunet  # needs torch

    kwargs = _kwargs(args)
    folds = kwargs.pop("folds")
    print(import_nnunet(**kwargs, folds=None if folds is None else (folds[0] if folds == ["all"] else folds)))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    private, public = generate_keys(**_kwargs(args))
    print(private)
    print(public)
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    print(sign_package(**_kwargs(args)))
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    manifest = build_package_engines(**_kwargs(args), progress=not args.quiet)
    for stage in manifest.stages.values():
        for engine in stage.engines:
            print(f"{stage.name}: {engine.file} (TensorRT {engine.tensorrt_version}, sm {engine.compute_capability})")
    return 0


#: predict's options that only a --ray run takes, with the value that means "not given".
_RAY_ONLY = {"workers": ("--workers", None), "cpus_per_worker": ("--cpus-per-worker", None),
             "retries": ("--retries", None)}


def _cmd_predict(args: argparse.Namespace) -> int:
    kwargs = _kwargs(args)
    address = kwargs.pop("ray")
    if address is None:
        used = [flag for key, (flag, unset) in _RAY_ONLY.items() if kwargs.pop(key) != unset]
        if used:
            raise PocketsegError(f"{', '.join(used)}: only with --ray")
        written = predict(**kwargs, progress=not args.quiet)
    else:
        if kwargs.pop("series_uid") is not None:
            raise PocketsegError("--series-uid: not with --ray (each DICOM series folder is a case of its own)")
        if kwargs["retries"] is None:
            kwargs.pop("retries")
        written = predict_ray(**kwargs, ray=address, progress=not args.quiet)
    for path in written:
        print(path)
    if not written:
        print("nothing written by this run: every case was finished earlier (--continue) or by another run",
              file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    summary = evaluate_folders(**_kwargs(args), progress=not args.quiet)
    print(format_table(summary, label_scoring(args.labels, args.tolerance_mm)), end="")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    report = diagnose(**_kwargs(args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    kwargs = _kwargs(args)
    backends = kwargs.pop("backends")
    if backends:
        # Flags of the timing run that the backend table has no use for: refused, not silently ignored.
        timing_only = {"backend": ("--backend", "auto"), "precision": ("--precision", "auto"),
                       "compare": ("--compare", None), "cold": ("--no-cold", True), "warm": ("--no-warm", True)}
        used = [flag for key, (flag, default) in timing_only.items() if kwargs.pop(key) != default]
        if used:
            raise PocketsegError(f"{', '.join(used)}: not used by --backends (every backend x precision is a row)")
        result = benchmark_backends(**kwargs, progress=not args.quiet)
        print(markdown_table(result["rows"], BACKEND_COLUMNS), end="")
    else:
        result = run_bench(**kwargs, progress=not args.quiet)
        print(bench_table_markdown(result), end="")
    for path in result["files"].values():
        print(path)
    return 0


def _cmd_demo_report(args: argparse.Namespace) -> int:
    print(write_demo_report(**_kwargs(args)))
    return 0


def _cmd_selftrain(args: argparse.Namespace) -> int:
    require("torch", "Self-training", "train")
    from pocketseg.trainer.selftrain import parse_shard, selftrain  # needs torch

    work = selftrain(**_kwargs(args), progress=not args.quiet)
    if parse_shard(args.shard)[0] == 0:
        print(work / "report.md")
    return 0


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _CLI_ONLY}


#: Subcommand -> the function that runs it.
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": _cmd_synth, "info": _cmd_info, "model-info": _cmd_model_info, "train": _cmd_train,
    "export": _cmd_export, "import-nnunet": _cmd_import_nnunet, "keygen": _cmd_keygen, "sign": _cmd_sign,
    "build-engine": _cmd_build_engine, "predict": _cmd_predict, "evaluate": _cmd_evaluate,
    "doctor": _cmd_doctor, "bench": _cmd_bench, "demo-report": _cmd_demo_report, "selftrain": _cmd_selftrain,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handler = HANDLERS[args.command]
    try:
        return handler(args)
    except PocketsegError as exc:
        print(f"pocketseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocketseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`pocketseg info ... | head`): nothing more to say. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again; 141 is what a shell reports
        # for a program ended by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # what the operating system refused (permissions, a full disk ...), in one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pocketseg: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
