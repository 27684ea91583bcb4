"""What every ONNX file gets once its nodes are written: metadata (what produced it), the final
checks and the opset and IR version (`finish`). Writing the nodes: `qexport.ops.emit`.
"""
from __future__ import annotations

import json

from qadmm.errors import UserError
from qexport.ops.emit import MS_DOMAIN, Builder


def metadata(art, form: str, extra: dict | None = None) -> dict[str, str]:
    """metadata_props: what produced the file (bits, scheme, method, source artifact, versions)."""
    import qexport

    sets = sorted({(lc.codes.scheme, lc.codes.bits) for lc in art.layers.values()})
    spec = art.meta.get("spec", {})
    meta = {
        "qexport.form": form,
        "qexport.version": qexport.__version__,
        "qexport.bits": ",".join(str(b) for _, b in sets) or "float",
        "qexport.scheme": ",".join(s for s, _ in sets) or "float",
        "qexport.per_channel": str(bool(spec.get("per_channel", False))).lower(),
        "qexport.method": art.meta.get("method", {}).get("name", "unknown"),
        "qexport.method_params": json.dumps(art.meta.get("method", {}).get("params", {}), sort_keys=True),
        "qexport.artifact_sha256": art.sha256,
        "qexport.model": str(art.meta.get("architecture", {}).get("model", "")),
        "qexport.dataset": json.dumps(art.meta.get("dataset", {}), sort_keys=True),
        "qexport.seed": str(spec.get("seed", "")),
        "qexport.layers": json.dumps(art.meta.get("layers", {}), sort_keys=True),
    }
    for k, v in (extra or {}).items():
        meta[f"qexport.{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def unconsumed_initializers(graph) -> list[str]:
    """Names of the graph's initializers that no node (in any subgraph) reads and that are not
    graph outputs. qexport writes none: every emitter creates an initializer where a node reads it."""
    read: set[str] = {o.name for o in graph.output}

    def walk(g) -> None:
        for n in g.node:
            read.update(n.input)
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub)

    walk(graph)
    return [t.name for t in graph.initializer if t.name not in read]


def finish(b: Builder, input_shape: list[int], output_shape: list[int], meta: dict[str, str]):
    """The checked ModelProto: dynamic batch axis `batch`, the lowest opset what was emitted needs
    (or the one asked for, refused when too low), com.microsoft when used, metadata_props,
    `check_model(full_check=True)`."""
    import onnx
    from onnx import TensorProto, helper

    import qexport
    from qexport.onnx.compat import requirement
    from qexport.ops.base import INPUT, OUTPUT

    graph = helper.make_graph(
        b.nodes, "qexport",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", *output_shape])],
        b.inits,
    )
    unread = unconsumed_initializers(graph)
    if unread:  # an emitter bug; onnxruntime would warn about each at load (see QParamInits)
        raise AssertionError(f"qexport wrote initializers that no node reads: {', '.join(unread)}")
    need = max(b.needed)
    if b.opset is not None and b.opset < need:
        raise UserError(f"this graph needs opset {need} ({b.needed[need]}); --opset {b.opset} is too low")
    opsets = [helper.make_opsetid("", b.opset or need)]
    if b.uses_ms:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qexport", producer_version=qexport.__version__)
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    # provenance also says which runtimes load the file: the lowest opset the graph can be
    # written at (what `--opset` may lower it to) and the oldest onnxruntime that loads it
    needs = requirement(model, lowest_opset=max(b.floor)).onnxruntime
    helper.set_model_props(model, {**meta, "qexport.min_opset": str(max(b.floor)),
                                   **({"qexport.min_onnxruntime": needs} if needs else {})})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug in an emitter, not user input
        raise AssertionError(f"qexport built an invalid ONNX graph: {e}") from e
    return model


def read_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
