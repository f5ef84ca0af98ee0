"""Reading ``torch.save`` blobs of one tensor without torch.load: exactly torch.load's tensor for plain tensors,
torch.load's verdict (and the server's 400) for everything else, and no blob's globals ever run."""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest
import torch

from server_stub.errors import BadRequest
from server_stub.http import tensor_blob
from server_stub.http.routes_openai import load_embeds

WHERE = "prompt_embeds[0]"
REFUSED = f"{WHERE} is not a torch.save file of a tensor (loaded with weights_only=True): "


def _save(obj: object, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _torch_load(raw: bytes) -> object:
    return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")


def _with_records(raw: bytes, **replace: bytes) -> bytes:
    """``raw``'s zip with the records named (``data_pkl`` for ``data.pkl``) replaced, in the same order."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            record = name.partition("/")[2].replace(".", "_")
            dst.writestr(name, replace.get(record, src.read(name)))
    return out.getvalue()


def _assert_same(got: object, want: object) -> None:
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
    assert (got.dtype, got.shape, got.stride(), got.storage_offset(), got.is_contiguous(), got.requires_grad) == (
        want.dtype, want.shape, want.stride(), want.storage_offset(), want.is_contiguous(), want.requires_grad)
    assert torch.equal(got, want)


def _values(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PLAIN = {
    "1d": lambda d: _values((7,), d),
    "2d": lambda d: _values((5, 384), d),
    "3d": lambda d: _values((1, 4, 6), d),
    "empty-rows": lambda d: _values((0, 384), d),
    "empty-cols": lambda d: _values((3, 0), d),
    "scalar": lambda d: _values((), d),
    "transposed": lambda d: _values((6, 4), d).t(),
    "permuted-3d": lambda d: _values((2, 3, 4), d).permute(2, 0, 1),
    "row-slice": lambda d: _values((6, 4), d)[2:5],
    "column-slice": lambda d: _values((6, 4), d)[:, 1:3],
    "element": lambda d: _values((6, 4), d)[3, 2],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("make", PLAIN.values(), ids=PLAIN.keys())
def test_plain_tensors_read_directly_equal_torch_load(make, dtype):
    raw = _save(make(dtype))
    got = tensor_blob.read_plain_tensor(raw)
    assert got is not None, "a plain tensor must not need torch.load"
    _assert_same(got, _torch_load(raw))
    _assert_same(tensor_blob.load(raw), _torch_load(raw))
    got.add_(1)  # writable, and not the blob's memory
    _assert_same(tensor_blob.read_plain_tensor(raw), _torch_load(raw))


def test_integer_tensors_read_directly():
    raw = _save(torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4))
    _assert_same(tensor_blob.read_plain_tensor(raw), _torch_load(raw))


_BIG_ENDIAN = _with_records(_save(torch.arange(6.0)), byteorder=b"big")
OTHERS = {
    "requires-grad": lambda: _save(torch.ones(2, 3, requires_grad=True)),
    "parameter": lambda: _save(torch.nn.Parameter(torch.ones(2, 3))),
    "complex": lambda: _save(torch.ones(2, 3, dtype=torch.complex64)),
    "bool": lambda: _save(torch.ones(2, 3, dtype=torch.bool)),
    "legacy-format": lambda: _save(torch.arange(6.0), _use_new_zipfile_serialization=False),
    "big-endian": lambda: _BIG_ENDIAN,
    "dict": lambda: _save({"rows": torch.ones(2, 3)}),
    "list": lambda: _save([torch.ones(2, 3)]),
    "int": lambda: _with_records(_save(torch.ones(2)), data_pkl=b"K\x05."),
}


@pytest.mark.parametrize("make", OTHERS.values(), ids=OTHERS.keys())
def test_anything_else_is_torch_loads_to_judge(make):
    raw = make()
    assert tensor_blob.read_plain_tensor(raw) is None
    got, want = tensor_blob.load(raw), _torch_load(raw)
    if isinstance(want, torch.Tensor):
        _assert_same(got, want)
    else:
        assert type(got) is type(want) and str(got) == str(want)


def test_mismatched_storage_record_goes_to_torch_load():
    raw = _with_records(_save(torch.arange(6.0)), data_0=b"\0" * 20)
    assert tensor_blob.read_plain_tensor(raw) is None
    with pytest.raises(BadRequest, match="record size"):
        load_embeds(base64.b64encode(raw).decode(), WHERE)


def _refusal(raw: bytes) -> str:
    """The message load_embeds has always given: torch.load's own error, first line."""
    with pytest.raises(Exception) as exc:
        _torch_load(raw)
    return REFUSED + str(exc.value).splitlines()[0][:200]


@pytest.mark.parametrize("pickled", [
    b"cos\nsystem\n(V%s\ntR.",  # os.system(cmd)
    b"cposix\nsystem\n(V%s\ntR.",
    b"cbuiltins\nexec\n(Vimport os; os.system('%s')\ntR.",
    # a plain tensor's pickle whose storage type is os.system, called with the command
    b"ctorch._utils\n_rebuild_tensor_v2\n(cos\nsystem\n(V%s\ntRK\x00)))\x89ccollections\nOrderedDict\n)RtR.",
], ids=["os.system", "posix.system", "exec", "inside-tensor-pickle"])
def test_forbidden_globals_never_run_and_are_refused_as_before(pickled, tmp_path):
    marker = tmp_path / "ran"
    raw = _with_records(_save(torch.ones(2, 3)), data_pkl=pickled.replace(b"%s", f"touch {marker}".encode()))
    assert tensor_blob.read_plain_tensor(raw) is None
    with pytest.raises(BadRequest) as exc:
        load_embeds(base64.b64encode(raw).decode(), WHERE)
    assert str(exc.value) == _refusal(raw)
    assert "weights_only" in str(exc.value)
    assert not marker.exists()


def _garbage() -> list[bytes]:
    raw = _save(_values((3, 8), torch.float32))
    rng = np.random.default_rng(0)
    truncated = [raw[:n] for n in range(0, len(raw), 13)]
    noise = [rng.bytes(n) for n in (1, 64, 1000)]
    zip_noise = [raw[:30] + rng.bytes(500), b"PK\x03\x04" + rng.bytes(200), b"PK\x05\x06" + b"\0" * 18]
    return truncated + noise + zip_noise


@pytest.mark.parametrize("raw", _garbage())
def test_truncated_or_garbage_bytes_are_bad_requests(raw):
    assert tensor_blob.read_plain_tensor(raw) is None
    with pytest.raises(BadRequest) as exc:
        load_embeds(base64.b64encode(raw).decode(), WHERE)
    assert str(exc.value) == _refusal(raw)
