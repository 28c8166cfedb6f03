"""How a tensor is cut into blocks of rows for the merge loop (merging/engine.py): pure arithmetic on a
task's shape, dtypes and quantization layout, no I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraformat.io.header import DTYPE_BITS
from loraformat.merging.plan import TensorTask
from loraformat.ops.term import rows_cols

if TYPE_CHECKING:
    from loraformat.merging.files import Buffer


@dataclass
class Block:
    """Rows [start, stop) of a tensor viewed (rows, cols), as stored bytes in a host buffer."""

    task: TensorTask
    start: int
    stop: int
    host: Any  # a staging Buffer, a mapped range or an in-memory array
    nbytes: int
    staging: Buffer | None = None  # released once the device has copied it in


def itemsize(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


def block_rows(task: TensorTask, rows: int, cols: int, block_bytes: int) -> int:
    """Rows per block: about ``block_bytes`` of stored (or fp32 work) data, whole groups of rows sharing scales."""
    if task.whole:
        return max(rows, 1)
    if task.quant is not None:  # the fp32 work is the largest buffer; whole groups of rows sharing scales
        group = task.quant.row_group
        return max(group, block_bytes // max(1, cols * 4) // group * group)
    per_row = max(1, cols * max(itemsize(task.src_dtype), itemsize(task.out_dtype)))
    return max(1, block_bytes // per_row)


def sub_rows(task: TensorTask, cols: int, elements: int) -> int:
    """Rows the host merges at a time within a block (0: the whole block at once): about ``elements``
    elements, whole groups of rows sharing quantization scales."""
    if task.whole and not (task.quant is not None and task.quant.streamed):
        return 0
    rows = max(1, elements // max(cols, 1))
    if task.quant is not None:
        group = task.quant.row_group
        return max(group, rows // group * group)
    return rows


def row_blocks(task: TensorTask, block_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, stored bytes) of each block of rows of ``task``."""
    rows, cols = rows_cols(task.logical_shape)
    if rows == 0 or cols == 0:
        yield 0, rows, 0  # an empty tensor: one empty block, so that it is counted done
        return
    if task.quant is not None and task.whole:
        yield 0, rows, task.base.nbytes  # packed or whole-tensor layouts: all the stored bytes at once
        return
    step, row_bytes = block_rows(task, rows, cols, block_bytes), cols * itemsize(task.src_dtype)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield r0, r1, (r1 - r0) * row_bytes


def row_offset(task: TensorTask, row: int) -> int:
    """Byte offset of ``row`` in the task's stored source tensor."""
    return row * rows_cols(task.logical_shape)[1] * itemsize(task.src_dtype)
