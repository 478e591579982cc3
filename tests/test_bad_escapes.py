"""Names and links that lead out of a directory: a model directory or a checkpoint is read only
inside itself.

A side file, config, weight file, index or shard that is a symlink to a file outside, and an index
that names a shard by ``..``, an absolute path or a subdirectory, given to ``convert`` and ``report``
(model directories) and to ``report``, ``merge`` and ``heal`` (checkpoints). Each must fail cleanly
(see tests/badcase.py). The readers themselves are tested in tests/test_confine.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.badcase import Case, case_ids, check_case, copy_in, good, grouped, outside


def _link_out(entry: str):
    """The entry becomes a symlink to a copy of itself outside the directory (the content is valid)."""

    def tamper(t: Path, d: Path):
        target = outside(t, entry, (d / entry).read_bytes())
        (d / entry).unlink()
        (d / entry).symlink_to(target)

    return tamper


def _shard_index(names: list[str]):
    def tamper(t: Path, d: Path):
        weights = d / "model.safetensors"
        shard = d / "model-00001-of-00001.safetensors"
        weights.rename(shard)
        keys = list(load_file(str(shard)))
        mapping = {k: names[i % len(names)] for i, k in enumerate(keys)}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": mapping}))
        outside(t, "secret.safetensors", shard.read_bytes())

    return tamper


def _shard_link_out(t: Path, d: Path):
    _shard_index(["model-00001-of-00001.safetensors"])(t, d)
    _link_out("model-00001-of-00001.safetensors")(t, d)


def _index_link_out(t: Path, d: Path):
    _shard_index(["model-00001-of-00001.safetensors"])(t, d)
    _link_out("model.safetensors.index.json")(t, d)


SOURCE_TAMPERS = {
    "config_links_out": (_link_out("config.json"), ("config 'config.json' links to a file outside",)),
    "tokenizer_links_out": (_link_out("tokenizer.json"), ("side file 'tokenizer.json' links",)),
    "tokenizer_config_links_out": (
        _link_out("tokenizer_config.json"),
        ("side file 'tokenizer_config.json' links",),
    ),
    "weights_link_out": (_link_out("model.safetensors"), ("'model.safetensors' links to a file outside",)),
    "index_links_out": (_index_link_out, ("index", "links to a file outside")),
    "index_shard_dotdot": (_shard_index(["../outside/secret.safetensors"]), ("names a file outside",)),
    "index_shard_absolute": (
        lambda t, d: _shard_index([str(t / "outside" / "secret.safetensors")])(t, d),
        ("names a file outside",),
    ),
    "index_shard_subdirectory": (_shard_index(["sub/model.safetensors"]), ("names a file outside",)),
    "index_shard_links_out": (_shard_link_out, ("shard", "links to a file outside")),
}


def _source_case(command: str, kind: str) -> Case:
    tamper, words = SOURCE_TAMPERS[kind]

    def build(t):
        d = copy_in(t, "bert")
        tamper(t, d)
        return ["convert", d, "--rank", "2"] if command == "convert" else ["report", d, "--ranks", "2"]

    return Case(f"{command}_source-{kind}", build, 1, words)


CKPT_TAMPERS = {  # kind -> (tamper, words, commands it must stop)
    "config_links_out": (
        _link_out("lors_config.json"),
        ("config 'lors_config.json' links",),
        ("report", "merge", "heal"),
    ),
    "weights_link_out": (
        _link_out("model.safetensors"),
        ("'model.safetensors' links",),
        ("report", "merge", "heal"),
    ),
    "side_file_links_out": (
        _link_out("tokenizer.json"),
        ("side file 'tokenizer.json' links",),
        ("merge", "heal"),
    ),
    "report_links_out": (_link_out("report.json"), ("report 'report.json' links",), ("report", "heal")),
}


def _ckpt_case(command: str, kind: str, sharded: bool = False) -> Case:
    if sharded:
        tamper, words = (lambda t, d: _rename_shard(d)), ("names a file outside",)
    else:
        tamper, words, _ = CKPT_TAMPERS[kind]

    def build(t):
        d = copy_in(t, "bert_sharded.lors" if sharded else "bert.lors", "c.lors")
        tamper(t, d)
        if command == "heal":
            return ["heal", d, "--data", good(t, "bert"), "--steps", "2"]
        return [command, d]

    return Case(
        f"{command}_checkpoint-{kind}", build, 1, words, out="merged" if command == "merge" else "out.lors"
    )


def _rename_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (f"../{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


CONFINED = (
    [_source_case(c, k) for k in SOURCE_TAMPERS for c in ("convert", "report")]
    + [_ckpt_case(c, k) for k, (_, _, commands) in CKPT_TAMPERS.items() for c in commands]
    + [_ckpt_case(c, "index_shard_dotdot", sharded=True) for c in ("report", "merge", "heal")]
)


grouped("confined", CONFINED)


@pytest.mark.parametrize("case", CONFINED, ids=case_ids(CONFINED))
def test_name_leading_out_is_refused(case: Case, tmp_path):
    check_case(case, tmp_path)
