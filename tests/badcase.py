"""Bad-input cases: what a case builds, the command it runs, and the clean failure it must give.

A :class:`Case` builds its inputs under ``tmp/in`` and returns a ``lors`` command; :func:`check_case`
runs it and checks: exit code 1 (runtime) or 2 (usage), exactly one line on stderr that names the
problem (and the file, where a file is the problem), no traceback and no warning, nothing new on
disk (no output, no hidden ``.NAME.tmp-*`` leftover) and every input byte-identical.

Inputs that take a while to build (a tiny BERT with its tokenizer, converted checkpoints) are built
once per test run into a template directory outside the case's tree and copied in.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lors_convert.cli import app
from tests.models import StackedMLP

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
ARCH = "tests.models:stacked_mlp"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    res = run(*args)
    assert res.exit_code == 0, (res.exit_code, res.stderr)
    return res


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included) with the sha256 of its content."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    return lines[0]


def assert_clean_failure(res, code: int, words: tuple[str, ...], names: str | None) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    assert res.exit_code == code, (res.exit_code, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith("error: "), line
    for w in words:
        assert w in line, (w, line)
    if names is not None:
        assert names in line, (names, line)
    return line


# ---- inputs the cases build from


def mlp_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in StackedMLP(**kw).state_dict().items()}


def write_weights(path: Path, state=None) -> Path:
    save_file(state if state is not None else mlp_state(), str(path))
    return path


class Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def in_path(tmp: Path, name: str) -> Path:
    return tmp / "in" / name


def make_file(tmp: Path, name: str, data: bytes) -> Path:
    p = in_path(tmp, name)
    p.write_bytes(data)
    return p


def weights(tmp: Path) -> Path:
    """The StackedMLP's weights as ``in/w.safetensors``."""
    return write_weights(in_path(tmp, "w.safetensors"))


def weights_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_weights(Path(d) / "w.safetensors").read_bytes()


def torch_bytes(obj) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        torch.save(obj, Path(d) / "x.pt")
        return (Path(d) / "x.pt").read_bytes()


def st_bytes(tensors: dict) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, str(Path(d) / "x.safetensors"))
        return (Path(d) / "x.safetensors").read_bytes()


def good_tensors(t: Path, name: str = "calib.safetensors", n: int = 40) -> Path:
    """``n`` inputs for the StackedMLP (one tensor named ``input``), written once per case tree."""
    p = in_path(t, name)
    if not p.exists():
        torch.manual_seed(1)
        save_file({"input": torch.randn(n, 8)}, str(p))
    return p


def outside(t: Path, name: str, data: bytes = b"{}") -> Path:
    """A file beside the case's inputs, outside any model directory or checkpoint."""
    p = t / "outside" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def old_output(path: Path) -> Path:
    """A previous output directory holding a file that must survive."""
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("precious")
    return path


# ---- editing a converted checkpoint


def ckpt_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "lors_config.json").read_text())


def rewrite_weights(ckpt: Path, tensors=None, metadata=None) -> None:
    """Rewrite ``model.safetensors`` with other tensors or other metadata (the rest kept)."""
    f = ckpt / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata() or {})
    tensors = load_file(str(f)) if tensors is None else tensors
    save_file(tensors, str(f), metadata=meta if metadata is None else metadata)


def set_config(ckpt: Path, config: dict, metadata_too: bool) -> None:
    """Write ``config`` as the checkpoint's config file, and into the weights' metadata if asked."""
    (ckpt / "lors_config.json").write_text(json.dumps(config, indent=1))
    if metadata_too:
        rewrite_weights(ckpt, metadata={"format": "pt", "lors_config": json.dumps(config)})


# ---- command builders


def convert_args(src_builder, *extra) -> Callable[[Path], list]:
    return lambda tmp: ["convert", src_builder(tmp), *extra]


def conv(*flags) -> Callable[[Path], list]:
    """``convert`` of the StackedMLP's weights with ``flags``."""
    return lambda t: ["convert", weights(t), "--arch", ARCH, *flags]


def calib_conv(*flags) -> Callable[[Path], list]:
    return lambda t: ["convert", weights(t), "--arch", ARCH, "--calibrate", good_tensors(t), *flags]


def heal_args(*flags, data=True) -> Callable[[Path], list]:
    def build(t):
        ckpt = copy_in(t, "mlp.lors")
        return ["heal", ckpt, "--arch", ARCH, *(["--data", good_tensors(t)] if data else []), *flags]

    return build


# ---- templates: built once, copied into each case's tree

BERT_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [f"w{i}" for i in range(40)]
    + "the a river stone is was where what how why you i".split()
)
TEXT = "\n".join(f"the river w{i} is a stone w{i + 1}" for i in range(30)) + "\n"


@functools.cache
def template(name: str) -> Path:
    """Built once per test run: ``mlp.safetensors``, ``mlp.lors``, ``mlp2.lors`` (rank 2), ``bert``
    (an HF directory with its tokenizer), ``bert.lors``, ``bert_sharded.lors``."""
    root = _template_root()
    target = root / name
    if name == "mlp.safetensors":
        write_weights(target)
    elif name in ("mlp.lors", "mlp2.lors"):
        rank = "4" if name == "mlp.lors" else "2"
        ok("convert", template("mlp.safetensors"), "--arch", ARCH, "--rank", rank, "-o", target, "-q")
    elif name == "bert":
        _write_bert(root, target)
    elif name in ("bert.lors", "bert_sharded.lors"):
        extra = ["--max-shard-size", "20KB"] if "sharded" in name else []
        ok("convert", template("bert"), "--rank", "2", "-o", target, "-q", *extra)
    return target


def _write_bert(root: Path, target: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    (root / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(str(target))
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(BERT_VOCAB),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(target))


@functools.lru_cache(maxsize=1)
def _template_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lors-bad-inputs-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def copy_in(tmp: Path, name: str, as_name: str | None = None) -> Path:
    source = template(name)
    target = in_path(tmp, as_name or name)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return target


def tokens(ids) -> dict:
    ids = torch.as_tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.int64)}


def good(t: Path, model: str, kind: str = "text") -> Path:
    """Good data of the same kind as ``kind``'s bad file (a held-out file is read like the calibration one)."""
    if model == "mlp":
        return good_tensors(t, "good.safetensors")
    if kind.startswith("token"):
        torch.manual_seed(2)
        ids = torch.randint(5, len(BERT_VOCAB), (16, 6))
        return make_file(t, "good.safetensors", st_bytes(tokens(ids)))
    return make_file(t, "good.txt", TEXT.encode())


# ---- the cases and their check


@dataclass
class Case:
    id: str
    build: Callable[[Path], list]  # tmp -> command args (the output is added as -o tmp/out...)
    code: int
    words: tuple[str, ...]
    names: str | None = "{input}"  # what the message must name; None for pure option errors
    out: str = "out.lors"
    marker: bool = False  # a pickle payload that must not run
    group: str = "source"  # what kind of input is wrong (the test id starts with it)


def grouped(group: str, cases: list[Case]) -> list[Case]:
    for case in cases:
        case.group = group
    return cases


def case_ids(cases: list[Case]) -> list[str]:
    return [f"{c.group}-{c.id}" for c in cases]


def check_case(case: Case, tmp_path: Path) -> None:
    """Run ``case`` in ``tmp_path``: a clean failure, no warning, nothing written, inputs unchanged."""
    (tmp_path / "in").mkdir()
    args = case.build(tmp_path)
    out = tmp_path / case.out
    if args and args[0] in ("convert", "merge", "heal"):
        args += ["-o", out]
    existed = os.path.lexists(out)
    before = tree_state(tmp_path)
    with warnings.catch_warnings(record=True) as caught:  # a warning is a second line on a user's stderr
        warnings.simplefilter("always")
        res = run(*args)
    shown = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    assert not shown, shown
    names = case.names.format(input=args[1] if len(args) > 1 else "", tmp=tmp_path) if case.names else None
    line = assert_clean_failure(res, case.code, (), names)
    for w in case.words:  # not in the case's temporary path, which holds its name
        assert w in line.replace(str(tmp_path), "<tmp>"), (w, line)
    assert os.path.lexists(out) == existed
    assert tree_state(tmp_path) == before  # inputs untouched, nothing written, no hidden leftovers
    if case.marker:
        assert not (tmp_path / "marker").exists(), "the pickle payload ran"
