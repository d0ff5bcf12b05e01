"""Random access to the rows of a code cache, by row number, without loading the cache.

Rows are numbered across the cache's shards in order (the shards that hold rows). A row is
read from its parquet row group; the few row groups read last are kept decoded, so reading
the neighbours of a row costs nothing. Open files and decoded groups are bounded, so the
memory of a reader does not grow with the cache. An in-memory Arrow table (audio encoded at
start-up) is read the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_COLUMNS = ["id", "codes", "num_frames", "text"]
INDEX_COLUMNS = ["id", "num_frames", "partial", "text"]  # what an index is computed from


class _Group:
    """One decoded row group: flat codes with their offsets, and the small columns."""

    def __init__(self, table: pa.Table):
        codes = table.column("codes").combine_chunks()
        self.offsets = codes.offsets.to_numpy()
        self.values = codes.values.to_numpy(zero_copy_only=False)
        self.ids = table.column("id")
        self.frames = table.column("num_frames").to_numpy()
        self.texts = table.column("text")

    def row(self, j: int) -> Tuple[str, np.ndarray, int, Optional[str]]:
        flat = self.values[self.offsets[j] : self.offsets[j + 1]]
        return self.ids[j].as_py(), flat, int(self.frames[j]), self.texts[j].as_py()


class CacheRows:
    """Rows ``(id, flat codes, num_frames, text)`` of a code cache by global row number.

    Args:
        files (Sequence[str]): the shard files that hold rows, in order.
        rows_per_file (Sequence[int]): their row counts (``cache.json``'s ``shard_rows``).
        table (pa.Table): instead of files, rows held in memory.
        corrupt (Callable[[path, problem], Exception]): the error for a shard that cannot be
            read (default: ``OSError``).
        max_open_files (int), max_groups (int): how many open shards and decoded row groups
            are kept (least recently used go first).
    """

    def __init__(
        self,
        files: Sequence[str] = (),
        rows_per_file: Sequence[int] = (),
        *,
        table: Optional[pa.Table] = None,
        corrupt: Optional[Callable[[str, str], Exception]] = None,
        max_open_files: int = 16,
        max_groups: int = 4,
    ):
        self.files = [str(f) for f in files]
        self.table = table
        self.corrupt = corrupt or (lambda path, problem: OSError(f"{path}: {problem}"))
        counts = [table.num_rows] if table is not None else list(rows_per_file)
        if table is None and len(counts) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(counts)} row counts")
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.max_open_files, self.max_groups = max_open_files, max_groups
        self._open: OrderedDict = OrderedDict()  # file index -> (ParquetFile, group starts)
        self._groups: OrderedDict = OrderedDict()  # (file index, group) -> _Group

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> Dict:  # DataLoader workers: open files are not pickled
        state = dict(self.__dict__)
        state["_open"], state["_groups"] = OrderedDict(), OrderedDict()
        return state

    @contextmanager
    def _reading(self, k: int):
        """Names the shard that cannot be read."""
        try:
            yield
        except (OSError, ValueError, pa.ArrowException) as e:
            problem = "corrupt: " + " ".join(str(e).split()).rstrip(".")
            raise self.corrupt(self.files[k], problem) from e

    def _file(self, k: int):
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        pf = pq.ParquetFile(self.files[k])
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        entry = (pf, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        self._open[k] = entry
        while len(self._open) > self.max_open_files:
            self._open.popitem(last=False)
        return entry

    def _group(self, k: int, g: int, read) -> _Group:
        key = (k, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        group = _Group(read())
        self._groups[key] = group
        while len(self._groups) > self.max_groups:
            self._groups.popitem(last=False)
        return group

    def row(self, index: int) -> Tuple[str, np.ndarray, int, Optional[str]]:
        """``(id, flat codes, num_frames, text)`` of row ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        if self.table is not None:
            return self._group(0, 0, lambda: self.table.select(ROW_COLUMNS)).row(index)
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        with self._reading(k):
            pf, group_starts = self._file(k)
            j = index - int(self.starts[k])
            g = int(np.searchsorted(group_starts, j, side="right")) - 1
            group = self._group(k, g, lambda: pf.read_row_group(g, columns=ROW_COLUMNS))
        return group.row(j - int(group_starts[g]))

    def column_blocks(self, columns: List[str]) -> Iterator[pa.Table]:
        """The given small columns, a shard (or the table) at a time, in row order."""
        if self.table is not None:
            yield self.table.select(columns)
            return
        for k, f in enumerate(self.files):
            with self._reading(k):
                block = pq.ParquetFile(f).read(columns=columns)
            if block.num_rows != self.starts[k + 1] - self.starts[k]:
                raise self.corrupt(f, f"holding {block.num_rows} rows, not as cache.json says")
            yield block
