"""Memory-mapped, zero-copy reading of `.safetensors` files.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the raw tensor bytes. `SafetensorsFile.get(name)` returns a CPU tensor that views the mapped
file (no copy, read-only pages shared with the OS cache). Every inconsistency (short file, bad JSON,
offsets outside the file, size/shape mismatch, unknown dtype) raises ValueError naming the file and
the tensor, so a truncated or corrupted download is reported instead of crashing later.
"""
from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One mapped `.safetensors` file; `names()` lists its tensors, `get(name)` views one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot read safetensors file ({exc})") from exc
        if size < 8:
            raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
        with open(self.path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                raise ValueError(
                    f"{self.path}: corrupted or truncated safetensors header "
                    f"(claims {header_len} bytes, file has {size})"
                )
            try:
                header = json.loads(fh.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{self.path}: corrupted safetensors header ({exc})") from exc
            if not isinstance(header, dict):
                raise ValueError(f"{self.path}: corrupted safetensors header (not a JSON object)")
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        metadata = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = metadata if isinstance(metadata, dict) else {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self._data_start
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, data_len)

    def _check_entry(self, name: str, entry: object, data_len: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where}: malformed header entry {entry!r}")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{where}: unsupported dtype {entry['dtype']!r}")
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        if not 0 <= begin <= end:
            raise ValueError(f"{where}: invalid data offsets {entry['data_offsets']}")
        if end > data_len:
            raise ValueError(
                f"{where}: data ends at byte {end} but the file holds {data_len} data bytes "
                "(truncated download?)"
            )
        numel = 1
        for d in shape:
            numel *= d
        if numel * dtype.itemsize != end - begin:
            raise ValueError(f"{where}: shape {list(shape)} needs {numel * dtype.itemsize} bytes, "
                             f"offsets span {end - begin}")
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        """Zero-copy read-only view of one tensor (KeyError if absent)."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            # The mapping is read-only; torch warns that writing through the view is undefined.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=self._data_start + begin)
        return flat.view(shape)
