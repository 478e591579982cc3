"""Reading a LORS checkpoint directory: the config validated, every promised tensor checked, lazy access."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LorsError, LorsUsageError, short
from ..io.atomic import recover_output
from ..io.confine import confined
from ..io.safetensors import INDEX_NAME, WEIGHTS_NAME, SafetensorsReader, directory_weight_files, read_json
from ..report import Report
from .format import CONFIG_NAME, REPORT_NAME, check_report_types, json_or_none, lors_members, validate_config


class Checkpoint:
    """A validated LORS checkpoint directory with lazy tensor access (``safetensors.safe_open``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        recover_output(self.path)  # a replacement killed half-way: the previous checkpoint comes back
        if not self.path.exists():
            raise LorsUsageError(f"{self.path}: no such file or directory")
        if not confined(self.path, CONFIG_NAME, "config").is_file():
            raise LorsError(f"{self.path}: not a LORS checkpoint (no {CONFIG_NAME})")
        self.config = read_json(self.path / CONFIG_NAME)
        validate_config(self.config, self.path / CONFIG_NAME)
        files = directory_weight_files(self.path)  # an index's shards are confined to the directory
        if files is None:
            files = [self.path / WEIGHTS_NAME]
        for f in files:
            if not f.is_file():
                raise LorsError(f"{self.path}: missing weight file {f.name}")
        self.tensors = SafetensorsReader(files)
        for f, meta in self.tensors.metadata.items():
            stored = meta.get("lors_config")
            if stored is not None and json_or_none(stored) != self.config:
                raise LorsError(
                    f"{self.path / CONFIG_NAME} differs from the config in {f.name}'s metadata: "
                    "the checkpoint was edited or mixed with another"
                )
        self._check_tensors()

    # -- structure
    @property
    def stacks(self) -> list[dict]:
        return self.config["stacks"]

    @property
    def manifest(self) -> dict:
        return self.config["manifest"]

    @property
    def source(self) -> dict:
        return self.config["source"]

    def keys(self) -> list[str]:
        return self.tensors.keys()

    def side_files(self) -> list[str]:
        """The files next to the weights that came from the source (config, tokenizer, GGUF metadata)."""
        own = {CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, INDEX_NAME}
        return sorted(
            f.name
            for f in self.path.iterdir()
            if f.is_file() and f.name not in own and not f.name.endswith(".safetensors")
        )

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def report(self) -> Report:
        path = confined(self.path, REPORT_NAME, "report")
        if not path.is_file():
            raise LorsError(f"{self.path}: missing {REPORT_NAME}")
        try:
            report = Report.from_dict(read_json(path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LorsError(f"{path}: malformed report ({short(e)})") from None
        check_report_types(report, path)
        recorded = {(tuple(s.members), m.name): list(m.ranks) for s in report.stacks for m in s.matrices}
        for stack in self.stacks:
            for entry in stack["params"]:
                ranks = recorded.get((tuple(stack["members"]), entry["name"]))
                if ranks != list(entry["ranks"]):
                    raise LorsError(
                        f"{path} does not match {CONFIG_NAME}: {stack['members'][0]}.. {entry['name']} "
                        f"has ranks {ranks} in the report, {entry['ranks']} in the config"
                    )
        return report

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise LorsError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
        return self.tensors.get(key)

    # -- internals
    def _shape(self, key: str) -> tuple:
        if key not in self.tensors:
            raise LorsError(f"{self.path}: tensor {key!r} named in {CONFIG_NAME} is missing")
        return self.tensors.shapes[key]

    def _check_tensors(self) -> None:
        """Every tensor the config promises is there with the right shape."""
        for stack in self.stacks:
            for entry in stack["params"]:
                members = lors_members(stack, entry)  # a member kept dense has its dense tensors instead
                owner0 = f"{members[0]}.{entry['owner']}"
                if entry["kind"] == "static":
                    d, h = entry["matrix"]
                    if entry["shared"]:  # [] for a private-only stack
                        self._expect(f"{owner0}.shared", (d, h), entry["dtype"])
                    dense = set(entry.get("dense_members", []))
                    for member, k in zip(
                        members, [k for i, k in enumerate(entry["ranks"]) if i not in dense], strict=False
                    ):
                        owner = f"{member}.{entry['owner']}"
                        self._expect(f"{owner}.lors_B", (d, k), entry["dtype"])
                        self._expect(f"{owner}.lors_A", (k, h), entry["dtype"])
                else:
                    for name in entry["shared"]:
                        self._shape(f"{owner0}.{name}")
        owners = self.owner_prefixes()
        for key in self.tensors.shapes:  # a stray tensor under a static owner (a dropped "shared") is refused
            prefix, _, rel = key.rpartition(".")
            stack_entry = owners.get(prefix + ".")
            if stack_entry is None or stack_entry[1]["kind"] != "static" or key in self.manifest["keys"]:
                continue
            stack, entry, i = stack_entry
            first = stack["members"][i] == lors_members(stack, entry)[0]  # the holder of the shared tensors
            if rel not in ("lors_A", "lors_B") and not (first and rel in entry["shared"]):
                raise LorsError(f"{self.path}: tensor {key!r} is not named in {CONFIG_NAME}")
        produced = set(owners)
        for key in self.manifest["keys"]:
            if key in self.manifest["aliases"] or any(key.startswith(p) for p in produced):
                continue
            spec = self.manifest["keys"][key]
            self._expect(key, tuple(spec["shape"]), spec["dtype"])

    def _expect(self, key: str, shape: tuple, dtype: str | None = None) -> None:
        got = self._shape(key)
        if tuple(got) != tuple(shape):
            raise LorsError(
                f"{self.path}: tensor {key!r} has shape {list(got)}, {CONFIG_NAME} says {list(shape)}"
            )
        stored = self.tensors.dtype_names.get(key)
        if dtype is not None and stored is not None and stored != dtype:
            raise LorsError(f"{self.path}: tensor {key!r} is stored as {stored}, {CONFIG_NAME} says {dtype}")

    def owner_prefixes(self) -> dict[str, tuple[dict, dict, int]]:
        """``"<member>.<owner>."`` -> (stack, entry, member index) for every converted owner (a
        member kept dense is no LORS owner: its tensors are stored as they were)."""
        out = {}
        for stack in self.stacks:
            for entry in stack["params"]:
                dense = set(entry.get("dense_members", []))
                for i, member in enumerate(stack["members"]):
                    if i not in dense:
                        out[f"{member}.{entry['owner']}."] = (stack, entry, i)
        return out

    def owner_state(self, stack: dict, entry: dict, i: int) -> dict[str, torch.Tensor]:
        """The LORS layer's tensors of member ``i`` under their relative names."""
        prefix = f"{stack['members'][i]}.{entry['owner']}."
        first = f"{lors_members(stack, entry)[0]}.{entry['owner']}."
        state = {name: self.get(first + name) for name in entry["shared"]}
        for key in self.tensors.keys():
            if key.startswith(prefix):
                state.setdefault(key[len(prefix) :], self.get(key))
        return state
