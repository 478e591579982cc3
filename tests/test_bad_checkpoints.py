"""Tampered checkpoints: ``report``, ``merge`` and ``load`` refuse them with one clean line.

A checkpoint is converted once (tests/conftest.py: ``small_ckpt``, ``sharded_ckpt``), copied, then
one thing is broken: the config (deleted, not JSON, another version, fields missing or of the
wrong kind, disagreeing with the weights' metadata), the manifest, a tensor (missing, reshaped,
retyped), the weight file (missing, truncated, oversized header), the shard index or a shard, or
``report.json``. Each consumer must fail with a ``LorsError`` (the CLI: exit 1, one line naming the
checkpoint) and change nothing on disk. Loading into a model of another shape fails the same way.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lors_convert
from lors_convert.errors import LorsError
from tests.badcase import assert_clean_failure, ckpt_config, rewrite_weights, run, set_config, tree_state
from tests.models import StackedMLP, no_stacks


def _edit(fn, metadata_too=True):
    def tamper(ckpt: Path):
        config = ckpt_config(ckpt)
        fn(config)
        set_config(ckpt, config, metadata_too)

    return tamper


def _drop_tensor(key):
    def tamper(ckpt: Path):
        tensors = load_file(str(ckpt / "model.safetensors"))
        del tensors[key]
        rewrite_weights(ckpt, tensors)

    return tamper


def _reshape_tensor(key):
    def tamper(ckpt: Path):
        tensors = load_file(str(ckpt / "model.safetensors"))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
        rewrite_weights(ckpt, tensors)

    return tamper


def _retype_tensor(key):
    def tamper(ckpt: Path):
        tensors = load_file(str(ckpt / "model.safetensors"))
        tensors[key] = tensors[key].half()
        rewrite_weights(ckpt, tensors)

    return tamper


def _write(name, data: bytes):
    return lambda ckpt: (ckpt / name).write_bytes(data)


def _truncate(name, keep: int):
    return lambda ckpt: (ckpt / name).write_bytes((ckpt / name).read_bytes()[:keep])


def _ranks(c):
    c["stacks"][0]["params"][0]["ranks"] = [5, 5, 5, 5]


TAMPERS = {
    "config_deleted": (lambda ckpt: (ckpt / "lors_config.json").unlink(), ("config.json",)),
    "config_invalid_json": (_truncate("lors_config.json", 100), ("lors_config.json", "not valid JSON")),
    "config_not_utf8": (_write("lors_config.json", b"\xff\xfe{}"), ("lors_config.json",)),
    "config_unknown_version": (_edit(lambda c: c.update(format_version=99)), ("unknown format version 99",)),
    "config_no_stacks": (_edit(lambda c: c.pop("stacks")), ("missing field 'stacks'",)),
    "config_not_lors": (_edit(lambda c: c.update(format="other")), ("not a LORS config",)),
    "config_differs_from_metadata": (_edit(_ranks, metadata_too=False), ("differs from the config",)),
    "config_ranks_wrong_shape": (_edit(_ranks), ("blocks.0.up.lors_B", "shape")),
    "config_matrix_not_pair": (_edit(lambda c: c["stacks"][0]["params"][0].update(matrix=[64])), ("matrix",)),
    "config_members_not_strings": (
        _edit(lambda c: c["stacks"][0].update(members=[1, 2, 3, 4])),
        ("members",),
    ),
    "config_unknown_layer": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(layer="rnn")),
        ("unknown layer kind 'rnn'",),
    ),
    "config_unknown_dtype": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(dtype="float99")),
        ("unknown dtype",),
    ),
    "config_shared_unknown_name": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(shared=["mean"])),
        ("shared must be ['shared'] or [] (private-only)",),
    ),
    "config_shared_dropped": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(shared=[])),
        ("blocks.0.up.shared",),
    ),
    "manifest_dtype_differs": (
        _edit(lambda c: c["manifest"]["keys"]["head.weight"].update(dtype="float16")),
        ("head.weight", "float16"),
    ),
    "manifest_unknown_key": (
        _edit(lambda c: c["manifest"]["keys"].update({"ghost.weight": {"shape": [2], "dtype": "float32"}})),
        ("ghost.weight",),
    ),
    "metadata_invalid_json": (
        lambda ckpt: rewrite_weights(ckpt, metadata={"lors_config": "{nope"}),
        ("differs from the config",),
    ),
    "missing_factor": (_drop_tensor("blocks.2.down.lors_B"), ("blocks.2.down.lors_B", "missing")),
    "missing_shared": (_drop_tensor("blocks.0.up.shared"), ("blocks.0.up.shared", "missing")),
    "missing_untouched": (_drop_tensor("head.weight"), ("head.weight", "missing")),
    "factor_wrong_shape": (_reshape_tensor("blocks.1.up.lors_A"), ("blocks.1.up.lors_A", "shape")),
    "untouched_wrong_shape": (_reshape_tensor("embed.weight"), ("embed.weight", "[33, 8]")),
    "untouched_wrong_dtype": (_retype_tensor("head.bias"), ("head.bias", "float16")),
    "weights_missing": (lambda ckpt: (ckpt / "model.safetensors").unlink(), ("missing weight file",)),
    "weights_truncated": (_truncate("model.safetensors", 500), ("not a readable safetensors",)),
    "weights_header_oversized": (
        lambda ckpt: _write(
            "model.safetensors", struct.pack("<Q", 2**62) + (ckpt / "model.safetensors").read_bytes()[8:]
        )(ckpt),
        ("not a readable safetensors",),
    ),
}


def _index(fn):
    def tamper(ckpt: Path):
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        fn(index["weight_map"])
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    return tamper


def _first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("model-*.safetensors"))[0]


SHARDED_TAMPERS = {
    "index_invalid_json": (_truncate("model.safetensors.index.json", 50), ("not valid JSON",)),
    "index_no_weight_map": (_write("model.safetensors.index.json", b'{"metadata": {}}'), ("weight_map",)),
    "index_file_not_a_string": (_index(lambda m: m.update({"head.weight": 7})), ("index",)),
    "index_points_outside": (
        _index(lambda m: m.update({"head.weight": "../../../etc/hostname"})),
        ("outside",),
    ),
    "index_names_missing_shard": (
        _index(lambda m: m.update({"head.weight": "model-00009-of-00009.safetensors"})),
        ("missing weight file",),
    ),
    "shard_deleted": (lambda ckpt: _first_shard(ckpt).unlink(), ("missing weight file",)),
    "shard_truncated": (
        lambda ckpt: _first_shard(ckpt).write_bytes(_first_shard(ckpt).read_bytes()[:100]),
        ("not a readable safetensors",),
    ),
}


@pytest.mark.parametrize("consumer", ["report", "merge", "load"])
@pytest.mark.parametrize("name", list(SHARDED_TAMPERS))
def test_tampered_sharded_checkpoint(name, consumer, sharded_ckpt, tmp_path):
    tamper, words = SHARDED_TAMPERS[name]
    _check_tamper(sharded_ckpt, tamper, words, consumer, tmp_path)


@pytest.mark.parametrize("consumer", ["report", "merge", "load"])
@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_checkpoint(name, consumer, small_ckpt, tmp_path):
    tamper, words = TAMPERS[name]
    _check_tamper(small_ckpt, tamper, words, consumer, tmp_path)


def _check_tamper(source: Path, tamper, words, consumer: str, tmp_path: Path) -> None:
    ckpt = shutil.copytree(source, tmp_path / "c.lors")
    tamper(ckpt)
    before = tree_state(tmp_path)
    if consumer == "load":
        with pytest.raises(LorsError) as info:
            lors_convert.load(ckpt)
        message = str(info.value)
        assert "\n" not in message and str(ckpt) in message, message
        for w in words:
            assert w in message, (w, message)
    else:
        out = tmp_path / "merged"
        res = run("report", ckpt) if consumer == "report" else run("merge", ckpt, "-o", out)
        assert_clean_failure(res, 1, words, str(ckpt))
        assert not out.exists()
    assert tree_state(tmp_path) == before


def test_tampered_report_json(small_ckpt, tmp_path):
    """report.json is only the numbers: report refuses a broken or inconsistent one, merge does not need it."""
    ckpt = shutil.copytree(small_ckpt, tmp_path / "c.lors")
    (ckpt / "report.json").write_text('{"stacks": [')
    assert_clean_failure(run("report", ckpt), 1, ("report.json",), str(ckpt))
    report = json.loads((small_ckpt / "report.json").read_text())
    report["stacks"][0]["matrices"][0]["ranks"] = [1, 1, 1, 1]
    (ckpt / "report.json").write_text(json.dumps(report))
    assert_clean_failure(run("report", ckpt), 1, ("report.json", "lors_config.json"), str(ckpt))
    report["stacks"][0]["matrices"][0]["ranks"] = [4, 4, 4, 4]
    report["stacks"][0]["matrices"][0]["lors_params"] = None
    (ckpt / "report.json").write_text(json.dumps(report))
    assert_clean_failure(run("report", ckpt), 1, ("report.json", "malformed"), str(ckpt))
    (ckpt / "report.json").unlink()
    assert_clean_failure(run("report", ckpt), 1, ("report.json",), str(ckpt))
    assert run("merge", ckpt, "-o", tmp_path / "m", "-q").exit_code == 0


@pytest.mark.parametrize(
    "model_fn, words",
    [
        (no_stacks, "does not match"),
        (lambda: StackedMLP(hidden=48), "does not match"),
        (lambda: StackedMLP(depth=3), "does not match"),
        (lambda: StackedMLP(depth=5), "do not match"),
    ],
)
def test_load_against_a_mismatching_architecture(model_fn, words, small_ckpt):
    with pytest.raises(LorsError) as info:
        lors_convert.load(small_ckpt, model=model_fn())
    message = str(info.value)
    assert words in message and str(small_ckpt) in message and "\n" not in message, message
