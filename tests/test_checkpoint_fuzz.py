"""A bounded fuzz of the checkpoint reader: mutated configs, headers, reports and indexes give
clean errors only.

Hypothesis (derandomized, 80 examples) mutates one part of a converted checkpoint: a value of the
config JSON (optionally in the weights' metadata too), header bytes, the header length, raw config
bytes, ``report.json`` or the shard index. ``Checkpoint.report``, ``merge_checkpoint`` and ``load``
then either succeed or raise a one-line ``LorsError``; ``lors report`` and ``lors merge`` exit 0, 1
or 2 with no traceback; no temporary entry is left behind.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lors_convert
from lors_convert.checkpoint import Checkpoint, merge_checkpoint
from lors_convert.errors import LorsError
from tests.badcase import ckpt_config, one_line, rewrite_weights, run


def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 200) | st.floats(allow_nan=False) | st.text(max_size=8),
    _containers,
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _replace(node, path, value, delete=False):
    if not path:
        return value
    parent = node
    for p in path[:-1]:
        parent = parent[p]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return node


MUTATIONS = st.one_of(
    st.tuples(st.just("config"), st.integers(0, 10**6), JSON, st.booleans(), st.booleans()),
    st.tuples(
        st.just("header_bytes"),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("header_length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("config_bytes"), st.integers(0, 10**6), st.binary(max_size=4)),
    st.tuples(st.just("report"), st.integers(0, 10**6), JSON, st.booleans()),
    st.tuples(st.just("index"), st.integers(0, 10**6), JSON, st.booleans()),
)


def _mutate_json(path: Path, index: int, value, delete: bool) -> None:
    data = json.loads(path.read_text())
    paths = list(_paths(data))
    path.write_text(json.dumps(_replace(data, paths[index % len(paths)], value, delete)))


def _mutate(ckpt: Path, mutation) -> None:
    kind = mutation[0]
    if kind == "report":
        _mutate_json(ckpt / "report.json", *mutation[1:])
    elif kind == "index":
        _mutate_json(ckpt / "model.safetensors.index.json", *mutation[1:])
    elif kind == "config":
        _, index, value, delete, metadata_too = mutation
        config = ckpt_config(ckpt)
        paths = list(_paths(config))
        config = _replace(config, paths[index % len(paths)], value, delete)
        (ckpt / "lors_config.json").write_text(json.dumps(config))
        if metadata_too:
            rewrite_weights(ckpt, metadata={"format": "pt", "lors_config": json.dumps(config)})
    elif kind == "header_bytes":
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        n = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        for pos, byte in mutation[1]:
            data[pos % n] = byte
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    elif kind == "header_length":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", mutation[1]) + data[8:])
    else:
        data = (ckpt / "lors_config.json").read_bytes()
        pos = mutation[1] % (len(data) + 1)
        (ckpt / "lors_config.json").write_bytes(data[:pos] + mutation[2] + data[pos + len(mutation[2]) :])


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=MUTATIONS)
def test_fuzz_checkpoint_reader(mutation, small_ckpt, sharded_ckpt):
    with tempfile.TemporaryDirectory() as d:
        ckpt = shutil.copytree(sharded_ckpt if mutation[0] == "index" else small_ckpt, Path(d) / "c.lors")
        _mutate(ckpt, mutation)
        for fn in (
            lambda: Checkpoint(ckpt).report(),
            lambda: merge_checkpoint(ckpt, Path(d) / "m.safetensors", force=True),
            lambda: lors_convert.load(ckpt),
        ):
            try:
                fn()
            except LorsError as e:
                assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        for args in (["report", ckpt, "--json"], ["merge", ckpt, "-o", Path(d) / "m2", "--force", "-q"]):
            res = run(*args)
            assert res.exit_code in (0, 1, 2), (res.exit_code, res.stderr)
            assert "Traceback" not in res.stderr and "set LORS_DEBUG=1" not in res.stderr, res.stderr
            if res.exit_code:
                one_line(res.stderr)
        assert not [p for p in Path(d).iterdir() if ".tmp-" in p.name or ".old-" in p.name]
