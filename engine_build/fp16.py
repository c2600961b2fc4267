"""Mixed-precision fp16 ONNX for TensorRT's strongly typed networks.

A strongly typed TensorRT network (the only kind in TensorRT 11; the FP16
builder flag is deprecated since 10.12) takes the precision of every tensor
from the ONNX graph, so the graph itself has to be mixed precision:
weights and activations in float16, but InstanceNormalization computed in
float32 -- in float16 its mean and variance lose precision and the sum of
squares overflows (65504 is the largest float16) for activations with a large
mean or spread. :func:`convert_to_mixed_fp16` rewrites an fp32 export so:

* every float32 initializer becomes float16, except those consumed only by a
  kept (fp32) op, which stay float32 (InstanceNormalization's scale and bias);
  an initializer consumed by both kinds is split into an fp32 and an fp16
  copy, so no Cast ever sits on a constant;
* every activation is float16, and each kept op gets an explicit
  ``Cast(to=float32)`` on its float inputs that come from fp16 tensors and one
  ``Cast(to=float16)`` after it (shared by all its fp16 consumers); chains of
  kept ops stay in fp32 between them, so no redundant Cast pair is created;
* inputs that an op's schema fixes to ``tensor(float)`` (for example Resize's
  ``scales``) stay float32; float Constant nodes are turned into initializers
  and Casts/ConstantOfShape that produce float32 are retargeted to float16;
* the graph input and output are float16 (``io_dtype="float16"``), or stay
  float32 with Casts inside the graph (``io_dtype="float32"``).

onnxconverter-common's ``float16.convert_float_to_float16`` (and its copy in
``onnxruntime.transformers``) was evaluated for this and not used: on the
TorchScript export of the Pocket U-Net, which shares identical initializers
(zero biases, unit InstanceNorm scales) through Identity nodes, it produced a
model that fails ``onnx.checker`` and ONNX Runtime (Identity typed float16 in,
float32 out), it rounds InstanceNorm's scale/bias to float16 and casts them
back with Cast nodes on constants, and the onnxruntime copy emits a graph
that is not topologically sorted.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

from pocketseg.errors import InputError, MissingDependencyError

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("onnx", "fp16 ONNX conversion", "export") from None

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
IO_DTYPES = {"float16": FLOAT16, "float32": FLOAT}
DEFAULT_KEEP_FP32_OPS = ("InstanceNormalization",)
_FP16_MAX = float(np.finfo(np.float16).max)
_SUFFIX = {FLOAT: "fp32", FLOAT16: "fp16"}


def convert_to_mixed_fp16(model: onnx.ModelProto, *, io_dtype: str = "float16",
                          keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS) -> onnx.ModelProto:
    """A mixed-precision copy of the float32 ``model``: fp16 everywhere except ``keep_fp32_ops``.

    ``io_dtype`` sets the element type of the graph's float inputs and outputs
    (``image`` and ``logits`` for a pocketseg export), and so what the runtime
    must feed and will read back:

    * ``"float16"`` (default): the input is float16 and the output logits are
      float16; no conversion Casts at the graph's edges, half the host<->device
      traffic.
    * ``"float32"``: input and output stay float32, and the graph casts the
      input to float16 and the logits back to float32 itself.

    Every node whose op type is in ``keep_fp32_ops`` computes in float32:
    its float inputs are cast to float32 (its own initializers, such as
    InstanceNormalization's scale and bias, simply stay float32) and its
    output is cast to float16 for the next op. Initializer values beyond the
    float16 range are clipped to +-65504 with a warning. The result is
    shape-inferred and passes ``onnx.checker.check_model(full_check=True)``;
    the input model is not modified. A model that already contains float16
    tensors or has control-flow subgraphs is refused with :class:`InputError`.
    """
    if io_dtype not in IO_DTYPES:
        raise InputError(None, f"io_dtype must be one of {', '.join(IO_DTYPES)}, got {io_dtype!r}")
    io_type = IO_DTYPES[io_dtype]
    kept = frozenset(keep_fp32_ops)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = _default_opset(out)
    _refuse_unsupported(graph)
    _lift_float_constants(graph)
    _materialise_initializer_identities(graph)

    types = _elem_types(onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True).graph)
    if any(t == FLOAT16 for t in types.values()):
        raise InputError(None, "the model already contains float16 tensors; convert the float32 export")

    graph_inputs = {vi.name for vi in graph.input}
    inits = {t.name: t for t in graph.initializer if t.data_type == FLOAT and t.name not in graph_inputs}

    # Where each float32 activation will live: graph inputs at io_type, node outputs as their op computes.
    home: dict[str, int] = {vi.name: io_type for vi in graph.input if types.get(vi.name) == FLOAT}
    wants: list[list[int | None]] = []  # per node, per input: the float type it must receive (None: not float)
    for node in graph.node:
        in_fp32 = node.op_type in kept
        wants.append([_wanted_input_type(node, i, types, in_fp32, opset) for i in range(len(node.input))])
        for j, name in enumerate(node.output):
            if types.get(name) == FLOAT:
                home[name] = FLOAT if in_fp32 else _fp16_output(node, j, opset)

    # Initializers: fp16 when every consumer wants fp16, fp32 when every one wants fp32, else both copies.
    init_needs: dict[str, set[int]] = defaultdict(set)
    for node, node_wants in zip(graph.node, wants):
        for name, want in zip(node.input, node_wants):
            if want is not None and name in inits:
                init_needs[name].add(want)
    for vi in graph.output:
        if vi.name in inits:
            init_needs[vi.name].add(io_type)
    taken = _all_names(graph)
    variant: dict[tuple[str, int], str] = {}
    new_inits = []
    for tensor in graph.initializer:
        needs = init_needs.get(tensor.name) if tensor.name in inits else None
        if not needs:
            new_inits.append(tensor)
            continue
        if FLOAT in needs:
            new_inits.append(tensor)
            variant[tensor.name, FLOAT] = tensor.name
        if FLOAT16 in needs:
            name = tensor.name if needs == {FLOAT16} else _unique(f"{tensor.name}_fp16", taken)
            new_inits.append(_to_fp16_initializer(tensor, name))
            variant[tensor.name, FLOAT16] = name
    _replace(graph.initializer, new_inits)

    # Graph outputs computed at the other precision: the producer writes an internal name, a Cast writes the output.
    out_casts = []
    for vi in graph.output:
        if types.get(vi.name) == FLOAT and vi.name in home and home[vi.name] != io_type and vi.name not in graph_inputs:
            internal = _unique(f"{vi.name}_{_SUFFIX[home[vi.name]]}", taken)
            _rename_tensor(graph, vi.name, internal)
            home[internal] = home.pop(vi.name)
            out_casts.append(helper.make_node("Cast", [internal], [vi.name], to=io_type,
                                              name=_unique(f"{vi.name}/Cast_to_{_SUFFIX[io_type]}", taken)))

    # Rewire every input to a tensor of the wanted type, inserting one shared Cast per (tensor, type).
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []
    for node, node_wants in zip(graph.node, wants):
        for i, want in enumerate(node_wants):
            name = node.input[i]
            if want is None:
                continue
            if name in inits:
                node.input[i] = variant[name, want]
            elif home.get(name, FLOAT) != want:
                key = (name, want)
                if key not in casts:
                    casts[key] = _unique(f"{name}_{_SUFFIX[want]}", taken)
                    new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want,
                                                      name=_unique(f"{name}/Cast_to_{_SUFFIX[want]}", taken)))
                node.input[i] = casts[key]
        new_nodes.append(node)
    new_nodes.extend(out_casts)
    _replace(graph.node, new_nodes)

    for vi in graph.input:
        if types.get(vi.name) == FLOAT:
            vi.type.tensor_type.elem_type = io_type
    for vi in graph.output:
        if types.get(vi.name) == FLOAT:
            vi.type.tensor_type.elem_type = io_type
    keep_vi = [vi for vi in graph.value_info if vi.name in home or types.get(vi.name) not in (FLOAT, None)]
    for vi in keep_vi:
        if vi.name in home:
            vi.type.tensor_type.elem_type = home[vi.name]
    _replace(graph.value_info, keep_vi)

    out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    onnx.checker.check_model(out, full_check=True)
    return out


def fp16_summary(model: onnx.ModelProto) -> dict:
    """What precision the graph computes in: a JSON-ready dict for tests and the export report.

    Keys: ``float16_initializers`` / ``float32_initializers`` (counts) and
    ``float16_initializer_bytes`` / ``float32_initializer_bytes``;
    ``cast_nodes``; ``float32_ops`` (sorted op types of the non-Cast nodes
    that produce a float32 tensor, i.e. compute in fp32) and
    ``float32_op_counts`` ({op type: nodes}); ``float16_ops`` likewise;
    ``inputs`` / ``outputs`` ({name: element type name}).
    """
    types = _elem_types(onnx.shape_inference.infer_shapes(model).graph)
    counts: Counter = Counter()
    nbytes: Counter = Counter()
    for tensor in model.graph.initializer:
        if tensor.data_type in (FLOAT, FLOAT16):
            counts[tensor.data_type] += 1
            nbytes[tensor.data_type] += int(np.prod(tensor.dims, dtype=np.int64)) * (4 if tensor.data_type == FLOAT else 2)
    fp32_ops: Counter = Counter()
    fp16_ops: Counter = Counter()
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        outs = {types.get(name) for name in node.output}
        if FLOAT in outs:
            fp32_ops[node.op_type] += 1
        elif FLOAT16 in outs:
            fp16_ops[node.op_type] += 1

    def type_names(values) -> dict[str, str]:
        return {vi.name: helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name for vi in values}

    return {
        "float16_initializers": counts[FLOAT16],
        "float32_initializers": counts[FLOAT],
        "float16_initializer_bytes": nbytes[FLOAT16],
        "float32_initializer_bytes": nbytes[FLOAT],
        "cast_nodes": sum(node.op_type == "Cast" for node in model.graph.node),
        "float32_ops": sorted(fp32_ops),
        "float32_op_counts": dict(sorted(fp32_ops.items())),
        "float16_ops": sorted(fp16_ops),
        "float16_op_counts": dict(sorted(fp16_ops.items())),
        "inputs": type_names(model.graph.input),
        "outputs": type_names(model.graph.output),
    }


# --- helpers -------------------------------------------------------------------------------------------------------

def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InputError(None, "the model imports no default-domain ONNX opset")


def _refuse_unsupported(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise InputError(None, f"node {node.name or node.op_type} ({node.op_type}) has a subgraph; "
                                   "the fp16 conversion handles flat graphs only")
    for tensor in graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            raise InputError(None, f"initializer {tensor.name} is stored as external data; load it into the model first")


def _lift_float_constants(graph: onnx.GraphProto) -> None:
    """Float32 Constant nodes become initializers, so they are converted (or kept) like every weight."""
    outputs = {vi.name for vi in graph.output}
    keep = []
    for node in graph.node:
        tensor = None
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.output[0] not in outputs):
            attr = node.attribute[0]
            if attr.name == "value" and attr.t.data_type == FLOAT:
                tensor = numpy_helper.from_array(numpy_helper.to_array(attr.t), node.output[0])
            elif attr.name == "value_float":
                tensor = numpy_helper.from_array(np.array(attr.f, dtype=np.float32), node.output[0])
            elif attr.name == "value_floats":
                tensor = numpy_helper.from_array(np.array(attr.floats, dtype=np.float32), node.output[0])
        if tensor is None:
            keep.append(node)
        else:
            graph.initializer.append(tensor)
    _replace(graph.node, keep)


def _materialise_initializer_identities(graph: onnx.GraphProto) -> None:
    """``Identity(initializer)`` becomes an initializer of its own, named after the Identity's output.

    The TorchScript exporter stores identical parameters once (all zero biases,
    all unit InstanceNorm scales) and re-exposes them through Identity nodes;
    one stored tensor can therefore feed both fp16 convolutions and fp32
    InstanceNorms. Giving each parameter its own initializer again (a few
    bytes of duplicated biases) keeps the parameter names, which TensorRT's
    refitter and the reports use, and lets each copy take its consumer's type.
    """
    inits = {t.name: t for t in graph.initializer if t.data_type == FLOAT}
    outputs = {vi.name for vi in graph.output}
    keep = []
    for node in graph.node:
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in inits
                and node.output[0] not in outputs):
            source = inits[node.input[0]]
            copy = TensorProto()
            copy.CopyFrom(source)
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(node)
    _replace(graph.node, keep)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        raise InputError(None, f"node {node.name or node.op_type}: no ONNX schema for {node.domain or 'ai.onnx'}::"
                               f"{node.op_type} at opset {opset}; add it to keep_fp32_ops or convert it by hand") from None


def _allowed(schema, formal) -> tuple[str, list[str]]:
    constraints = {tc.type_param_str: list(tc.allowed_type_strs) for tc in schema.type_constraints}
    return formal.type_str, constraints.get(formal.type_str, [formal.type_str])


def _wanted_input_type(node: onnx.NodeProto, index: int, types: dict[str, int], in_fp32: bool, opset: int) -> int | None:
    """FLOAT or FLOAT16 for a float32 input of ``node``; None for inputs that are not float32 (or absent)."""
    name = node.input[index]
    if not name or types.get(name) != FLOAT:
        return None
    if in_fp32:
        return FLOAT
    schema = _schema(node, opset)
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    _, allowed = _allowed(schema, formal)
    return FLOAT16 if "tensor(float16)" in allowed else FLOAT


def _fp16_output(node: onnx.NodeProto, index: int, opset: int) -> int:
    """Retype a float32 output of an fp16 node; the type of attribute-typed outputs is changed in the node."""
    if node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = FLOAT16
        return FLOAT16
    if node.op_type == "ConstantOfShape":
        for attr in node.attribute:
            if attr.name == "value":
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        return FLOAT16
    schema = _schema(node, opset)
    formal = schema.outputs[min(index, len(schema.outputs) - 1)]
    param, allowed = _allowed(schema, formal)
    if "tensor(float16)" not in allowed:
        return FLOAT  # fixed tensor(float) output
    if any(inp.type_str == param for inp in schema.inputs):
        return FLOAT16  # follows its (fp16) inputs
    raise InputError(None, f"node {node.name or node.op_type} ({node.op_type}): its float32 output's type is set by "
                           "an attribute the fp16 conversion does not know; add the op to keep_fp32_ops")


def _to_fp16_initializer(tensor: TensorProto, name: str) -> TensorProto:
    values = numpy_helper.to_array(tensor)
    over = int(np.count_nonzero(np.abs(values) > _FP16_MAX))
    if over:
        warnings.warn(f"initializer {tensor.name}: {over} values beyond the float16 range are clipped to "
                      f"+-{_FP16_MAX:g}", RuntimeWarning, stacklevel=3)
        values = np.clip(values, -_FP16_MAX, _FP16_MAX)
    return numpy_helper.from_array(values.astype(np.float16), name)


def _replace(field, items: list) -> None:
    """Set a repeated message field to ``items`` (which may be elements of it: copied before clearing)."""
    copies = []
    for item in items:
        twin = type(item)()
        twin.CopyFrom(item)
        copies.append(twin)
    del field[:]
    field.extend(copies)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(vi.name for vi in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
    return names


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new
