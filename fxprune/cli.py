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
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from .errors import describe
from .staging import StagedOutputs

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
                             f"path and PYTHONPATH") from e
        except BaseException as e:  # the user's module raised (or exited) while importing
            if isinstance(e, KeyboardInterrupt):
                raise
            raise UsageError(f"MODEL {spec!r}: importing {module_name!r} raised {describe(e)}; "
                             f"fix the module (--debug shows the traceback)") from e
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UsageError(f"MODEL {spec!r}: {module_name} has no callable {attr!r}; name a "
                             f"function that returns an nn.Module")
        try:
            made = factory()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            raise UsageError(f"MODEL {spec!r}: {module_name}.{attr}() raised {describe(e)}; it must "
                             f"take no arguments and return an nn.Module or (module, example_inputs) "
                             f"(--debug shows the traceback)") from e
        return _unpack(made, spec)
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
        raise UsageError(f"{source} returned {type(made).__name__}, not an nn.Module (or a "
                         f"(module, example_inputs) pair)")
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
                         f"({describe(e, 200)}); "
                         f"save one with torch.export.save(torch.export.export(model, args), path)") from e
    finally:
        export_log.setLevel(level)
    inputs = None
    if getattr(program, "example_inputs", None) is not None:
        args, kwargs = program.example_inputs
        inputs = kwargs if kwargs and not args else tuple(args)
    try:
        model = program.module()
    except Exception as e:
        raise UsageError(f"MODEL file {str(path)!r}: torch.export cannot rebuild its module "
                         f"({describe(e, 200)}); re-save it with this torch version") from e
    if extra[REPORT_FILE]:
        from .errors import ReportError
        from .report import SparsityReport, attach_report
        try:
            report = SparsityReport.from_dict(json.loads(extra[REPORT_FILE]))
        except (json.JSONDecodeError, ReportError) as e:
            raise ReportError(f"MODEL file {str(path)!r}: its {REPORT_FILE} is not a valid fxprune "
                              f"sparsity report ({e}); re-save the model with fxprune prune --save") from None
        attach_report(model, report)
    return model, inputs, f"torch.export archive {path.name}"


_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "float64": "float64", "int64": "int64", "long": "int64",
           "int32": "int32", "bool": "bool"}
_SPEC = re.compile(r"^(\w+)\[([\d,\s]*)\](?:\{(-?\d+),(-?\d+)\})?$")
MAX_INPUT_BYTES = 4 << 30   # one --example-inputs tensor: a batch, not a data set


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
            raise UsageError(f"--example-inputs file {spec!r} could not be loaded ({describe(e, 200)}); "
                             f"save it with torch.save((x,), path)") from e
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
        if m.group(3) is not None:
            low, high = int(m.group(3)), int(m.group(4))
            if dtype.is_floating_point or dtype == torch.bool:
                raise UsageError(f"--example-inputs {part!r}: a {{LOW,HIGH}} range is for integer "
                                 f"dtypes (int64, int32); drop it for {m.group(1)}")
            if low >= high:
                raise UsageError(f"--example-inputs {part!r}: the range {{{low},{high}}} is empty; "
                                 f"integers are drawn from LOW <= x < HIGH, so LOW must be below HIGH")
        else:
            low, high = 0, 100
        numel = 1
        for d in shape:
            numel *= d
        if numel * dtype.itemsize > MAX_INPUT_BYTES:
            raise UsageError(f"--example-inputs {part!r} is {numel * dtype.itemsize / 2**30:.1f} GiB; "
                             f"example inputs need one small batch (at most "
                             f"{MAX_INPUT_BYTES // 2**30} GiB each)")
        try:
            if dtype.is_floating_point:
                tensors.append(torch.randn(shape, generator=generator).to(dtype))
            elif dtype == torch.bool:
                tensors.append(torch.randint(0, 2, shape, generator=generator).bool())
            else:
                tensors.append(torch.randint(low, high, shape, generator=generator, dtype=dtype))
        except (RuntimeError, MemoryError) as e:
            raise UsageError(f"--example-inputs {part!r}: cannot create the tensor "
                             f"({describe(e, 200)})") from e
    if not tensors:
        raise UsageError("--example-inputs is empty; e.g. 'float32[1,3,224,224]'")
    return tuple(tensors)


def _inputs(args, loaded_inputs):
    return parse_inputs(args.example_inputs) if args.example_inputs else loaded_inputs


# ---------------------------------------------------------------------- commands
def _check_output_flag(flag: str, value: str | None, suffix: str) -> None:
    if not value:
        return
    path = Path(value)
    if path.suffix != suffix:
        raise UsageError(f"{flag} {value!r} should end in {suffix}")
    if path.is_dir():
        raise UsageError(f"{flag} {value!r} is a directory; name a file such as {str(path / ('out' + suffix))!r}")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {value!r}: directory {str(path.parent)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {value!r}: directory {str(path.parent)!r} is not writable")


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
    outputs = (("--onnx", args.onnx, ".onnx"), ("--save", args.save, ".pt2"), ("--report", args.report, ".json"))
    for flag, value, suffix in outputs:   # before the (long) pruning: fail fast on a bad path
        _check_output_flag(flag, value, suffix)
    finals = [Path(v).resolve() for _, v, _ in outputs if v]
    if len(set(finals)) < len(finals):
        raise UsageError("--onnx, --save and --report must name different files")
    model, loaded_inputs, source = load_model(args.model)
    inputs = _inputs(args, loaded_inputs)
    if (args.onnx or args.save) and inputs is None:
        raise UsageError(f"--onnx/--save need example inputs and {source} has none; pass "
                         f"--example-inputs, e.g. 'float32[1,3,224,224]'")
    bar = ProgressBar(enabled=False if args.quiet or args.json else None)
    try:
        pruned = fxprune.transform(model, args.config, example_inputs=inputs, progress=bar)
    finally:
        bar.close()
    if _rank() != 0:    # every rank holds the same result; rank 0 writes and prints it
        return EXIT_OK
    report = fxprune.sparsity_report(pruned)
    result, code = None, EXIT_OK
    with StagedOutputs().transaction() as staged:
        if args.report:
            report.to_json(staged.path(args.report))
        if args.save:
            _save_pt2(pruned, inputs, staged.path(args.save), report, args.save)
        if args.onnx:
            from .export import ValidationError, to_onnx
            try:
                result = to_onnx(pruned, inputs, staged.path(args.onnx), validate=not args.no_validate)
            except ValidationError as e:
                result, code = e.result, EXIT_VALIDATION
                if not args.json:
                    table = staged.shown(str(e).split("\n", 1)[-1])
                    print(_plain(f"fxprune: validation of {args.onnx} failed; no output was written "
                                 f"(--no-validate writes it without the checks):\n{table}"),
                          file=sys.stderr)
        if code == EXIT_OK:
            staged.commit()
    if result is not None:  # report the final paths, not the staging ones
        result.path = Path(args.onnx)
        if result.data_path is not None:
            result.data_path = Path(args.onnx).parent / result.data_path.name
    if args.json:
        out = {"model": source, "report": report.to_dict(), "written": code == EXIT_OK}
        if result is not None:
            out["onnx"] = _result_dict(result)
        print(json.dumps(out, indent=2))
    elif not args.quiet:
        print(report)
        for flag, value in (("report", args.report), ("saved", args.save)):
            if value and code == EXIT_OK:
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
    _check_output_flag("--report", args.report, ".json")   # before the long run, not after it
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


def _save_pt2(model, inputs, path, report, shown: str) -> None:
    import torch
    from .inputs import split_inputs

    args, kwargs = split_inputs(inputs)
    try:
        program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise UsageError(f"--save {shown!r}: torch.export could not export the pruned model "
                         f"({describe(e, 200)}); use --onnx "
                         f"or save the state_dict from Python") from e
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
    from .extensions import calling, check_block_layout, layer_of
    from .patterns.base import BlockLayout
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
    names = list(INSPECT_PATTERNS)
    for n, cls in PATTERNS.items():
        with calling(cls, "matches", f"for {n!r}"):
            if n not in INSPECT_PATTERNS and cls.matches(n):
                names.append(n)
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
            with calling(pattern, "block_layout", f"for {layer_of(t)}"):
                layout = pattern.block_layout(t.geometry)
            check_block_layout(pattern, t, layout, BlockLayout)
            if isinstance(layout, str):
                not_fits[name] = layout
            else:
                fits.append(name)
        rows.append({"name": t.name, "param": t.param, "type": t.module_type,
                     "shape": list(t.geometry.weight_shape), "view": list(t.geometry.view_shape),
                     "aliases": t.aliases, "fits": fits, "does_not_fit": not_fits})
    if args.json:
        print(json.dumps({"model": source, "capture": gm.meta["fxprune_capture"], "targets": rows,
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

    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if not (value >= 0 and value != float("inf")):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {args.onnx!r} does not exist")
    model, loaded_inputs, source = load_model(args.model)
    inputs = _inputs(args, loaded_inputs)
    if inputs is None:
        raise UsageError(f"{source} has no example inputs; pass --example-inputs")
    from .inputs import split_inputs
    from .passes.run_inputs import check_model_runs
    check_model_runs(model, *split_inputs(inputs, UsageError))   # bad inputs: exit 2, not a failed check
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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MAX_ERROR_CHARS = 1000


def _plain(text: str) -> str:
    """``text`` without ANSI colour codes (third-party messages carry some) unless stderr is a
    terminal."""
    return text if _stderr_is_terminal() else _ANSI.sub("", text)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _error_line(label: str, message: str) -> str:
    """One line: ``fxprune: <label>: <message>``, the message's lines joined, colour only on a
    terminal (and not with NO_COLOR set)."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS - 3] + "..."
    if _stderr_is_terminal() and not os.environ.get("NO_COLOR"):
        return f"fxprune: \x1b[1;31m{label}:\x1b[0m {text}"
    return f"fxprune: {label}: {_ANSI.sub('', text)}"


def _quiet_third_parties(uses_onnxruntime: bool) -> None:
    """Keep third-party warnings and log records out of the output (``--debug`` shows them);
    fxprune's own warnings (a target that could not be reached...) stay."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"fxprune(\.|$)")
    for name in ("torch", "onnxscript", "onnx_ir", "onnx", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if uses_onnxruntime:  # its C++ logger writes to stderr directly; import it only when needed
        import onnxruntime
        onnxruntime.set_default_logger_severity(3)   # errors only


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import FxPruneError
    started = False
    with warnings.catch_warnings():
        if args.debug:
            warnings.simplefilter("default")
        else:
            _quiet_third_parties(args.command == "validate" or bool(getattr(args, "onnx", None)))
        try:
            if args.command == "prune":     # under torchrun: one process group for the run
                from .distributed import init_from_env
                started = init_from_env(args.timeout)
                if _rank() != 0:
                    args.quiet = True       # only rank 0 prints the table and the progress
            code = args.run(args)
            if started:     # every rank done before the group is torn down: a rank leaving
                import torch.distributed    # first can abort a peer's gloo threads at exit
                torch.distributed.barrier()
            return code
        except (UsageError, FxPruneError, OSError) as e:  # the input, the files or the disk
            from .distributed import DistributedError
            if args.debug:
                traceback.print_exc()
            if isinstance(e, OSError) and not isinstance(e, FxPruneError):
                where = f" {e.filename!r}" if e.filename else ""
                message = f"cannot read or write{where}: {e.strerror or e}"
            else:
                message = str(e)
            if not (isinstance(e, DistributedError) and _rank() != 0):  # rank 0 reports other ranks' errors
                prefix = f"[rank {_rank()}] " if started else ""
                print(_error_line("error", prefix + message), file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("fxprune: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # a bug in fxprune: still one line unless --debug
            if args.debug:
                traceback.print_exc()
            print(_error_line("internal error", f"{type(e).__name__}: {e} (rerun with --debug for "
                                                f"the traceback and report it)"), file=sys.stderr)
            return EXIT_INTERNAL
        finally:
            if started:
                import torch.distributed
                torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
