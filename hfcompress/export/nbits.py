"""ONNX Runtime's weight-only quantized operators, written from hfcompress's own integers and scales.

`MatMulNBits` (domain com.microsoft) computes Y = A @ dequant(B)^T for A (..., K) and a weight stored as
    B      uint8 (N, K / block, block * bits / 8)  the unsigned integers u = q + 2^(bits-1), element k of a row in
                                                    bits [(k % per_byte) * bits, ...) of byte k / per_byte
    scales float (N * K / block,)                   one per block of `block` consecutive input columns of a row
and no zero points (the default zero point is 2^(bits-1), so w = (u - 2^(bits-1)) * s = q * s exactly).
The CPU kernels take 2, 4 and 8 bits and power-of-two blocks of at least 16. hfcompress's groups map onto them
without a second rounding: a 3-bit integer is a 4-bit one (same scale, same value), and a group whose size is a
multiple of a power-of-two block becomes several blocks that repeat its scale.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

KERNEL_BITS = (2, 4, 8)
MIN_BLOCK = 16


def kernel_layout(bits: int, group_size: int, columns: int) -> tuple[int, int] | None:
    """(kernel bits, kernel block) that holds b-bit groups of `group_size` exactly, or None when none does."""
    kernel_bits = next((k for k in KERNEL_BITS if k >= bits), None)
    block = group_size & -group_size                          # largest power of two dividing the group size
    while block > 256:                                        # keep blocks in the range the kernels are tuned for
        block //= 2
    if kernel_bits is None or block < MIN_BLOCK or columns % block:
        return None
    return kernel_bits, block


def pack_blocks(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed integers q (N, K) in [-2^(bits-1), 2^(bits-1)) -> MatMulNBits' B, uint8 (N, K / block, blob)."""
    rows, columns = q.shape
    per_byte = 8 // bits
    unsigned = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(rows, columns // per_byte, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)    # element i of a byte sits at bits [i*b, (i+1)*b)
    packed = np.bitwise_or.reduce(unsigned << shifts, axis=-1).astype(np.uint8)
    return packed.reshape(rows, columns // block, block * bits // 8)


def block_scales(scale: np.ndarray, group_size: int, block: int) -> np.ndarray:
    """Per-group scales (N, K / group_size) -> one per kernel block, flattened (N * K / block,)."""
    return np.repeat(scale, group_size // block, axis=1).reshape(-1)


def _key(array: np.ndarray) -> tuple:
    """Identity of a weight by content: the exporter folds W^T into anonymous constants, so names are lost."""
    return array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _float_matrices(graph: Any) -> dict[tuple, Any]:
    """Content key -> initializer, for the rank-2 float initializers of `graph`."""
    import onnx_ir as ir

    found = {}
    for value in graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) == 2:
            found[_key(value.const_value.numpy())] = value
    return found


def _initializer(graph: Any, name: str, array: np.ndarray) -> Any:
    import onnx_ir as ir

    value = ir.val(name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _replace(graph: Any, old: Any, op_type: str, inputs: list, attributes: dict, domain: str = "") -> None:
    """Put a new node computing `old`'s output in its place."""
    import onnx_ir as ir

    new = ir.node(op_type, inputs, attributes, domain=domain, name=f"{old.name}_{op_type}")
    graph.insert_before(old, [new])
    new.outputs[0].shape, new.outputs[0].type = old.outputs[0].shape, old.outputs[0].type
    ir.convenience.replace_all_uses_with(old.outputs[0], new.outputs[0], replace_graph_outputs=True)
    graph.remove(old, safe=True)
    new.outputs[0].name = old.outputs[0].name


def _matmul_uses(value: Any) -> list | None:
    """The MatMul nodes that take `value` as their right operand, or None when it is used any other way."""
    uses = list(value.uses())
    if not uses or any(use.node.op_type != "MatMul" or use.idx != 1 for use in uses):
        return None
    return [use.node for use in uses]


def quantize_matmuls(model: Any, layers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]
                     ) -> dict[str, str]:
    """Replace each quantized layer's MatMul by MatMulNBits. `layers`: name -> (weight (N, K) float32 as the traced
    model held it, = q * scale; the saved integers q (N, K); their scales (N, K / group) float32; bits; group size).
    Returns what each layer became."""
    graph, done = model.graph, {}
    matrices = _float_matrices(graph)
    for name, (weight, q, scale, bits, group_size) in layers.items():
        rows, columns = weight.shape
        value = matrices.get(_key(weight.T))
        nodes = _matmul_uses(value) if value is not None else None
        if nodes is None:
            raise ValueError(f"{name}: its weight is not a MatMul operand in the traced graph")
        layout = kernel_layout(bits, group_size, columns)
        if nodes is None:
            raise ValueError(f"{name}: its weight is not a MatMul operand in the traced graph")
        if layout is None:
            done[name] = f"float MatMul ({bits}-bit groups of {group_size}: no MatMulNBits layout holds them)"
            continue
        kernel_bits, block = layout
        packed = _initializer(graph, f"{name}.weight_nbits", pack_blocks(q, kernel_bits, block))
        scales = _initializer(graph, f"{name}.weight_nbits_scale", block_scales(scale, group_size, block))
        for node in nodes:
            _replace(graph, node, "MatMulNBits", [node.inputs[0], packed, scales],
                     {"K": columns, "N": rows, "bits": kernel_bits, "block_size": block, "accuracy_level": 0},
                     domain="com.microsoft")
        graph.initializers.pop(value.name)
        done[name] = f"MatMulNBits {kernel_bits}-bit, block {block}"
    if any(entry.startswith("MatMulNBits") for entry in done.values()):
        model.opset_imports["com.microsoft"] = 1
    return done


def _transposed(value: Any, table: Any, matrices: dict[tuple, Any]) -> bool:
    """Is `value` the transpose of the initializer `table`: a Transpose node of it, or a folded copy?"""
    producer = value.producer()
    if producer is not None:
        return producer.op_type == "Transpose" and producer.inputs[0] is table
    return value.is_initializer() and matrices.get(_key(table.const_value.numpy().T)) is value


def tie_head(model: Any) -> bool:
    """A tied head reads the embedding table itself: MatMul(x, E^T), where E^T is a Transpose of the (V, H) table
    run on every call or a second copy of it folded by the exporter, becomes FusedMatMul(x, E, transB=1) on the
    Gather's initializer. True when a head was rewritten."""
    graph = model.graph
    tables = [node.inputs[0] for node in graph if node.op_type == "Gather" and node.inputs[0] is not None
              and node.inputs[0].is_initializer() and node.inputs[0].const_value is not None]
    matrices = _float_matrices(graph)
    for table in tables:
        heads = [node for node in graph if node.op_type == "MatMul" and _transposed(node.inputs[1], table, matrices)]
        for node in heads:
            transposed = node.inputs[1]
            _replace(graph, node, "FusedMatMul", [node.inputs[0], table], {"transB": 1, "alpha": 1.0},
                     domain="com.microsoft")
            if not list(transposed.uses()):  # the Transpose node or the folded copy, now unused
                if transposed.is_initializer():
                    graph.initializers.pop(transposed.name)
                else:
                    graph.remove(transposed.producer(), safe=True)
        if heads:
            model.opset_imports["com.microsoft"] = 1
            return True
    return False
