"""Sparsity survival: do the zeros that pruning wrote survive into the ONNX graph?

For every layer the report marks ``pruned``, find the tensor in the ONNX graph that holds its
weight and check it has at least the zeros the report recorded. The exporter does not always
keep the weight under the parameter's name, so the tensor is found in this order:

1. by name: an initializer (or ``Constant``) named like the parameter, e.g. ``fc1.weight``, with
   the same number of elements (Gemm and Conv weights keep their names);
2. by values: a tensor with the same number of elements equal to the PyTorch weight, either as
   is, transposed (Linear -> MatMul stores ``W.T`` under a new name such as ``val_56``) or
   reshaped to 2-D, up to one scale factor per output (or input) channel, compared on the
   weight's nonzero entries only (BatchNorm folding multiplies conv filter c by
   ``gamma_c / sqrt(var_c + eps)``, and a zero stays zero).

Matching ignores the zero entries, so a copy whose zeros were lost is still found and fails the
zero count with a figure instead of "not found". Several matches (identical copies) are all
checked; the figure is the smallest zero count.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from .results import Check

_NON_FLOAT = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL,
              onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.STRING}


def graph_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values of the main graph, by name."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    return tensors


def _layouts(ref: np.ndarray, shape: tuple):
    """The ways an exporter may lay the weight ``ref`` out as a tensor of ``shape``."""
    if ref.shape == shape:
        yield "values", ref
    mat = ref.reshape(ref.shape[0], -1)
    if mat.shape == shape and mat.shape != ref.shape:
        yield "values, reshaped", mat
    if mat.T.shape == shape:
        yield "values, transposed", mat.T


def _scaled_rows(a: np.ndarray, r: np.ndarray, atol: float) -> bool:
    """a[i] == s_i * r[i] for every row i, compared on r's nonzero entries."""
    a, r = a.astype(np.float64), r.astype(np.float64)
    rr = (r * r).sum(axis=1)
    scale = np.divide((a * r).sum(axis=1), rr, out=np.zeros_like(rr), where=rr > 0)
    keep = r != 0
    return np.allclose(a[keep], (scale[:, None] * r)[keep], rtol=1e-4, atol=atol)


def _proportional(arr: np.ndarray, ref: np.ndarray) -> bool:
    """arr == s * ref on ref's nonzero entries, one scale s per slice along axis 0 or -1."""
    if not ref.any():
        return not arr.any()
    atol = 1e-6 * float(np.abs(arr).max() + np.abs(ref).max())
    for axis in sorted({0, ref.ndim - 1}):
        r = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
        a = np.moveaxis(arr, axis, 0).reshape(ref.shape[axis], -1)
        # cheap rejection on the first rows before comparing everything
        if _scaled_rows(a[:8], r[:8], atol) and _scaled_rows(a, r, atol):
            return True
    return False


def find_weight(tensors: dict[str, onnx.TensorProto], param: str, ref: np.ndarray,
                cache: dict[str, np.ndarray] | None = None) -> list[tuple[str, str, np.ndarray]]:
    """(tensor name, how it matched, array) for each ONNX tensor that holds weight ``param``.

    ``cache`` keeps decoded arrays across calls, so each tensor is decoded once."""
    cache = {} if cache is None else cache
    named = tensors.get(param)
    if named is not None and math.prod(named.dims) == ref.size:
        return [(param, "name", numpy_helper.to_array(named))]
    found = []
    for name, t in tensors.items():
        if math.prod(t.dims) != ref.size or t.data_type in _NON_FLOAT:
            continue
        if name not in cache:
            cache[name] = numpy_helper.to_array(t).astype(np.float32)
        arr = cache[name]
        for how, layout in _layouts(ref, arr.shape):
            if _proportional(arr, layout):
                found.append((name, how, arr))
                break
    return found


def sparsity_checks(onnx_model: onnx.ModelProto, model, report) -> list[Check]:
    """One ``Check`` per layer whose report status is ``pruned``."""
    tensors = graph_tensors(onnx_model)
    params = dict(model.named_parameters(remove_duplicate=False))
    cache: dict[str, np.ndarray] = {}
    checks = []
    for layer in report.layers:
        if layer.status != "pruned":
            continue
        name = f"sparsity: {layer.param}"
        # after compaction the pruned channels are gone: count the zeros left in the smaller weight
        expected = report.weight_zeros(layer.param)
        figures = {"report_zeros": expected}
        weight = params.get(layer.param)
        if weight is None:
            checks.append(Check(name, False, figures,
                                f"the model has no parameter '{layer.param}': validate against "
                                "the model the report was made from"))
            continue
        ref = weight.detach().cpu().float().numpy()
        found = find_weight(tensors, layer.param, ref, cache)
        if not found:
            checks.append(Check(name, False, figures,
                                f"no tensor in the ONNX graph holds '{layer.param}' (looked by "
                                "name, then by values as is, transposed and per-channel scaled); "
                                "the exporter fused or split it, so its zeros cannot be counted"))
            continue
        zeros, tensor, how = min((int((arr == 0).sum()), tname, how) for tname, how, arr in found)
        figures.update(onnx_zeros=zeros, tensor=tensor, matched_by=how)
        message = "" if zeros >= expected else (
            f"ONNX tensor '{tensor}' has {zeros} zeros, the report recorded {expected}: the "
            "pruned zeros did not survive export (was the model changed after pruning?)")
        checks.append(Check(name, zeros >= expected, figures, message))
    return checks
