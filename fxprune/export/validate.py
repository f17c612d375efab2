"""Validate an exported ONNX file against the PyTorch model it came from.

``validate_onnx`` runs the checks and returns them (it never raises on a failed check):
- ``onnx.checker``: ``onnx.checker.check_model(path, full_check=True)`` (works above 2 GB);
- ``onnxruntime session``: the file loads in onnxruntime with the CPU provider;
- ``outputs: example inputs`` / ``outputs: random inputs``: every output tensor (tuples, dicts and
  Hugging Face ``ModelOutput`` are flattened in order) is within ``rtol``/``atol`` of PyTorch, on
  the example inputs and on fresh random inputs of the same shapes and dtypes;
- ``sparsity: <param>``: one per pruned layer of the sparsity report (by default the report
  embedded in the file), see ``fxprune.export.sparsity``.

``ort_latency`` times the file in onnxruntime.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..inputs import INPUTS_HELP, eval_mode, forward_signature, split_inputs as _split_inputs
from .errors import ExportError
from .metadata import read_metadata, report_from_metadata
from .results import Check
from .sparsity import sparsity_checks


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """``example_inputs`` as (positional args, keyword args); ExportError for anything else."""
    return _split_inputs(example_inputs, ExportError)


def run_torch(model: torch.nn.Module, args: tuple, kwargs: dict):
    """``model(*args, **kwargs)`` without gradients; a clear error when the inputs do not fit."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as e:
        signature = forward_signature(model)
        raise ExportError(f"the model fails on example_inputs ({type(e).__name__}: {e}); "
                          f"{INPUTS_HELP}, here {signature}") from e


def _input_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors the exported graph takes as inputs, in order (non-tensors are baked in)."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _random_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh values of the same shape and dtype: floats ~ N(0, 1); integers uniform over the
    example's [min, max] (valid token ids, an all-ones mask stays all ones); bools copied."""
    if x.numel() == 0 or x.dtype == torch.bool:
        return x.clone()
    if x.is_floating_point():
        return torch.randn(x.shape, generator=gen).to(x.dtype)
    low, high = int(x.min()), int(x.max())
    return torch.randint(low, high + 1, x.shape, generator=gen, dtype=x.dtype)


def random_inputs(args: tuple, kwargs: dict, seed: int = 0) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils._pytree.tree_map(
        lambda x: _random_like(x, gen) if isinstance(x, torch.Tensor) else x, (args, kwargs))


def flatten_outputs(out, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in ``out``, in the order the exporter lists outputs."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):  # dicts and HF ModelOutput (None fields are not items)
        return [kv for k, v in out.items() for kv in flatten_outputs(v, f"{prefix}.{k}")]
    if isinstance(out, (tuple, list)):
        return [kv for i, v in enumerate(out) for kv in flatten_outputs(v, f"{prefix}[{i}]")]
    return []


def make_session(path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``threads`` intra-op threads (0: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: ort.InferenceSession, args: tuple, kwargs: dict) -> dict:
    names = [i.name for i in session.get_inputs()]
    tensors = _input_tensors(args, kwargs)
    if len(names) != len(tensors):
        raise ExportError(f"the ONNX model takes {len(names)} inputs {names}, example_inputs "
                          f"hold {len(tensors)} tensors; {INPUTS_HELP}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def _compare_outputs(name, session, model, args, kwargs, rtol, atol) -> Check:
    expected = flatten_outputs(run_torch(model, args, kwargs))
    got = session.run(None, _feed(session, args, kwargs))
    figures = {"outputs": len(got)}
    if len(got) != len(expected):
        return Check(name, False, figures, f"PyTorch returns {len(expected)} tensors, the ONNX "
                     f"model {len(got)} outputs: the exported graph does not match the model")
    worst_err, worst_used, worst_name, problems = 0.0, 0.0, "", []
    for (out_name, ref), value in zip(expected, got):
        ref = ref.detach().cpu().numpy()
        if ref.shape != value.shape:
            problems.append(f"{out_name}: shape {list(value.shape)} in ONNX, "
                            f"{list(ref.shape)} in PyTorch")
            continue
        ref64, val64 = ref.astype(np.float64), value.astype(np.float64)
        both_nan = np.isnan(ref64) & np.isnan(val64)
        err = np.where(both_nan, 0.0, np.abs(val64 - ref64))
        used = err / (atol + rtol * np.abs(ref64))  # <= 1 everywhere means allclose
        err_max = float(np.nan_to_num(err, nan=np.inf).max(initial=0.0))
        used_max = float(np.nan_to_num(used, nan=np.inf).max(initial=0.0))
        if used_max > worst_used or not worst_name:
            worst_err, worst_used, worst_name = err_max, used_max, out_name
        if used_max > 1:
            problems.append(f"{out_name}: max |onnx - torch| = {err_max:.3g}")
    figures.update(max_abs_err=worst_err, tolerance_used=worst_used, worst=worst_name)
    if not problems:
        return Check(name, True, figures)
    return Check(name, False, figures, "; ".join(problems) + f" (rtol={rtol:g}, atol={atol:g}): "
                 "the ONNX graph computes something else than PyTorch; if the error is float "
                 "round-off, raise rtol/atol")


def validate_onnx(path, model: torch.nn.Module, example_inputs, *, report=None,
                  rtol: float = 1e-3, atol: float = 1e-5, seed: int = 0) -> list[Check]:
    """Run every check on the ONNX file ``path`` exported from ``model``; return the checks.

    ``report`` (a ``SparsityReport``; None: the one embedded in the file, if any) adds one
    sparsity-survival check per pruned layer."""
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be the torch.nn.Module the file was exported from, got "
                          f"{type(model).__name__}")
    path = Path(path)
    args, kwargs = split_inputs(example_inputs)
    if report is None:
        report = report_from_metadata(read_metadata(path), path)  # also: clear error on a bad file
    checks = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
        checks.append(Check("onnx.checker", True, {"full_check": True}))
    except Exception as e:  # checker and shape-inference errors
        checks.append(Check("onnx.checker", False, {"full_check": True},
                            f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"))
    try:
        session = make_session(path)
        checks.append(Check("onnxruntime session", True, {"provider": "CPU"}))
    except Exception as e:
        session = None
        checks.append(Check("onnxruntime session", False, {"provider": "CPU"},
                            f"onnxruntime cannot load {path.name}: {str(e).strip()[:300]}"))
    if session is not None:
        runs = {"outputs: example inputs": (args, kwargs),
                "outputs: random inputs": random_inputs(args, kwargs, seed)}
        with eval_mode(model):
            for name, (a, k) in runs.items():
                try:
                    checks.append(_compare_outputs(name, session, model, a, k, rtol, atol))
                except ExportError as e:
                    checks.append(Check(name, False, {}, str(e)))
                except Exception as e:  # onnxruntime failed to run the graph
                    checks.append(Check(name, False, {}, f"onnxruntime run failed: "
                                        f"{type(e).__name__}: {str(e).strip()[:300]}"))
    if report is not None:
        checks += sparsity_checks(onnx.load(str(path)), model, report)
    return checks


def ort_latency(path, example_inputs, *, runs: int = 20, warmup: int = 3,
                threads: int = 0) -> float:
    """Median wall time in milliseconds of ``runs`` onnxruntime CPU runs on ``example_inputs``,
    after ``warmup`` runs that are not timed; ``threads`` as in ``make_session``."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    session = make_session(path, threads)
    feed = _feed(session, *split_inputs(example_inputs))
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
