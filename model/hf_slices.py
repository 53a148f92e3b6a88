"""Sharded Hugging Face loading: each parameter is built straight into its sharding from file slices.

`load_hf(directory, mesh=mesh)` lands here. For every parameter, `jax.make_array_from_callback` asks for the
index (a tuple of slices of our shape) that each addressable device holds; the callback reads only the HF
rows/columns behind that index from memory-mapped safetensors files, converts them on the host to the
parameter dtype and hands them to that device. No device ever holds more than its shard, and no process
reads tensors (or slices) that none of its devices hold.

Why our own memory map rather than `safe_open(...).get_slice`: safetensors' numpy framework cannot represent
bfloat16 (`TypeError: data type 'bfloat16' not understood`), the dtype most Hub checkpoints ship in; the
header is a JSON of dtype / shape / byte offsets, so a `np.memmap` view in the `ml_dtypes` dtype serves every
dtype and reads only the pages a slice touches.

Slicers (attached to each `model.hf.Rule` as `read`) mirror the rules' `to_ours` layout changes:
`read(get, index) -> np.ndarray` of our layout for `index`, where `get(name)` is the HF tensor (a memmap view).
"""

from __future__ import annotations

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
from flax import nnx

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class TensorFiles:
    """name -> a read-only memmap view of that tensor in its stored dtype (nothing is read until sliced)."""

    def __init__(self, directory: str, weight_map: dict[str, str]):
        self.directory, self.weight_map, self._maps, self._headers = directory, weight_map, {}, {}

    def _header(self, fname: str) -> tuple[dict, int]:
        if fname not in self._headers:
            with open(os.path.join(self.directory, fname), "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._headers[fname] = (json.loads(fh.read(n)), 8 + n)
        return self._headers[fname]

    def get(self, name: str) -> np.ndarray:
        fname = self.weight_map[name]
        header, base = self._header(fname)
        meta = header[name]
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{fname}: tensor {name!r} has dtype {meta['dtype']}, not readable "
                             f"(supported: {sorted(_DTYPES)})")
        if fname not in self._maps:
            self._maps[fname] = np.memmap(os.path.join(self.directory, fname), dtype=np.uint8, mode="r")
        start, end = meta["data_offsets"]
        raw = self._maps[fname][base + start:base + end]
        return raw.view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def _flat_positions(shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Row-major flat positions, inside an array of `shape`, of the elements `index` selects (in order)."""
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)[index].ravel()


def _rows(w: np.ndarray, rows: np.ndarray, cols: slice) -> np.ndarray:
    """w[rows][:, cols] reading only the bounding row range (rows are near-contiguous: a head or a shard)."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return np.asarray(w[lo:hi, cols])[rows - lo]


def same(name: str):
    """Our array is the HF tensor."""
    return lambda get, index: np.asarray(get(name)[index])


def linear(name: str, d_in: int, out_shape: tuple[int, ...], row_perm: np.ndarray | None):
    """Ours [d_in, *out_shape] = HF [n_out, d_in] with rows permuted by row_perm, transposed, reshaped."""
    out_shape = tuple(out_shape)

    def read(get, index):
        rows = _flat_positions(out_shape, index[1:])
        if row_perm is not None:
            rows = row_perm[rows]
        block = _rows(get(name), rows, index[0])  # [rows, in]
        sub = tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], out_shape))
        return block.T.reshape((block.shape[1],) + sub)

    return read


def out_linear(name: str, in_shape: tuple[int, ...], d_out: int):
    """Ours [*in_shape, d_out] = HF [d_out, n_in] transposed, reshaped."""
    in_shape = tuple(in_shape)

    def read(get, index):
        cols = _flat_positions(in_shape, index[:-1])
        block = _rows(get(name).T, cols, index[-1])  # the transposed memmap is a view: [cols, out]
        sub = tuple(len(range(*s.indices(n))) for s, n in zip(index[:-1], in_shape))
        return block.reshape(sub + (block.shape[1],))

    return read


def experts(names: tuple[str, ...]):
    """Ours [E, in, out] = stack of HF [out, in] per expert, transposed: read only this shard's experts."""
    def read(get, index):
        chosen = range(len(names))[index[0]]
        return np.stack([np.asarray(get(names[i])[index[2], index[1]]).T for i in chosen])

    return read


def reshaped(name: str, shape: tuple[int, ...]):
    """Ours = the flat HF tensor reshaped (qkv biases [heads * hd] -> [heads, hd])."""
    return lambda get, index: np.asarray(get(name).reshape(shape)[index])


def _reader_for(rule):
    """The slicer of a rule; a stacked [layers, ...] rule (scan_layers: `parts`, one per layer) reads each
    layer its index selects through that layer's own rule."""
    parts = getattr(rule, "parts", ())
    if not parts:
        return rule.read
    layers = [p.read for p in parts]

    def read(get, index):
        return np.stack([layers[i](get, index[1:]) for i in range(len(layers))[index[0]]])

    return read


def load_sharded(rules: list, files: TensorFiles, abstract: nnx.State, shardings: nnx.State) -> nnx.State:
    """Every parameter of `abstract` (ShapeDtypeStruct leaves) as a jax.Array in its NamedSharding of
    `shardings`, each device's shard read from `files` through the parameter's rule and cast to its dtype.

    A CheckpointError-free path: load_hf has already checked names and shapes.
    """
    by_path = {r.path: r for r in rules}
    flat_sh = dict(nnx.to_flat_state(shardings))
    out = []
    for path, var in nnx.to_flat_state(abstract):
        if path not in by_path:
            raise KeyError(f"no checkpoint rule for parameter {'.'.join(map(str, path))}")
        read = _reader_for(by_path[path])
        want = var.get_value()
        shape, dtype = tuple(want.shape), want.dtype
        done: dict = {}  # replicated dims: devices sharing an index share one host read

        def callback(index, read=read, shape=shape, dtype=dtype, done=done):
            index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in done:
                done[key] = np.ascontiguousarray(np.asarray(read(files.get, index)).astype(dtype))
            return done[key]

        arr = jax.make_array_from_callback(shape, flat_sh[path].get_value(), callback)
        done.clear()  # the host copies are on their devices now
        out.append((path, var.replace(arr)))
    return nnx.from_flat_state(out)
