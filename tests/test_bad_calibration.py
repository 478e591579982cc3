"""Bad calibration data: files given to ``--calibrate``/``--heldout`` (convert) and ``--data``/
``--heldout`` (heal).

Each kind of bad file (empty, binary or non-UTF-8 text, one huge line, a directory, a FIFO, broken
or pickled tensor files, NaN/Inf or overflowing values, inputs of the wrong width or type, token ids
outside the vocabulary, too few samples) is tried in every slot that reads it: the calibration or
training slot always, the held-out slot where a held-out file is read the same way. Each must fail
cleanly (see tests/badcase.py) and name the bad file.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.badcase import (
    ARCH,
    BERT_VOCAB,
    Case,
    Evil,
    case_ids,
    check_case,
    copy_in,
    good,
    grouped,
    in_path,
    make_file,
    st_bytes,
    tokens,
    torch_bytes,
    weights,
)


def _text(data: bytes):
    return lambda t, name: make_file(t, name + ".txt", data)


def _tensor_file(tensors: dict | None = None, raw: bytes | None = None, suffix: str = ".safetensors"):
    def build(t, name):
        return make_file(t, name + suffix, raw if raw is not None else st_bytes(tensors))

    return build


def _pt(obj):
    return lambda t, name: make_file(t, name + ".pt", torch_bytes(obj))


def _evil_data(t, name):
    return make_file(t, name + ".pt", torch_bytes(Evil(t / "marker")))


def _directory(t, name):
    p = in_path(t, name + ".txt")
    p.mkdir()
    return p


def _fifo(t, name):
    p = in_path(t, name + ".txt")
    os.mkfifo(p)
    return p


VOCAB = len(BERT_VOCAB)
_T = torch.randn(20, 8)

# kind -> (model, builder, code, words, in a held-out slot too)
CALIBRATION_KINDS = {
    "text_empty": ("bert", _text(b""), 1, ("no text lines",), True),
    "text_blank_lines": ("bert", _text(b"\n  \n\t\n"), 1, ("no text lines",), True),
    "text_binary": ("bert", _text(b"PK\x03\x04\x00\x00binary" * 64), 1, ("binary", "NUL"), True),
    "text_utf16": ("bert", _text("the river\n".encode("utf-16")), 1, ("binary",), True),
    "text_latin1": ("bert", _text("the caf\xe9 river\n".encode("latin-1")), 1, ("not UTF-8", "0xe9"), True),
    "text_one_10mb_line": ("bert", _text(b"river " * 1_800_000), 1, ("line 1", "characters"), True),
    "text_one_line": ("bert", _text(b"the river is a stone\n"), 1, ("too few",), False),
    "text_directory": ("bert", _directory, 2, ("regular file", "directory"), True),
    "text_fifo": ("bert", _fifo, 2, ("regular file", "special file"), True),
    "tensor_empty_file": ("mlp", _tensor_file(raw=b""), 1, ("empty",), True),
    "tensor_truncated": (
        "mlp",
        _tensor_file(raw=st_bytes({"input": _T})[:60]),
        1,
        ("not a readable safetensors",),
        True,
    ),
    "tensor_random_pt": (
        "mlp",
        _tensor_file(raw=os.urandom(512), suffix=".pt"),
        1,
        ("not a readable PyTorch file",),
        True,
    ),
    "tensor_pickle_payload": ("mlp", _evil_data, 1, ("refused to unpickle", "runs code"), True),
    "tensor_string_pt": ("mlp", _pt("not tensors"), 1, ("expected a tensor",), True),
    "tensor_empty_dict_pt": ("mlp", _pt({}), 1, ("expected a tensor",), True),
    "tensor_nan": ("mlp", _tensor_file({"input": torch.full((20, 8), float("nan"))}), 1, ("NaN",), True),
    "tensor_inf": ("mlp", _tensor_file({"input": torch.full((20, 8), float("inf"))}), 1, ("Inf",), True),
    "tensor_overflowing_values": (
        "mlp",
        _tensor_file({"input": torch.full((20, 8), 3e38)}),
        1,
        ("not finite",),
        True,
    ),
    "tensor_scalar": ("mlp", _tensor_file({"input": torch.tensor(1.0)}), 1, ("scalar",), True),
    "tensor_wrong_width": (
        "mlp",
        _tensor_file({"input": torch.randn(20, 5)}),
        1,
        ("cannot run", "shapes"),
        True,
    ),
    "tensor_integer_inputs": (
        "mlp",
        _tensor_file({"input": torch.ones(20, 8, dtype=torch.int64)}),
        1,
        ("cannot run",),
        True,
    ),
    "tensor_counts_disagree": (
        "mlp",
        _tensor_file({"a": torch.randn(10, 8), "b": torch.randn(12, 8)}),
        1,
        ("disagree",),
        True,
    ),
    "tensor_unknown_keywords": (
        "mlp",
        _tensor_file({"a": torch.randn(10, 8), "b": torch.randn(10, 8)}),
        1,
        ("cannot run", "argument"),
        True,
    ),
    "tensor_no_samples": ("mlp", _tensor_file({"input": torch.randn(0, 8)}), 1, ("too few",), False),
    "tensor_one_sample": ("mlp", _tensor_file({"input": torch.randn(1, 8)}), 1, ("too few",), False),
    "token_ids_beyond_vocabulary": (
        "bert",
        _tensor_file(tokens(torch.full((8, 6), VOCAB + 3))),
        1,
        ("cannot run", "index"),
        True,
    ),
    "token_ids_negative": ("bert", _tensor_file(tokens(torch.full((8, 6), -1))), 1, ("cannot run",), True),
    "token_ids_int64_overflow": (
        "bert",
        _tensor_file(tokens(torch.full((8, 6), 2**62))),
        1,
        ("cannot run",),
        True,
    ),
    "token_ids_float": ("bert", _tensor_file(tokens(torch.full((8, 6), 3.0))), 1, ("cannot run",), True),
}


def _calibration_case(slot: str, kind: str) -> Case:
    model, builder, code, words, _ = CALIBRATION_KINDS[kind]
    arch = ["--arch", ARCH] if model == "mlp" else []

    def build(t):
        bad = builder(t, "bad")
        if slot.startswith("convert"):
            src = weights(t) if model == "mlp" else copy_in(t, "bert")
            data = (
                ["--calibrate", bad]
                if slot == "convert_calibrate"
                else ["--calibrate", good(t, model, kind), "--heldout", bad]
            )
            return ["convert", src, *arch, *data, "--rank", "2"]
        ckpt = copy_in(t, "mlp.lors" if model == "mlp" else "bert.lors")
        data = ["--data", bad] if slot == "heal_data" else ["--data", good(t, model, kind), "--heldout", bad]
        return ["heal", ckpt, *arch, *data, "--steps", "2"]

    suffix = (
        ".txt"
        if kind.startswith("text") or builder in (_directory, _fifo)
        else (
            ".pt"
            if kind
            in ("tensor_random_pt", "tensor_pickle_payload", "tensor_string_pt", "tensor_empty_dict_pt")
            else ".safetensors"
        )
    )
    return Case(
        f"{slot}-{kind}",
        build,
        code,
        words,
        names="{tmp}/in/bad" + suffix,
        marker=kind == "tensor_pickle_payload",
    )


CALIBRATION = [
    _calibration_case(slot, kind)
    for kind, spec in CALIBRATION_KINDS.items()
    for slot in ("convert_calibrate", "convert_heldout", "heal_data", "heal_heldout")
    if spec[4] or slot in ("convert_calibrate", "heal_data")
]


grouped("calibration", CALIBRATION)


@pytest.mark.parametrize("case", CALIBRATION, ids=case_ids(CALIBRATION))
def test_bad_calibration_file(case: Case, tmp_path):
    check_case(case, tmp_path)
