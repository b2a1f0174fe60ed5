"""Writing the files: CSV encoding of columns and tables, and files that appear only complete.

CSV is written by pyarrow without quoting and without a header (the published header
line is written verbatim first), so the bytes match the real files' conventions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

_WRITE_OPTIONS = pa_csv.WriteOptions(include_header=False, quoting_style="none")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears under ``path`` only once it is completely written."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            yield handle
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_table(handle: BinaryIO, header: str, table: pa.Table) -> None:
    handle.write((header + "\n").encode())
    pa_csv.write_csv(table, handle, _WRITE_OPTIONS)


def csv_lines(table: pa.Table) -> pa.Buffer:
    """The table's rows as CSV lines, without a header."""
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, _WRITE_OPTIONS)
    return sink.getvalue()


def label_column(codes: np.ndarray, labels: tuple[str, ...]) -> pa.DictionaryArray:
    """Small integer codes written as their labels (pid, btag)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(labels))


def fixed_decimals(values: np.ndarray, digits: int) -> pa.Array:
    """Non-negative floats as strings with exactly ``digits`` decimals (0.051234)."""
    scale = 10**digits
    units = np.rint(values.astype(np.float64) * scale).astype(np.int64)
    fraction = pc.utf8_lpad(pa.array(units % scale).cast(pa.string()), digits, "0")
    return pc.binary_join_element_wise(pa.array(units // scale).cast(pa.string()), fraction, ".")
