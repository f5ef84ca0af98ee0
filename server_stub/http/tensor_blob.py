"""Reading a ``torch.save`` blob of one tensor (vLLM's ``prompt_embeds`` element) without ``torch.load``.

Why: ``torch.load(..., weights_only=True)`` costs about a millisecond per tensor, a large share of a prompt-embeds
request. A plain tensor's file is a zip holding a tiny pickle and the raw storage bytes, so :func:`read_plain_tensor`
reads those directly. Safety: its unpickler resolves only the few globals a plain tensor's pickle names, to inert
stand-ins; nothing the blob names is ever called. Whatever it does not recognise goes to ``torch.load`` with
``weights_only=True`` (:func:`load`), so such blobs load, or are refused, exactly as before.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a typed storage class (``torch.FloatStorage``, ...) the pickle names."""

    numpy: np.dtype
    torch: torch.dtype


#: The storage classes read directly, as (little-endian numpy dtype of the bytes, torch dtype of the tensor).
#: bfloat16 has no numpy dtype: its bytes are read as uint16 and viewed through torch.
_STORAGE_TYPES = {
    f"{name}Storage": _StorageType(np.dtype(np_dtype), torch_dtype)
    for name, np_dtype, torch_dtype in [
        ("Float", "<f4", torch.float32), ("Half", "<f2", torch.float16), ("BFloat16", "<u2", torch.bfloat16),
        ("Double", "<f8", torch.float64), ("Long", "<i8", torch.int64), ("Int", "<i4", torch.int32),
        ("Short", "<i2", torch.int16), ("Char", "i1", torch.int8), ("Byte", "u1", torch.uint8),
    ]
}
_VERSIONS = {b"1", b"2", b"3"}  # the zip layouts torch.save has written


@dataclass(frozen=True)
class _StorageRef:
    """A ``('storage', storage_type, key, location, numel)`` persistent id."""

    type: _StorageType
    key: str
    numel: int


@dataclass(frozen=True)
class _Rebuilt:
    """The arguments of ``torch._utils._rebuild_tensor_v2`` for a plain tensor, without building it."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, requires_grad: object,
                       backward_hooks: object, metadata: object = None) -> _Rebuilt:
    if not isinstance(storage, _StorageRef) or requires_grad is not False or metadata:
        raise pickle.UnpicklingError("not a plain tensor")
    if type(backward_hooks) is not OrderedDict or backward_hooks:
        raise pickle.UnpicklingError("backward hooks")
    return _Rebuilt(storage, offset, size, stride)  # type: ignore[arg-type]  # Tensor.set_ checks them


class _TensorUnpickler(pickle.Unpickler):
    """Resolves only a plain tensor's globals, to the inert stand-ins above; any other global is an error."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a plain tensor")

    def persistent_load(self, pid: object) -> _StorageRef:
        match pid:
            case ("storage", _StorageType() as storage_type, str(key), str(), int(numel)):
                return _StorageRef(storage_type, key, numel)
        raise pickle.UnpicklingError("not a storage reference")


def read_plain_tensor(raw: bytes) -> torch.Tensor | None:
    """The tensor in a zip-format ``torch.save`` blob of one plain CPU-loadable tensor, as ``torch.load`` gives it
    (dtype, shape, stride, storage offset, values; writable), or None for anything else."""
    try:
        return _read(raw)
    except Exception:  # noqa: BLE001 - malformed or unusual blobs are torch.load's to judge
        return None


def load(raw: bytes) -> object:
    """``torch.load(raw, weights_only=True, map_location="cpu")``, reading plain tensors directly."""
    tensor = read_plain_tensor(raw)
    if tensor is not None:
        return tensor
    return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")


def _read(raw: bytes) -> torch.Tensor | None:
    if not raw.startswith(b"PK\x03\x04"):
        return None  # not a zip, or one with leading bytes torch's reader may not accept
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        names = zf.namelist()
        prefix, slash, _ = names[0].partition("/")  # torch's reader takes the archive folder from the first record
        records = set(names)
        if not slash or [n for n in names if n.endswith("/data.pkl")] != [f"{prefix}/data.pkl"]:
            return None
        version = f"{prefix}/.data/version" if f"{prefix}/.data/version" in records else f"{prefix}/version"
        if version not in records or zf.read(version).strip() not in _VERSIONS:
            return None
        if f"{prefix}/byteorder" in records and zf.read(f"{prefix}/byteorder") != b"little":
            return None  # absent means little-endian to torch.load too
        rebuilt = _TensorUnpickler(io.BytesIO(zf.read(f"{prefix}/data.pkl"))).load()
        if not isinstance(rebuilt, _Rebuilt):
            return None
        storage = rebuilt.storage
        record = zf.getinfo(f"{prefix}/data/{storage.key}")
        if record.file_size != storage.numel * storage.type.numpy.itemsize:
            return None
        data = np.frombuffer(zf.read(record), dtype=storage.type.numpy).copy()
    # as torch._utils._rebuild_tensor does: a fresh tensor set to the whole storage (not a view of another tensor)
    return torch.empty(0, dtype=storage.type.torch).set_(
        torch.from_numpy(data).untyped_storage(), rebuilt.offset, rebuilt.size, rebuilt.stride)
