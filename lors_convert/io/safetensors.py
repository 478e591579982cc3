"""safetensors I/O: a lazy, name-addressed reader of one or several files, and a planned sharded writer.

Knows nothing of LORS. :class:`SafetensorsReader` opens every file once to learn names, shapes,
dtypes and metadata, then maps a file per read (see :meth:`SafetensorsReader.get`); an index's
shard names must stay inside its directory (:mod:`.confine`). :class:`ShardedWriter` takes the output layout from
shapes alone (``huggingface_hub.split_torch_state_dict_into_shards`` over meta tensors) and writes
each tensor into its place in its shard as soon as it exists (headers first, nothing buffered).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LorsError, short
from .confine import confined
from .dist import Dist

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"

# safetensors dtype codes -> torch dtype names (the checkpoint reader validates against the same table)
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise LorsError(f"{path}: cannot read ({short(e)})") from None
    except ValueError as e:
        raise LorsError(f"{path}: not valid JSON ({short(e)})") from None


def index_shards(index: Path) -> list[Path]:
    """The shard files an index names, each checked to be a plain file name inside its directory."""
    data = read_json(index)
    try:
        names = sorted(set(data["weight_map"].values()))
    except (KeyError, TypeError, AttributeError):
        raise LorsError(
            f"{index}: malformed index (weight_map must map tensor names to shard file names)"
        ) from None
    return [confined(index.parent, n, "shard", context=index) for n in names]


def directory_weight_files(directory: Path) -> list[Path] | None:
    """The safetensors files of a model directory: the index's shards, or ``model.safetensors``;
    None when it has neither. Every one is confined to the directory (:mod:`.confine`)."""
    index = confined(directory, INDEX_NAME, "index")
    if index.is_file():
        return index_shards(index)
    single = confined(directory, WEIGHTS_NAME, "weight file")
    return [single] if single.is_file() else None


class SafetensorsReader:
    """Lazy, name-addressed access to the tensors of one or several safetensors files."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtype_names: dict[str, str | None] = {}  # None: a dtype torch has no name for here
        self.metadata: dict[Path, dict[str, str]] = {}
        for f in self.files:
            with self._open(f) as handle:
                self.metadata[f] = handle.metadata() or {}
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    self.where[key] = f
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtype_names[key] = SAFETENSORS_DTYPES.get(sl.get_dtype())

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype as torch's (float32 for a code this reader does not know)."""
        return getattr(torch, self.dtype_names[key] or "float32")

    def get(self, key: str) -> torch.Tensor:
        """One tensor, from a handle opened for this read only.

        ``get_tensor`` returns a tensor backed by the file's memory map; every page read stays in
        the process's RSS for as long as the map lives. A map per read lives only as long as the
        tensor, so streaming holds one group's pages, not the whole source.
        """
        if key not in self.where:
            raise LorsError(
                f"tensor {key!r} is not in {self.files[0].parent if self.files else 'the source'}"
            )
        with self._open(self.where[key]) as handle:
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise LorsError(f"{self.where[key]}: cannot read tensor {key!r} ({short(e)})") from None

    @staticmethod
    def _open(f: Path):
        """A fresh handle (use as a context manager): its memory map dies with the tensors read."""
        from safetensors import safe_open

        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise LorsError(f"{f}: not a readable safetensors file ({short(e)})") from None


def meta_like(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


_CODES = {getattr(torch, name): code for code, name in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """One safetensors file laid out from shapes alone: the header is written first, each tensor
    goes straight into its place when it comes, in any order, and nothing is buffered.

    Layout as safetensors writes it: an 8-byte little-endian header length, the JSON header
    (``__metadata__`` first, padded with spaces to 8 bytes), then the data, larger items first and by
    name within a size, so every tensor starts aligned to its item size.
    """

    def __init__(self, path: Path, spec: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.path = Path(path)
        self.spec = spec
        order = sorted(spec, key=lambda k: (-spec[k].element_size(), k))
        header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        self.offsets: dict[str, int] = {}
        end = 0
        for key in order:
            t = spec[key]
            if t.dtype not in _CODES:
                raise LorsError(f"cannot write {key!r}: safetensors has no code for {t.dtype}")
            nbytes = t.numel() * t.element_size()
            header[key] = {
                "dtype": _CODES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [end, end + nbytes],
            }
            self.offsets[key] = end
            end += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.start = 8 + len(text)
        self.pending = set(spec)
        with open(self.path, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(self.start + end)

    def add(self, key: str, tensor: torch.Tensor) -> bool:
        """Write one tensor into its place; True once every tensor is there."""
        expected = self.spec[key]
        if tuple(tensor.shape) != tuple(expected.shape) or tensor.dtype != expected.dtype:
            raise LorsError(
                f"internal: {key} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{tuple(expected.shape)} {expected.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
        with open(self.path, "r+b") as f:
            f.seek(self.start + self.offsets[key])
            f.write(data)  # the array's own buffer: no copy of the tensor
        self.pending.discard(key)
        return not self.pending


class ShardedWriter:
    """Writes tensors into a shard layout planned from shapes (``huggingface_hub``'s planner), each
    tensor into its place in its shard as it comes (:class:`SafetensorsFile`): memory holds one
    tensor, whatever the shard size.

    ``spec`` maps every output key, in output order, to a meta tensor of its shape and dtype. Only
    shards whose index ``% dist.world == dist.rank`` are written by this process.
    """

    def __init__(
        self,
        directory: Path,
        spec: dict[str, torch.Tensor],
        max_shard_size: int | str,
        metadata: dict[str, str],
        dist: Dist | None = None,
    ):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.directory = Path(directory)
        self.metadata = metadata
        self.dist = dist or Dist()
        self.split = split_torch_state_dict_into_shards(spec, max_shard_size=max_shard_size)
        self.files = list(self.split.filename_to_tensors)
        self.mine = {f for j, f in enumerate(self.files) if j % self.dist.world == self.dist.rank}
        self.shards = {
            f: SafetensorsFile(self.directory / f, {k: spec[k] for k in keys}, metadata)
            for f, keys in self.split.filename_to_tensors.items()
            if f in self.mine
        }

    def wants(self, key: str) -> bool:
        return self.split.tensor_to_filename[key] in self.mine

    def add(self, key: str, tensor: torch.Tensor) -> None:
        f = self.split.tensor_to_filename[key]
        if f in self.shards:
            self.shards[f].add(key, tensor)

    def close(self) -> None:
        """Check completeness; the main process writes the index of a sharded output."""
        unfinished = [f for f, shard in self.shards.items() if shard.pending]
        if unfinished:
            missing = sorted(self.shards[unfinished[0]].pending)[:3]
            raise LorsError(f"internal: shard {unfinished[0]} never completed (missing {missing})")
        if self.split.is_sharded and self.dist.is_main:
            index = {
                "metadata": {**self.split.metadata, **self.metadata},
                "weight_map": self.split.tensor_to_filename,
            }
            (self.directory / INDEX_NAME).write_text(dump_json(index))


__all__ = [
    "SafetensorsReader",
    "SafetensorsFile",
    "ShardedWriter",
    "SAFETENSORS_DTYPES",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "meta_like",
    "index_shards",
    "directory_weight_files",
    "read_json",
    "dump_json",
]


def dump_json(obj, indent: int | None = 1) -> str:
    """JSON text that depends only on ``obj``'s content: keys sorted, no trailing spaces."""
    return json.dumps(obj, indent=indent, sort_keys=True)
