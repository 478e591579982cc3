"""Bad GGUF sources: the header, the tensor table and the metadata must agree with each other and
with the file, or ``convert`` and ``report`` fail cleanly (see tests/badcase.py).

The files are tiny Llama models written as llama.cpp writes them (tests/gguf_models.py), then cut,
given another magic, a wrong tensor count, a missing block, metadata that disagree with the tensors,
or a tensor type lors cannot dequantize.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.badcase import ARCH, Case, case_ids, check_case, convert_args, grouped, in_path, make_file


def _gguf(tmp: Path, name: str = "m.gguf", **kw) -> Path:
    pytest.importorskip("gguf")
    from tests import gguf_models

    return gguf_models.write(in_path(tmp, name), gguf_models.llama(), "Q8_0", **kw)


def _gguf_bytes(tmp: Path) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "in").mkdir()
        return _gguf(Path(d)).read_bytes()


def _gguf_cut(tmp: Path, keep: float) -> Path:
    data = _gguf_bytes(tmp)
    return make_file(tmp, "cut.gguf", data[: int(len(data) * keep)])


def _gguf_tensor_count(tmp: Path, delta: int) -> Path:
    data = bytearray(_gguf_bytes(tmp))
    count = struct.unpack_from("<Q", data, 8)[0]  # magic, version (u32), then the tensor count (u64)
    struct.pack_into("<Q", data, 8, count + delta)
    return make_file(tmp, "count.gguf", bytes(data))


BLOCK_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def _block_names(i: int) -> tuple[str, ...]:
    return tuple(f"blk.{i}.{n}.weight" for n in BLOCK_TENSORS)


GGUF = grouped(
    "source",
    [
        Case("gguf_truncated", convert_args(lambda t: _gguf_cut(t, 0.6)), 1, ("truncated",)),
        Case(
            "gguf_truncated_header", convert_args(lambda t: _gguf_cut(t, 0.01)), 1, ("truncated or corrupt",)
        ),
        Case(
            "gguf_empty", convert_args(lambda t: make_file(t, "e.gguf", b"")), 1, ("not a GGUF file", "empty")
        ),
        Case(
            "gguf_wrong_magic",
            convert_args(lambda t: make_file(t, "m.gguf", b"GGUX" + _gguf_bytes(t)[4:])),
            1,
            ("not a GGUF file", "b'GGUX'"),
        ),
        Case(
            "gguf_wrong_magic_report",
            lambda t: ["report", make_file(t, "m.gguf", b"GGML" + _gguf_bytes(t)[4:])],
            1,
            ("not a GGUF file",),
        ),
        Case(
            "gguf_unsupported_architecture",
            convert_args(lambda t: _gguf(t, arch="gpt2")),
            1,
            ("GGUF architecture 'gpt2' is not supported", "llama"),
        ),
        # the reader parses tensor data as a table entry: where it fails depends on the bytes
        Case(
            "gguf_tensor_count_beyond_table",
            convert_args(lambda t: _gguf_tensor_count(t, +1)),
            1,
            ("corrupt GGUF",),
        ),
        Case(
            "gguf_tensor_count_short_of_table",
            convert_args(lambda t: _gguf_tensor_count(t, -1)),
            1,
            ("corrupt GGUF", "tensor count"),
        ),
        Case(
            "gguf_block_missing",
            convert_args(lambda t: _gguf(t, drop=_block_names(2))),
            1,
            ("'model.layers.2.", "no tensor 'blk.2."),
        ),
        Case(
            "gguf_block_count_too_small",
            convert_args(lambda t: _gguf(t, block_count=2)),
            1,
            ("no place for tensor 'blk.2.", "block_count is 2"),
        ),
        Case(
            "gguf_metadata_shape_mismatch",
            convert_args(lambda t: _gguf(t, ffn_length=96)),
            1,
            ("model.layers.0.mlp.gate_proj.weight", "shape [96, 64]", "[128, 64]"),
        ),
        Case(
            "gguf_type_not_dequantizable",
            convert_args(
                lambda t: _gguf(t, extra={"rope_freqs.weight": (np.zeros((1, 40), dtype=np.uint8), "Q8_1")})
            ),
            1,
            ("'rope_freqs.weight'", "Q8_1", "cannot dequantize"),
        ),
        Case("gguf_with_arch", convert_args(_gguf, "--arch", ARCH), 2, ("--arch does not apply",)),
    ],
)


@pytest.mark.parametrize("case", GGUF, ids=case_ids(GGUF))
def test_bad_gguf(case: Case, tmp_path):
    check_case(case, tmp_path)
