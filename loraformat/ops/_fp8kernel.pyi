"""The C passes of loraformat/ops/_fp8kernel.c (optional: built when a C compiler is present)."""

from typing_extensions import Buffer

def decode(
    q: Buffer, scale: Buffer, row_step: int, col_step: int, rows: int, cols: int, out: Buffer
) -> None: ...
def encode(
    w: Buffer,
    scale: Buffer,
    row_step: int,
    col_step: int,
    base_q: Buffer,
    base_scale: Buffer,
    base_row_step: int,
    base_col_step: int,
    rows: int,
    cols: int,
    q_out: Buffer,
) -> tuple[float, float, float, float]: ...
def column_absmax(w: Buffer, rows: int, cols: int, out: Buffer) -> None: ...
def isas() -> list[str]: ...
def use(name: str) -> None: ...
def current() -> str: ...
