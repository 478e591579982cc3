"""The savings report: what was shared, what it costs, how well each layer is reconstructed.

Plain dataclasses with ``to_dict``/``from_dict`` (the ``report.json`` of a checkpoint); the CLI
renders them for people (:mod:`lors_convert.cli.render`). Counting lives in
:mod:`lors_convert.decompose`; this module only sums. The stacked totals count the matrices a
conversion kept dense (at their dense size on both sides), as the table's total row does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MatrixReport:
    """One stacked parameter of one stack."""

    name: str  # relative to a member, e.g. "attn.c_attn.weight"
    kind: str  # "static" (LORST) or "adaptive" (LORSA)
    layer: str  # "linear", "conv2d", "conv1d", "generator"
    shape: list[int]
    matrix: list[int]  # (d, h) factorized
    rank: int | None  # r per group; None = full rank
    groups: list[int]  # K_i per layer
    ranks: list[int]  # total private rank per layer after clamping
    dense_params: int
    lors_params: int
    relative_error: list[float] = field(default_factory=list)  # ||W_i - What_i|| / ||W_i|| per layer
    retained_energy: list[float] = field(default_factory=list)  # kept / total residual energy per layer
    clamped: bool = False  # some K_i * r exceeded min(d, h)
    shared: bool = True  # False: private-only (no shared part, W_i = B_i A_i)
    dense_members: list[int] = field(default_factory=list)  # members kept dense (exact): a rank would not pay

    @property
    def savings(self) -> float:
        return 1.0 - self.lors_params / self.dense_params if self.dense_params else 0.0


@dataclass
class StackReport:
    path: str
    members: list[str]
    matrices: list[MatrixReport] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)  # relname -> reason
    kept_dense_params: dict[str, int] = field(default_factory=dict)  # relname -> parameters over all layers

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.matrices)

    @property
    def lors_params(self) -> int:
        return sum(m.lors_params for m in self.matrices)

    @property
    def savings(self) -> float:
        return 1.0 - self.lors_params / self.dense_params if self.dense_params else 0.0


@dataclass
class Report:
    stacks: list[StackReport] = field(default_factory=list)
    params_before: int = 0  # whole model, shared storage counted once
    params_after: int = 0
    warnings: list[str] = field(default_factory=list)
    quality: dict = field(default_factory=dict)  # function-level fidelity, when measured

    @property
    def kept_dense_params(self) -> int:
        """The stacked matrices left dense (the same on both sides of the conversion)."""
        return sum(sum(s.kept_dense_params.values()) for s in self.stacks)

    @property
    def stacked_dense_params(self) -> int:
        """Every stacked matrix at its dense size: the converted ones and those kept dense."""
        return sum(s.dense_params for s in self.stacks) + self.kept_dense_params

    @property
    def stacked_lors_params(self) -> int:
        """What the stacked matrices take after the conversion, those kept dense included."""
        return sum(s.lors_params for s in self.stacks) + self.kept_dense_params

    @property
    def savings(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def stacked_fraction(self) -> float | None:
        """What the stacked matrices keep, matrices left dense included: a budget's measure."""
        dense = self.stacked_dense_params
        return self.stacked_lors_params / dense if dense else None

    def to_dict(self) -> dict:
        stacks = []
        for s in self.stacks:
            matrices = []
            for m in s.matrices:
                row = {k: v for k, v in asdict(m).items() if k != "dense_members" or v}  # absent when none
                matrices.append({**row, "savings": m.savings})
            stacks.append(
                {
                    "path": s.path,
                    "members": s.members,
                    "layers": len(s.members),
                    "dense_params": s.dense_params,
                    "lors_params": s.lors_params,
                    "savings": s.savings,
                    "matrices": matrices,
                    "kept_dense": s.kept_dense,
                    "kept_dense_params": s.kept_dense_params,
                }
            )
        return {
            "stacks": stacks,
            "total": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "savings": self.savings,
                "stacked_dense_params": self.stacked_dense_params,
                "stacked_lors_params": self.stacked_lors_params,
                "kept_dense_params": self.kept_dense_params,
                "stacked_fraction": self.stacked_fraction,
            },
            "warnings": self.warnings,
            "quality": self.quality,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        stacks = []
        for s in data["stacks"]:
            matrices = []
            for m in s["matrices"]:
                m = {k: v for k, v in m.items() if k != "savings"}
                matrices.append(MatrixReport(**m))
            stacks.append(
                StackReport(
                    path=s["path"],
                    members=list(s["members"]),
                    matrices=matrices,
                    kept_dense=dict(s.get("kept_dense", {})),
                    kept_dense_params=dict(s.get("kept_dense_params", {})),
                )
            )
        total = data["total"]
        return cls(
            stacks=stacks,
            params_before=total["params_before"],
            params_after=total["params_after"],
            warnings=list(data.get("warnings", [])),
            quality=dict(data.get("quality", {})),
        )
