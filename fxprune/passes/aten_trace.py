"""aten_trace: the ATen graph of one eager forward, recorded as it runs.

``torch.export.export(..., strict=False)`` traces the model with fake tensors through
``make_fx`` at the pre-dispatch level: every op goes through a proxy, a fake-tensor kernel, a
stack-trace summary and an FX node with full metadata, and the export then checks and lifts the
result. Pruning needs much less: which ATen op consumed which tensor, each value's shape and
dtype, and which module ran each op. :func:`trace_aten` gets that from one real forward on the
example inputs: a dispatch mode on the same pre-dispatch key as ``torch.export`` (so the graph
holds the same ops: ``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``..., not their
decompositions) writes one node per op, and module hooks keep the module stack. The flags
``torch.export`` sets while tracing (``torch.compiler.is_exporting()``) are set too, so models
take the same export-friendly paths (``nn.MultiheadAttention`` its composite path, Hugging Face
models their traceable masks).

The graph has the layout of an exported program's: parameters and buffers are placeholders
(``p_<name>``, ``b_<name>``; :attr:`AtenTrace.param_of_node` maps them to names), then the
tensors of the inputs, then the ops; ``node.meta["val"]`` holds a ``meta`` tensor of each value's
shape, dtype and strides (a list of them for an op with several outputs, read through
``operator.getitem`` nodes; values of one layout share one meta tensor: read them, never change
them) and ``node.meta["nn_module_stack"]`` the modules around the op, keyed and named as
``torch.export`` does (paths under ``model.``).

A real forward sees one path through the model; so does ``torch.export``, which fails where the
path depends on tensor values. The trace refuses the same cases, raising :class:`TraceRefused`
(the capture pass then uses ``torch.export``): an op that reads a tensor's value into Python
(``item``, ``bool(t)``, ``tolist()``: control flow on data) or whose output shape depends on
values (``nonzero``, boolean-mask indexing). Buffers the forward mutates (a BatchNorm's running
statistics in training mode) and the random-number state it draws from are restored.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..aten import ModuleLookup
from ..inputs import output_tensors

aten = torch.ops.aten

# Ops that read tensor values into Python (the control flow after them follows the data) or whose
# output shape depends on the values: the recorded path would hold for these inputs only.
DATA_DEPENDENT = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_numpy",
    "masked_select", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount",
    "argwhere",
})


class TraceRefused(Exception):
    """The model cannot be recorded faithfully (the capture falls back to ``torch.export``)."""


@dataclass
class AtenTrace:
    graph_module: fx.GraphModule
    param_of_node: dict[str, str]       # placeholder name -> parameter/buffer name (first alias)


def trace_aten(model: nn.Module, args: tuple, kwargs: dict,
               lookup: ModuleLookup | None = None) -> AtenTrace:
    """The ATen graph of ``model(*args, **kwargs)`` (see the module docstring); ``lookup``: a
    :class:`~fxprune.aten.ModuleLookup` of ``model`` if at hand (its modules, and its canonical
    names: every parameter/buffer name to its first alias). Raises :class:`TraceRefused` where
    the graph would depend on the inputs' values, and whatever the model raises."""
    from torch._dispatch.python import enable_python_dispatcher
    lookup = ModuleLookup(model) if lookup is None else lookup
    recorder = _recorder_class()(lookup.named, lookup.canonical)
    recorder.add_inputs(args, kwargs)
    buffers = _BufferState(lookup.modules())
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    hooks = [nn.modules.module.register_module_forward_pre_hook(recorder.enter_module),
             nn.modules.module.register_module_forward_hook(recorder.exit_module, always_call=True)]
    try:
        with _exporting(), torch.no_grad(), _ValueReads(), enable_python_dispatcher(), recorder, \
                _direct_dispatch(recorder):
            out = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        buffers.restore()
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    recorder.add_output(list(output_tensors(out)))
    return AtenTrace(_graph_module(recorder.graph), recorder.param_of_node)


def _graph_module(graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use (``gm.code``, a call): the passes
    only read the graph."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        return fx.GraphModule(nn.Module(), graph)
    return _LazyGraphModule(nn.Module(), graph)


class _BufferState:
    """Every buffer of a model and a copy of its values: ``restore`` undoes what a forward did to
    them (updated in place, as BatchNorm's statistics in training mode, or reassigned).
    ``modules``: ``model.modules()``."""

    def __init__(self, modules):
        self.saved = [(m, name, b, b.clone()) for m in modules
                      for name, b in m._buffers.items() if b is not None]

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, buffer, values in self.saved:
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                buffer.copy_(values)


@contextlib.contextmanager
def _exporting():
    """The state ``torch.export`` traces in, so models take the same paths: the compiling and
    exporting flags set (Hugging Face's traceable masks), cudnn off, and no fused fast path of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (export skips them because its
    tensors are traced; these ops hide the projections from the analysis)."""
    try:
        from torch._export.utils import _compiling_state_context
    except ImportError as e:   # another torch: the trace is not sure to match, so do not trace
        raise TraceRefused(f"torch has no _compiling_state_context ({e})") from e
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:   # cudnn off as in torch.export (batch_norm records the flag); CPU kernels unchanged
        with _compiling_state_context(), torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


class _ValueReads(torch.overrides.TorchFunctionMode):
    """Refuses the reads of tensor data that bypass the dispatcher (``tolist``, ``numpy``). Being
    a torch-function mode it also makes ``has_torch_function`` true, as under ``torch.export``,
    for code that checks it to choose a fused path."""

    READS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise TraceRefused(f"{func.__name__}(): the graph would depend on tensor values")
        return func(*args, **(kwargs or {}))


def _meta(value: torch.Tensor) -> torch.Tensor:
    """A ``meta`` tensor of ``value``'s shape, dtype and strides."""
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def _snake_case(name: str) -> str:
    """The node name ``graph.placeholder(name)`` asks for (fx's snake case of ``name``); a name
    without capitals is its own, so fx's regular expression runs only on the others."""
    return name if name == name.lower() else fx.graph._snake_case(name)


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _recorder_class():
    # The pre-dispatch mode slot only holds torch's own tracing modes (``_set_mode_pre_dispatch``
    # checks the type), so the recorder is one of them, with its own ``__torch_dispatch__``;
    # defined on first use, as importing proxy_tensor is not free.
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    return type("AtenRecorder", (_Recorder, ProxyTorchDispatchMode), {})


class _Recorder:
    """The dispatch mode's body (mixed into torch's ``ProxyTorchDispatchMode``)."""

    def __init__(self, named_modules: list, canonical: dict[str, str]):
        from torch.utils._python_dispatch import TorchDispatchMode
        TorchDispatchMode.__init__(self, torch._C.DispatchKey.PreDispatch)
        self._mode_key = torch._C._TorchDispatchModeKey.PROXY
        self.enter_stack = []
        self.graph = fx.Graph()
        # id(tensor) -> (weak reference, node): a plain dict, the reference telling a live tensor
        # from a dead one whose id was reused (torch's WeakIdKeyDictionary costs a Python object
        # per lookup, and the trace looks up every argument of every op)
        self.node_of: dict[int, tuple[weakref.ref, fx.Node]] = {}
        self.param_of_node: dict[str, str] = {}
        self.stack: list[dict] = [{}]
        self.first_op: fx.Node | None = None
        self.constants = 0
        self.by_storage: dict | None = None      # (data_ptr, shape, stride, dtype) -> node, on demand
        self.state: list[torch.Tensor] = []
        # one meta tensor per (shape, strides, dtype): the values are only read, and most ops
        # repeat a shape (an empty_strided on meta is a dispatcher call, several times a lookup)
        self.metas: dict[tuple, torch.Tensor] = {}
        # one walk of the modules: the stack entry each module pushes (under its last name), then
        # the placeholders of the parameters and the buffers, in named_parameters' order and
        # under its names (each module and tensor under its first name)
        self.stack_entry: dict[int, tuple[str, tuple[str, str]]] = {}
        modules: dict[int, tuple[str, nn.Module]] = {}
        for name, module in named_modules:
            path = f"model.{name}" if name else "model"
            self.stack_entry[id(module)] = (f"L__self__{path}", (path, _qualname(module)))
            modules.setdefault(id(module), (name, module))
        for kind, store in (("p", "_parameters"), ("b", "_buffers")):
            for prefix, module in modules.values():
                for name, t in getattr(module, store).items():
                    if t is None or id(t) in self.node_of:
                        continue
                    full = f"{prefix}.{name}" if prefix else name
                    node = self._placeholder(f"{kind}_{full.replace('.', '_')}", t)
                    self._set_node(t, node)
                    self.param_of_node[node.name] = canonical.get(full, full)
                    self.state.append(t)

    # ------------------------------------------------------------------ graph building
    def _placeholder(self, name: str, t: torch.Tensor) -> fx.Node:
        if self.first_op is None:
            node = self._new_node("placeholder", name, (), {}, _snake_case(name))
        else:
            with self.graph.inserting_before(self.first_op):
                node = self._new_node("placeholder", name, (), {}, _snake_case(name))
        node.meta["val"] = self._meta(t)
        return node

    def _new_node(self, op: str, target, args: tuple, kwargs: dict, name: str) -> fx.Node:
        """``graph.create_node(op, target, args, kwargs, name=name)``, the arguments set on the
        node after it is made: the same node, without ``create_node``'s walk over every argument
        (a check for symbolic sizes, which a real forward does not have)."""
        node = self.graph.create_node(op, target, name=name)
        if args:
            node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def _meta(self, value):
        """:func:`_meta` of ``value`` (lists element-wise, other values as they are), each
        distinct tensor layout made once."""
        if isinstance(value, torch.Tensor):
            key = (value.shape, value.stride(), value.dtype)
            meta = self.metas.get(key)
            if meta is None:
                meta = self.metas[key] = _meta(value)
            return meta
        if isinstance(value, (list, tuple)):
            return type(value)(self._meta(v) for v in value)
        return value

    def add_inputs(self, args: tuple, kwargs: dict) -> None:
        from torch.utils._pytree import tree_flatten_with_path, keystr
        leaves, _ = tree_flatten_with_path((args, kwargs))
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor) and self._node_of(leaf) is None:
                key = keystr(path[1:])   # "[0]" of args, "['input_ids']" of kwargs
                name = ("args_" if path[0].idx == 0 else "") + "".join(
                    c if c.isalnum() else "_" for c in key).strip("_")
                self._set_node(leaf, self._placeholder(name or "input", leaf))

    def add_output(self, tensors: list) -> None:
        self.graph.output(tuple(self._node(t) for t in tensors))

    def _constant(self, t: torch.Tensor) -> fx.Node:
        """A tensor no op produced: an alias of a parameter/buffer (``.data``, a tensor saved at
        init), else a constant of the model (a placeholder, as ``torch.export`` lifts it)."""
        if self.by_storage is None:
            self.by_storage = {_storage_key(s): self._node_of(s) for s in self.state}
        node = self.by_storage.get(_storage_key(t))
        if node is None:
            node = self._placeholder(f"c_lifted_tensor_{self.constants}", t)
            self.constants += 1
        self._set_node(t, node)
        return node

    def _set_node(self, t: torch.Tensor, node: fx.Node) -> None:
        self.node_of[id(t)] = (weakref.ref(t), node)

    def _node_of(self, t: torch.Tensor) -> fx.Node | None:
        hit = self.node_of.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def _node(self, t: torch.Tensor) -> fx.Node:
        node = self._node_of(t)
        return node if node is not None else self._constant(t)

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            return self._node(a)
        if isinstance(a, (list, tuple)):
            return type(a)([self._arg(x) for x in a])
        return a

    # ------------------------------------------------------------------ module stack
    def enter_module(self, module, _args):
        entry = self.stack_entry.get(id(module))
        top = self.stack[-1]
        if entry is not None:
            top = {**top, entry[0]: entry[1]}
        self.stack.append(top)

    def exit_module(self, _module, _args, _out):
        if len(self.stack) > 1:
            self.stack.pop()

    # ------------------------------------------------------------------ ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.dispatch(func, args, kwargs or {})

    def dispatch(self, func, args, kwargs):
        target, name = _recorded_as(func)
        if target is None or (name == "index" and func.overloadpacket is aten.index and _bool_index(args)):
            raise TraceRefused(f"{func}: the graph would depend on tensor values")
        # neither the kernel nor the recording (meta tensors of the outputs) needs Python dispatch
        with torch._C._DisablePythonDispatcher():
            out = func(*args, **kwargs)
            if func is not torch.ops.prim.device.default:
                self._record(target, name, args, kwargs, out)
        return out

    def _record(self, target, name: str, args, kwargs, out) -> None:
        node = self._new_node("call_function", target, self._arg(args), self._arg(kwargs), name)
        if self.first_op is None:
            self.first_op = node
        node.meta["nn_module_stack"] = self.stack[-1]
        node.meta["val"] = self._meta(out)
        if isinstance(out, torch.Tensor):
            self._set_node(out, node)
        elif isinstance(out, (list, tuple)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self._new_node("call_function", operator.getitem, (node, i), {}, "getitem")
                    item.meta["nn_module_stack"] = node.meta["nn_module_stack"]
                    item.meta["val"] = node.meta["val"][i]
                    self._set_node(t, item)


# The torch releases (major, minor) whose PreDispatch step (``OpOverload._get_dispatch``) the
# direct step below was read against and tested with; any other release keeps torch's own step.
_DIRECT_DISPATCH_TORCH = {(2, 13)}
_TORCH_RELEASE = tuple(int(x) for x in torch.__version__.split(".")[:2])

# torch imports this module when a process first enters a pre-dispatch mode (1-3 ms of its first
# trace): loaded with the package instead, on the release checked to import it without side
# effects (older ones import torch's test utilities from it)
if _TORCH_RELEASE in _DIRECT_DISPATCH_TORCH:
    with contextlib.suppress(Exception):
        import torch._subclasses.schema_check_mode  # noqa: F401


@contextlib.contextmanager
def _direct_dispatch(recorder: _Recorder):
    """While ``recorder`` is the only pre-dispatch mode, each op's PreDispatch step calls it
    directly. Torch's own step (``OpOverload._get_dispatch``, asked on every call because it is
    never cached while a mode is set) builds a handler and a context manager per call, pops the
    mode and pushes it back, and flattens the op's arguments to find tensor subclasses, which the
    recorder does not use: about a quarter of the trace's time on a small convolutional model. The
    step kept here does what that one leaves the recorder to see: the PreDispatch key is off while
    the op runs (as with the mode popped), the op, its arguments and keyword arguments are the
    same, and the mode is off its slot while the recorder runs (as torch's step pops it). Any
    other case (another mode, another key, the Python key excluded as by ``torch.tensor``
    building its data) goes to torch's step; a torch release this step was not checked against
    (``_DIRECT_DISPATCH_TORCH``) gets torch's step throughout (the same graph, more slowly)."""
    from torch import _ops
    if _TORCH_RELEASE not in _DIRECT_DISPATCH_TORCH:
        yield
        return
    own = vars(_ops.OpOverload).get("_get_dispatch")   # restored as it was (not an inherited one)
    get_dispatch = getattr(_ops.OpOverload, "_get_dispatch", None)
    state = getattr(_ops, "mode_stack_state_for_pre_dispatch", None)
    include = getattr(torch._C, "_dispatch_tls_set_dispatch_key_included", None)
    excluded = getattr(torch._C, "_dispatch_tls_is_dispatch_key_excluded", None)
    pre = getattr(torch._C.DispatchKey, "PreDispatch", None)
    python = getattr(torch._C.DispatchKey, "Python", None)
    if None in (get_dispatch, state, include, excluded, pre, python):
        yield
        return
    stack = state()
    handlers: dict = {}
    record = recorder.dispatch

    def step(op, key):
        if key == pre and stack.get(0) is recorder and stack.get(1) is None \
                and getattr(stack, "_schema_check_mode", None) is None and not excluded(python):
            handler = handlers.get(op)
            if handler is None:
                def handler(*args, **kwargs):
                    stack.set(0, None)
                    include(pre, False)
                    try:
                        return record(op, args, kwargs)
                    finally:
                        stack.set(0, recorder)
                        include(pre, True)
                handlers[op] = handler
            return handler
        return get_dispatch(op, key)

    _ops.OpOverload._get_dispatch = step
    try:
        yield
    finally:
        if own is None:
            del _ops.OpOverload._get_dispatch
        else:
            _ops.OpOverload._get_dispatch = own


@functools.cache
def _recorded_as(func) -> tuple:
    """(the graph target of an op, its node name), or (None, None) for an op the trace refuses
    (:data:`DATA_DEPENDENT`); once per op overload, as every recorded op asks."""
    if func.overloadpacket.__name__ in DATA_DEPENDENT:
        return None, None
    # a tensor literal is recorded as torch.export records it
    target = aten.lift_fresh_copy.default if func is aten.lift_fresh.default else func
    return target, target.overloadpacket.__name__


def _storage_key(t: torch.Tensor):
    if t.is_meta:   # no data: tensors of a meta skeleton alias nothing
        return id(t)
    try:
        return t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), \
            tuple(t.shape), t.stride(), t.dtype
    except (RuntimeError, NotImplementedError):   # no storage (a meta or wrapper tensor)
        return id(t)


def _bool_index(args) -> bool:
    """``aten.index`` with a boolean mask: the output's length depends on the mask's values."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
