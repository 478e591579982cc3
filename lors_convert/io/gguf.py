"""GGUF files (llama.cpp's model format): the header parsed once, tensors dequantized one at a time.

Knows nothing of LORS or transformers. :class:`GGUFFile` parses the metadata and the tensor table
with the ``gguf`` package's reader, checks them against the file (magic, byte order, every tensor
inside the file, every type dequantizable) and then lets the reader's memory map go: a tensor is
read with a plain file read of its bytes and dequantized to float32 by ``gguf.quants.dequantize``,
so nothing of the file stays mapped and streaming holds one tensor's bytes at a time.
:func:`write_gguf` writes a GGUF file from metadata fields and tensors streamed in a declared order.
Every failure is a one-line :class:`LorsError` naming the file. ``gguf`` is an optional dependency
(``pip install 'lors-convert[gguf]'``), imported only here and only when a GGUF file is touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LorsError, short

MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'lors-convert[gguf]'"
HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # the reader's, not key/values
ARCH_KEY = "general.architecture"
ALIGNMENT_KEY = "general.alignment"
FILE_TYPE_KEY = "general.file_type"


def gguf_package():
    """The ``gguf`` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise LorsError(f"reading and writing GGUF files needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def is_gguf(path: Path) -> bool:
    """A ``.gguf`` name, or a file starting with the GGUF magic."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


DEQUANTIZE_ELEMENTS = 1 << 20  # values dequantized together (4 MB of float32)


@dataclass(frozen=True)
class Field:
    """One metadata key/value as the file stores it (``sub_type`` for arrays)."""

    key: str
    value: object
    vtype: int
    sub_type: int | None = None


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    type_name: str  # "Q4_1", "F16", ...
    shape: tuple[int, ...]  # numpy/torch order, outermost first (GGUF stores it innermost first)
    offset: int  # absolute, in bytes
    nbytes: int


class GGUFFile:
    """The metadata and tensor table of a GGUF file, and dequantized reads of its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        gguf = gguf_package()
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # ValueError, IndexError, struct errors on a cut or corrupt header
            raise LorsError(f"{self.path}: truncated or corrupt GGUF file ({short(e)})") from None
        if reader.byte_order == "S":
            raise LorsError(f"{self.path}: a big-endian GGUF file; only little-endian files are read")
        try:
            self.fields = [_field(f) for name, f in reader.fields.items() if name not in HEADER_FIELDS]
            tensors = [_entry(t) for t in reader.tensors]
            alignment = int(reader.alignment)
        except Exception as e:
            raise LorsError(f"{self.path}: corrupt GGUF metadata ({short(e)})") from None
        del reader  # its memory map: pages read through it would stay in this process's memory
        self.tensors = {t.name: t for t in tensors}
        self.values = {f.key: f.value for f in self.fields}
        _check_table(self.path, tensors, alignment)
        for type_name in sorted({t.type_name for t in tensors}):
            qtype = next(t.qtype for t in tensors if t.type_name == type_name)
            if not _dequantizable(qtype):
                example = next(t.name for t in tensors if t.qtype == qtype)
                raise LorsError(
                    f"{self.path}: tensor {example!r} is stored as {type_name}, which the gguf package "
                    "cannot dequantize (requantize the model to another type with llama.cpp)"
                )
        if not isinstance(self.values.get(ARCH_KEY), str):
            raise LorsError(f"{self.path}: GGUF metadata has no {ARCH_KEY}")

    @property
    def architecture(self) -> str:
        return self.values[ARCH_KEY]

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor (uint8), read now and owned by the caller."""
        t = self.tensors[name]
        try:
            data = np.fromfile(self.path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        except OSError as e:
            raise LorsError(f"{self.path}: cannot read tensor {name!r} ({e.strerror or e})") from None
        if data.size != t.nbytes:
            raise LorsError(f"{self.path}: truncated GGUF file: tensor {name!r} is cut short")
        return data

    def read(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, shape ``entry.shape``: ``(rows, ..., row)``."""
        gguf = gguf_package()
        t = self.tensors[name]
        data = self.raw(name)
        qtype = gguf.GGMLQuantizationType(t.qtype)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return np.asarray(gguf.dequantize(data, qtype), dtype=np.float32).reshape(t.shape)
        data = data.reshape(-1, gguf.quant_shape_to_byte_shape(t.shape, qtype)[-1])  # (rows, bytes per row)
        out = np.empty((data.shape[0], t.shape[-1] if t.shape else 1), dtype=np.float32)  # (rows, row)
        # the dequantizer's float temporaries are several times its input: a slice of rows at a time
        step = max(1, DEQUANTIZE_ELEMENTS // max(1, out.shape[1]))
        for start in range(0, out.shape[0], step):
            out[start : start + step] = gguf.dequantize(data[start : start + step], qtype)
        return out.reshape(t.shape)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise LorsError(f"{path}: no such file or directory")
    if path.is_dir():
        raise LorsError(f"{path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        what = "file is empty" if not head else f"it starts with {head!r}, not {MAGIC!r}"
        raise LorsError(f"{path}: not a GGUF file ({what})")


def _check_table(path: Path, tensors: list[TensorEntry], alignment: int) -> None:
    """The tensor table describes the file: named tensors, inside it, one after the other, and
    nothing after the last but padding (a wrong tensor count in the header shifts every offset)."""
    size = path.stat().st_size
    hint = f"does the header's tensor count, {len(tensors)}, match the table?"
    end = None
    previous = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if not t.name:
            raise LorsError(f"{path}: corrupt GGUF tensor table: a tensor without a name ({hint})")
        if t.offset + t.nbytes > size:
            raise LorsError(
                f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte "
                f"{t.offset + t.nbytes}, the file has {size}"
            )
        if end is not None and t.offset < end:
            raise LorsError(
                f"{path}: corrupt GGUF tensor table: tensors {previous!r} and {t.name!r} overlap ({hint})"
            )
        end, previous = t.offset + t.nbytes, t.name
    if end is not None and size - end >= alignment:
        raise LorsError(
            f"{path}: corrupt GGUF file: {size - end} bytes after the last tensor's data ({hint})"
        )


def _field(f) -> Field:
    """A reader field as a plain value: strings, numbers, or lists of them."""
    types = [int(t) for t in f.types]
    value = f.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return Field(f.name, value, types[0], types[-1] if len(types) > 1 else None)


def _entry(t) -> TensorEntry:
    return TensorEntry(
        name=t.name,
        qtype=int(t.tensor_type),
        type_name=t.tensor_type.name,
        shape=tuple(int(d) for d in reversed(t.shape.tolist())),
        offset=int(t.data_offset),
        nbytes=int(t.n_bytes),
    )


def _dequantizable(qtype: int) -> bool:
    """Whether ``gguf.quants.dequantize`` handles the type: tried on one zero block."""
    gguf = gguf_package()
    kind = gguf.GGMLQuantizationType(qtype)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    _, size = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class OutTensor:
    """A tensor declared before the data: name, numpy shape and stored type ("F32", "F16", or a
    source type for raw bytes copied as they are)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    nbytes: int


def out_tensor(name: str, shape: tuple[int, ...], type_name: str) -> OutTensor:
    gguf = gguf_package()
    kind = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    n = int(np.prod(shape)) if shape else 1
    return OutTensor(name, tuple(shape), type_name, n // block * size)


def write_gguf(
    path: Path,
    architecture: str,
    fields: Iterable[Field],
    tensors: list[OutTensor],
    data: Iterator[tuple[str, np.ndarray]],
) -> None:
    """Write ``path``: the key/values ``fields`` (but the architecture, which ``architecture`` sets),
    the table of ``tensors``, then their data as ``data`` yields ``(name, array)`` pairs.

    Arrays are float values (stored as the declared F32/F16) or uint8 bytes already in the declared type.
    ``data`` may come in any order: pairs that arrive before their turn wait in memory (the caller
    keeps the orders equal, so nothing waits).
    """
    gguf = gguf_package()
    writer = gguf.GGUFWriter(str(path), architecture)
    for f in fields:
        if f.key in (ARCH_KEY, *HEADER_FIELDS):
            continue
        if f.key == ALIGNMENT_KEY:
            writer.data_alignment = int(f.value)
        if f.vtype == gguf.GGUFValueType.ARRAY and not f.value:
            continue  # the gguf writer refuses empty arrays
        sub = gguf.GGUFValueType(f.sub_type) if f.sub_type is not None else None
        writer.add_key_value(f.key, f.value, gguf.GGUFValueType(f.vtype), sub_type=sub)
    float_types = {"F32": np.float32, "F16": np.float16}
    for t in tensors:
        if t.type_name in float_types:
            writer.add_tensor_info(t.name, t.shape, np.dtype(float_types[t.type_name]), t.nbytes)
        else:
            kind = gguf.GGMLQuantizationType[t.type_name]
            writer.add_tensor_info(
                t.name,
                gguf.quant_shape_to_byte_shape(t.shape, kind),
                np.dtype(np.uint8),
                t.nbytes,
                raw_dtype=kind,
            )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        waiting: dict[str, np.ndarray] = {}
        pending = iter(tensors)
        expected = next(pending, None)
        for name, array in data:
            waiting[name] = array
            while expected is not None and expected.name in waiting:
                array = waiting.pop(expected.name)
                if array.dtype != np.uint8:  # values: stored as the declared float type; bytes: as they are
                    array = np.ascontiguousarray(array, dtype=float_types[expected.type_name])
                if array.nbytes != expected.nbytes:
                    raise LorsError(
                        f"internal: GGUF tensor {expected.name} has {array.nbytes} bytes, "
                        f"declared {expected.nbytes}"
                    )
                writer.write_tensor_data(array)
                expected = next(pending, None)
        if expected is not None or waiting:
            missing = expected.name if expected is not None else sorted(waiting)[0]
            raise LorsError(f"internal: GGUF tensor {missing} was declared but not written in order")
    finally:
        writer.close()


__all__ = [
    "GGUFFile",
    "Field",
    "TensorEntry",
    "OutTensor",
    "out_tensor",
    "write_gguf",
    "gguf_package",
    "is_gguf",
    "MAGIC",
    "FILE_TYPE_KEY",
]
