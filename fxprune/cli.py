"""The ``fxprune`` command line, for build pipelines.

    fxprune prune MODEL --config CFG [--example-inputs SPEC] [--onnx OUT.onnx] [--report OUT.json] [--save OUT.pt2]
    fxprune prune HF_DIR --config CFG --out PRUNED_DIR [--calibration IDS.pt] [--format compressed-tensors]
    fxprune inspect [MODEL] [--example-inputs SPEC]
    fxprune validate OUT.onnx --model MODEL [--example-inputs SPEC]

MODEL is a ``torch.export`` archive (``.pt2``), ``pkg.module:factory`` (a callable returning an
``nn.Module`` or ``(module, example_inputs)``), or a built-in example (``mlp``, ``resnet``,
``resnet50``, ``bert-tiny``). HF_DIR is a Hugging Face model directory (config.json and safetensors
shards), pruned into PRUNED_DIR without loading the whole model. Exit codes: 0 ok, 1 validation failed, 2 bad usage, config, model or file,
3 internal error, 130 interrupted. Errors are one line and the fix; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
REPORT_FILE = "fxprune.report.json"  # extra file inside a saved .pt2
INSPECT_PATTERNS = ("1x1", "4x1", "1x4", "2x2", "8x8", "2:4", "1:4", "4:8", "1xchannel", "channelx1")


class UsageError(Exception):
    """Bad command-line input: one line, exit code 2."""


# ---------------------------------------------------------------------- models and inputs
def load_model(spec: str):
    """(model, example_inputs or None, description) for a MODEL argument."""
    from .examples import EXAMPLES

    if spec.endswith(".pt2"):
        return _load_pt2(Path(spec))
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"MODEL {spec!r}: cannot import {module_name!r} ({e}); check the module "
                             f"path and PYTHONPATH") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UsageError(f"MODEL {spec!r}: {module_name} has no callable {attr!r}; name a "
                             f"function that returns an nn.Module")
        return _unpack(factory(), spec)
    if spec in EXAMPLES:
        return _unpack(EXAMPLES[spec](), f"built-in example {spec!r}")
    raise UsageError(f"MODEL {spec!r} is not a .pt2 file, a pkg.module:factory or a built-in "
                     f"example ({', '.join(EXAMPLES)})")


def _unpack(made, source: str):
    import torch

    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
    if not isinstance(made, torch.nn.Module):
        raise UsageError(f"{source} returned {type(made).__name__}, not an nn.Module")
    return made, inputs, source


def _load_pt2(path: Path):
    import torch

    if not path.is_file():
        raise UsageError(f"MODEL file {str(path)!r} does not exist")
    extra = {REPORT_FILE: ""}
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs a traceback before raising: one line is ours
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise UsageError(f"MODEL file {str(path)!r} is not a torch.export archive "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                         f"save one with torch.export.save(torch.export.export(model, args), path)") from None
    finally:
        export_log.setLevel(level)
    inputs = None
    if getattr(program, "example_inputs", None) is not None:
        args, kwargs = program.example_inputs
        inputs = kwargs if kwargs and not args else tuple(args)
    model = program.module()
    if extra[REPORT_FILE]:
        from .report import SparsityReport, attach_report
        attach_report(model, SparsityReport.from_json(extra[REPORT_FILE]))
    return model, inputs, f"torch.export archive {path.name}"


_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "float64": "float64", "int64": "int64", "long": "int64",
           "int32": "int32", "bool": "bool"}
_SPEC = re.compile(r"^(\w+)\[([\d,\s]*)\](?:\{(-?\d+),(-?\d+)\})?$")


def parse_inputs(spec: str):
    """``--example-inputs``: a ``.pt`` file (torch.save of a tuple or dict), or ``;``-separated
    ``DTYPE[D0,D1,...]`` tensors; integers are drawn from [0, 100) or ``{LOW,HIGH}``."""
    import torch

    if spec.endswith((".pt", ".pth")):
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--example-inputs file {spec!r} does not exist")
        try:
            loaded = torch.load(path, weights_only=True)
        except Exception as e:
            raise UsageError(f"--example-inputs file {spec!r} could not be loaded ({e})") from None
        if isinstance(loaded, torch.Tensor):
            return (loaded,)
        if isinstance(loaded, list):
            return tuple(loaded)
        if isinstance(loaded, (tuple, dict)):
            return loaded
        raise UsageError(f"--example-inputs file {spec!r} holds {type(loaded).__name__}; save a tensor, "
                         f"a tuple of tensors or a dict of keyword tensors")
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _SPEC.match(part.replace(" ", ""))
        if not m or m.group(1) not in _DTYPES:
            raise UsageError(f"--example-inputs {part!r} is not DTYPE[D0,D1,...]; e.g. "
                             f"'float32[1,3,224,224]' or 'int64[1,128]{{0,30522}}' (dtypes: "
                             f"{', '.join(sorted(set(_DTYPES.values())))}), or a .pt file")
        dtype = getattr(torch, _DTYPES[m.group(1)])
        shape = [int(d) for d in m.group(2).split(",") if d]
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            low, high = (int(m.group(3)), int(m.group(4))) if m.group(3) else (0, 100)
            tensors.append(torch.randint(low, high, shape, generator=generator, dtype=dtype))
    if not tensors:
        raise UsageError("--example-inputs is empty; e.g. 'float32[1,3,224,224]'")
    return tuple(tensors)


def _inputs(args, loaded_inputs):
    return parse_inputs(args.example_inputs) if args.example_inputs else loaded_inputs


# ---------------------------------------------------------------------- commands
def cmd_prune(args) -> int:
    import fxprune
    from .progress import ProgressBar

    if Path(args.model).is_dir():
        return cmd_prune_checkpoint(args)
    for flag in ("out", "calibration"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} is for Hugging Face model directories; {args.model!r} is not a directory")
    if args.format != "safetensors":
        raise UsageError(f"--format is for Hugging Face model directories; {args.model!r} is not a directory")
    model, loaded_inputs, source = load_model(args.model)
    inputs = _inputs(args, loaded_inputs)
    for flag, value, suffix in (("--onnx", args.onnx, ".onnx"), ("--save", args.save, ".pt2"),
                                ("--report", args.report, ".json")):
        if value and not Path(value).suffix == suffix:
            raise UsageError(f"{flag} {value!r} should end in {suffix}")
        if value and not Path(value).resolve().parent.is_dir():
            raise UsageError(f"{flag} {value!r}: directory {str(Path(value).parent)!r} does not exist")
    if (args.onnx or args.save) and inputs is None:
        raise UsageError(f"--onnx/--save need example inputs and {source} has none; pass "
                         f"--example-inputs, e.g. 'float32[1,3,224,224]'")
    bar = ProgressBar(enabled=False if args.quiet or args.json else None)
    pruned = fxprune.transform(model, args.config, example_inputs=inputs, progress=bar)
    bar.close()
    if _rank() != 0:    # every rank holds the same result; rank 0 writes and prints it
        return EXIT_OK
    report = fxprune.sparsity_report(pruned)
    result, code = None, EXIT_OK
    if args.report:
        report.to_json(args.report)
    if args.save:
        _save_pt2(pruned, inputs, args.save, report)
    if args.onnx:
        from .export import ValidationError, to_onnx
        try:
            result = to_onnx(pruned, inputs, args.onnx, validate=not args.no_validate)
        except ValidationError as e:
            result, code = e.result, EXIT_VALIDATION
            if not args.json:
                print(f"fxprune: validation of {args.onnx} failed:\n{e}", file=sys.stderr)
    if args.json:
        out = {"model": source, "report": report.to_dict()}
        if result is not None:
            out["onnx"] = _result_dict(result)
        print(json.dumps(out, indent=2))
    elif not args.quiet:
        print(report)
        for flag, value in (("report", args.report), ("saved", args.save)):
            if value:
                print(f"{flag}: {value}")
        if result is not None and code == EXIT_OK:
            print(result)
    return code


def cmd_prune_checkpoint(args) -> int:
    import fxprune
    from .progress import ProgressBar

    if not args.out:
        raise UsageError(f"MODEL {args.model!r} is a directory: pass --out PRUNED_DIR for the pruned checkpoint")
    for flag in ("onnx", "save", "example_inputs"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} is not available when pruning a checkpoint "
                             f"directory; load the pruned directory and export it from Python")
    if args.report and not args.report.endswith(".json"):
        raise UsageError(f"--report {args.report!r} should end in .json")
    bar = ProgressBar(enabled=False if args.quiet or args.json else None)
    report = fxprune.prune_checkpoint(args.model, args.config, args.out, calibration=args.calibration,
                                      format=args.format, progress=bar)
    bar.close()
    if _rank() != 0:    # rank 0 writes the report and prints
        return EXIT_OK
    if args.report:
        report.to_json(args.report)
    if args.json:
        print(json.dumps({"model": args.model, "out": args.out, "format": args.format,
                          "report": report.to_dict()}, indent=2))
    elif not args.quiet:
        print(report)
        print(f"pruned checkpoint: {args.out}")
    return EXIT_OK


def _rank() -> int:
    from .distributed import rank
    return rank()


def _save_pt2(model, inputs, path, report) -> None:
    import torch
    from .inputs import split_inputs

    args, kwargs = split_inputs(inputs)
    try:
        program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise UsageError(f"--save {path!r}: torch.export could not export the pruned model "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); use --onnx "
                         f"or save the state_dict from Python") from None
    torch.export.save(program, path, extra_files={REPORT_FILE: report.to_json(indent=None)})


def _result_dict(result) -> dict:
    return {"path": str(result.path), "data_path": str(result.data_path) if result.data_path else None,
            "size": result.size, "passed": result.passed, "latency_ms": result.latency_ms,
            "checks": _checks_list(result.checks)}


def _checks_list(checks) -> list[dict]:
    return [{"name": c.name, "passed": c.passed, "figures": c.figures, "message": c.message}
            for c in checks]


def cmd_inspect(args) -> int:
    import fxprune
    from .config import PruningConfig
    from .registry import PATTERNS, registries

    if args.model is None:  # the registries only
        if args.json:
            print(json.dumps({"registries": registries()}, indent=2))
        else:
            _print_registries()
        return EXIT_OK
    model, loaded_inputs, source = load_model(args.model)  # a factory module may register patterns
    gm = fxprune.capture(model, _inputs(args, loaded_inputs))
    targets = list(gm.meta["fxprune_targets"].values())
    # the built-in examples, then every pattern registered under an exact name (user patterns)
    names = [*INSPECT_PATTERNS, *(n for n, cls in PATTERNS.items()
                                  if n not in INSPECT_PATTERNS and cls.matches(n))]
    rows = []
    for t in targets:
        fits, not_fits = [], {}
        for name in names:
            target = 0.25 if name == "1:4" else 0.5
            try:
                pattern = fxprune.get_pattern(PruningConfig.from_any(
                    {"pattern": name, "target_sparsity": target}).groups()[0])
            except fxprune.ConfigError as e:  # a user pattern that refuses this probe config
                not_fits[name] = str(e)
                continue
            layout = pattern.block_layout(t.geometry)
            if isinstance(layout, str):
                not_fits[name] = layout
            else:
                fits.append(name)
        rows.append({"name": t.name, "param": t.param, "type": t.module_type,
                     "shape": list(t.geometry.weight_shape), "view": list(t.geometry.view_shape),
                     "aliases": t.aliases, "fits": fits, "does_not_fit": not_fits})
    if args.json:
        print(json.dumps({"model": source, "capture": "torch.export" if loaded_inputs is not None or
                          args.example_inputs else "symbolic_trace", "targets": rows,
                          "registries": registries()}, indent=2))
        return EXIT_OK
    print(f"{len(rows)} prunable weights in {source}:")
    head = ("name", "type", "shape", "2-D view", "fits")
    table = [(r["name"], r["type"], "x".join(map(str, r["shape"])), "x".join(map(str, r["view"])),
              " ".join(r["fits"])) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    for row in (head, *table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if any(r["does_not_fit"] for r in rows):
        print("\npatterns that do not fit some layers:")
        for r in rows:
            for name, why in r["does_not_fit"].items():
                print(f"  {r['name']}: {name}: {why}")
    print()
    _print_registries()
    return EXIT_OK


def _print_registries() -> None:
    from .registry import registries

    for kind, key in (("patterns", "pattern"), ("criteria", "pruning_type")):
        entries = registries()[kind]
        print(f"registered {kind} ({key}:):")
        width = max(map(len, entries))
        for name, where in entries.items():
            print(f"  {name.ljust(width)}  {where}")


def cmd_validate(args) -> int:
    from .export import format_checks, validate_onnx

    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {args.onnx!r} does not exist")
    model, loaded_inputs, source = load_model(args.model)
    inputs = _inputs(args, loaded_inputs)
    if inputs is None:
        raise UsageError(f"{source} has no example inputs; pass --example-inputs")
    checks = validate_onnx(onnx_path, model, inputs, rtol=args.rtol, atol=args.atol)
    passed = all(c.passed for c in checks)
    if args.json:
        print(json.dumps({"onnx": str(onnx_path), "model": source, "passed": passed,
                          "checks": _checks_list(checks)}, indent=2))
    elif not args.quiet:
        print(f"validation of {onnx_path} against {source}: {'passed' if passed else 'FAILED'}")
        print(format_checks(checks))
    return EXIT_OK if passed else EXIT_VALIDATION


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--example-inputs", metavar="SPEC",
                        help="'float32[1,3,224,224]', 'int64[1,128]{0,30522}' (';' between inputs) or a .pt file")
    parser = argparse.ArgumentParser(prog="fxprune", description="A pruning compiler for PyTorch.",
                                     epilog="MODEL: a .pt2 torch.export archive, pkg.module:factory, "
                                            "a built-in example (mlp, resnet, resnet50, bert-tiny), or "
                                            "(prune) a Hugging Face model directory with --out")
    from ._version import __version__
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,inspect,validate}")
    p = sub.add_parser("prune", parents=[common], help="prune a model, optionally export and validate ONNX")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--config", required=True, metavar="CFG", help="YAML or JSON config file")
    p.add_argument("--onnx", metavar="OUT.onnx", help="export the pruned model to ONNX and validate it")
    p.add_argument("--no-validate", action="store_true", help="export without the validation checks")
    p.add_argument("--report", metavar="OUT.json", help="write the sparsity report as JSON")
    p.add_argument("--save", metavar="OUT.pt2", help="save the pruned model as a torch.export archive")
    p.add_argument("--out", metavar="PRUNED_DIR",
                   help="MODEL is a Hugging Face directory: write the pruned checkpoint here (must not exist)")
    p.add_argument("--calibration", metavar="IDS.pt",
                   help="token ids for activation/sparse_gpt on a checkpoint: a [N, seq] tensor or a list of batches")
    p.add_argument("--format", choices=("safetensors", "compressed-tensors"), default="safetensors",
                   help="checkpoint output: dense safetensors (default) or compressed-tensors (vLLM's sparse format)")
    p.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at a collective step")
    p.set_defaults(run=cmd_prune)
    i = sub.add_parser("inspect", parents=[common], help="list the prunable weights and the patterns that "
                       "fit them, and what the pattern and criterion registries hold")
    i.add_argument("model", metavar="MODEL", nargs="?", help="without it: the registries only")
    i.set_defaults(run=cmd_inspect)
    v = sub.add_parser("validate", parents=[common], help="re-run the validation of an exported ONNX file")
    v.add_argument("onnx", metavar="OUT.onnx")
    v.add_argument("--model", required=True, metavar="MODEL", help="the pruned model it was exported from (e.g. the --save .pt2)")
    v.add_argument("--rtol", type=float, default=1e-3)
    v.add_argument("--atol", type=float, default=1e-5)
    v.set_defaults(run=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The ONNX exporter logs one warning per torchvision op it cannot register; not ours to show.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    from .errors import FxPruneError
    started = False
    try:
        if args.command == "prune":     # under torchrun: one process group for the run
            from .distributed import init_from_env
            started = init_from_env(args.timeout)
            if _rank() != 0:
                args.quiet = True       # only rank 0 prints the table and the progress
        return args.run(args)
    except (UsageError, FxPruneError) as e:
        from .distributed import DistributedError
        if args.debug:
            traceback.print_exc()
        if not (isinstance(e, DistributedError) and _rank() != 0):  # rank 0 reports other ranks' errors
            prefix = f"[rank {_rank()}] " if started else ""
            print(f"fxprune: error: {prefix}{e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"fxprune: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
              f"traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if started:
            import torch.distributed
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
