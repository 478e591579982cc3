"""Confined readers: a file a directory names is read only if it lies inside that directory.

Unit tests of :mod:`lors_convert.io.confine` and a hypothesis fuzz of the readers that take names
from files (the safetensors index, the checkpoint config): whatever the names, sizes and nesting,
they either return paths inside the directory or fail with one clean line. The command-level
cases (symlinked side files, shards, configs; every command) are in tests/test_bad_escapes.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lors_convert.errors import LorsError
from lors_convert.io.confine import confined, inside, is_plain_name
from lors_convert.io.safetensors import INDEX_NAME, directory_weight_files, index_shards


@pytest.mark.parametrize(
    "name, ok",
    [
        ("model.safetensors", True),
        ("a b.json", True),
        ("..x", True),
        (".hidden", True),
        ("..", False),
        (".", False),
        ("", False),
        ("../x", False),
        ("a/b", False),
        ("/etc/passwd", False),
        ("a\\b", False),
        ("x\x00y", False),
        (7, False),
        (None, False),
        (["a"], False),
    ],
)
def test_plain_names(name, ok):
    assert is_plain_name(name) is ok


def test_symlinks_must_resolve_inside(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "real.json").write_text("{}")
    (tmp_path / "secret").write_text("s")
    (d / "inner").symlink_to(d / "real.json")
    (d / "outer").symlink_to(tmp_path / "secret")
    (d / "dotdot").symlink_to("../secret")
    (d / "chain").symlink_to(d / "outer")  # inside first, then out
    (d / "self").symlink_to(d)  # the directory itself is not inside it
    assert confined(d, "real.json") == d / "real.json"
    assert confined(d, "inner") == d / "inner"
    assert confined(d, "missing") == d / "missing"  # absent entries are the caller's business
    for name in ("outer", "dotdot", "chain", "self"):
        with pytest.raises(LorsError, match="links to a file outside"):
            confined(d, name, "side file")
    assert inside(d, d / "real.json") and not inside(d, tmp_path / "secret")


def test_a_symlinked_directory_is_its_own_root(tmp_path):
    """A model directory reached through a link (a cache snapshot's path) confines to its target."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "model.safetensors").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    assert directory_weight_files(tmp_path / "link") == [tmp_path / "link" / "model.safetensors"]


def test_index_names_a_single_weight_file_that_links_out(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (tmp_path / "other.safetensors").write_bytes(b"x")
    (d / "model.safetensors").symlink_to(tmp_path / "other.safetensors")
    with pytest.raises(LorsError, match="weight file 'model.safetensors' links to a file outside"):
        directory_weight_files(d)
    (d / "model.safetensors").unlink()
    (tmp_path / "index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    (d / INDEX_NAME).symlink_to(tmp_path / "index.json")
    with pytest.raises(LorsError, match="index .* links to a file outside"):
        directory_weight_files(d)


# ---------------------------------------------------------------------------------------------
# fuzz: names, sizes and nesting of what the index and the config name

NAMES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "..",
            ".",
            "/",
            "../secret",
            "/etc/hostname",
            "a/../../secret",
            "sub/x.safetensors",
            "x\x00.safetensors",
            "model-00001-of-00002.safetensors",
            "link_out",
            "link_in",
            "C:\\x",
            "~/secret",
            "\u202e.safetensors",
            "a" * 300,
        ]
    ),
)
LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | NAMES
NESTED = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)
INDEXES = st.one_of(
    st.fixed_dictionaries(
        {"weight_map": st.dictionaries(st.text(max_size=6), NAMES, max_size=6)},
        optional={"metadata": st.fixed_dictionaries({}, optional={"total_size": LEAF})},
    ),
    st.fixed_dictionaries({"weight_map": NESTED}),
    NESTED,
)


def _model_dir(root: Path) -> Path:
    d = root / "model"
    d.mkdir()
    (root / "secret").write_text("secret")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    (d / "link_out").symlink_to(root / "secret")
    (d / "link_in").symlink_to(d / "model-00001-of-00002.safetensors")
    return d


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(index=INDEXES, depth=st.integers(0, 3))
def test_fuzz_index_reader_stays_inside(index, depth):
    with tempfile.TemporaryDirectory() as root:
        d = _model_dir(Path(root))
        text = json.dumps(index, allow_nan=True)
        for _ in range(depth):  # nesting the document itself: a JSON string holding JSON
            text = json.dumps(text)
        (d / INDEX_NAME).write_text(text)
        try:
            shards = index_shards(d / INDEX_NAME)
        except LorsError as e:
            message = str(e)
            assert "\n" not in message and str(d / INDEX_NAME) in message, message
            return
        real = os.path.realpath(d)
        for shard in shards:
            assert shard.parent == d and os.path.realpath(shard).startswith(real + os.sep), shard


@pytest.fixture(scope="module")
def api_ckpt(tmp_path_factory) -> Path:
    import torch

    from lors_convert import convert, save
    from tests.models import StackedMLP

    torch.manual_seed(0)
    model, report = convert(StackedMLP(), rank=2)
    return save(model, tmp_path_factory.mktemp("ckpt") / "c.lors", report)


FIELDS = st.sampled_from(["members", "owner", "name", "attr", "shared", "path", "alias", "manifest_key"])


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(field=FIELDS, names=st.lists(NAMES, min_size=1, max_size=4), nested=NESTED)
def test_fuzz_config_names_read_cleanly(field, names, nested, api_ckpt):
    """Names in the config (members, owners, tensor and manifest keys) at will: read, merged and loaded
    cleanly or refused on one line; never a file outside the checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    import lors_convert
    from lors_convert.checkpoint import Checkpoint, merge_checkpoint

    with tempfile.TemporaryDirectory() as root:
        ckpt = Path(shutil.copytree(api_ckpt, Path(root) / "c.lors"))
        config = json.loads((ckpt / "lors_config.json").read_text())
        stack, entry = config["stacks"][0], config["stacks"][0]["params"][0]
        if field == "members":
            stack["members"] = (names * 4)[: len(stack["members"])]
        elif field == "shared":
            entry["shared"] = names
        elif field == "path":
            stack["path"] = nested
        elif field == "alias":
            config["manifest"]["aliases"] = {n: names[0] for n in names if isinstance(n, str)}
        elif field == "manifest_key":
            config["manifest"]["keys"].update({n: nested for n in names if isinstance(n, str)})
        else:
            entry[field] = names[0]
        text = json.dumps(config)
        (ckpt / "lors_config.json").write_text(text)
        tensors = load_file(str(ckpt / "model.safetensors"))
        save_file(tensors, str(ckpt / "model.safetensors"), metadata={"lors_config": text})
        for fn in (
            lambda: Checkpoint(ckpt).report(),
            lambda: lors_convert.load(ckpt, arch="tests.models:stacked_mlp"),
            lambda: merge_checkpoint(ckpt, Path(root) / "m.safetensors", force=True),
        ):
            try:
                fn()
            except LorsError as e:
                assert "\n" not in str(e) and str(e).strip(), str(e)
        assert sorted(p.name for p in Path(root).iterdir()) in (["c.lors"], ["c.lors", "m.safetensors"])


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    """huggingface_hub stores snapshot files as links to ../../blobs: that is inside the repo, not out."""
    from lors_convert.io.confine import confined

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc123")
    assert confined(snapshot, "config.json", "side file") == snapshot / "config.json"
    (tmp_path / "elsewhere").write_text("secret")
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="links to a file outside"):
        confined(snapshot, "tokenizer.json", "side file")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").symlink_to("../models--org--name/blobs/abc123")  # not a snapshot: refused
    with pytest.raises(Exception, match="links to a file outside"):
        confined(plain, "config.json", "side file")
