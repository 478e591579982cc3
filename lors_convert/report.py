"""The savings report: what was shared, what it costs, how well each layer is reconstructed.

Plain dataclasses with ``to_dict``/``from_dict`` (the ``report.json`` of a checkpoint) and a rich
rendering for people. Counting lives in :mod:`lors_convert.decompose`; this module only sums.
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
    def stacked_dense_params(self) -> int:
        return sum(s.dense_params for s in self.stacks)

    @property
    def stacked_lors_params(self) -> int:
        return sum(s.lors_params for s in self.stacks)

    @property
    def savings(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict:
        stacks = []
        for s in self.stacks:
            matrices = []
            for m in s.matrices:
                row = {k: v for k, v in asdict(m).items() if k != "dense_members" or v}  # absent when none
                matrices.append({**row, "savings": m.savings})
            stacks.append({"path": s.path, "members": s.members, "layers": len(s.members),
                           "dense_params": s.dense_params, "lors_params": s.lors_params,
                           "savings": s.savings, "matrices": matrices, "kept_dense": s.kept_dense})
        return {
            "stacks": stacks,
            "total": {
                "params_before": self.params_before, "params_after": self.params_after,
                "savings": self.savings,
                "stacked_dense_params": self.stacked_dense_params,
                "stacked_lors_params": self.stacked_lors_params,
            },
            "warnings": self.warnings,
            "quality": self.quality,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        stacks = []
        for s in data["stacks"]:
            matrices = []
            for m in s["matrices"]:
                m = {k: v for k, v in m.items() if k != "savings"}
                matrices.append(MatrixReport(**m))
            stacks.append(StackReport(path=s["path"], members=list(s["members"]), matrices=matrices,
                                      kept_dense=dict(s.get("kept_dense", {}))))
        total = data["total"]
        return cls(stacks=stacks, params_before=total["params_before"], params_after=total["params_after"],
                   warnings=list(data.get("warnings", [])), quality=dict(data.get("quality", {})))


def _fmt_params(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _literal(report: Report) -> Report:
    """A copy whose texts print literally under rich markup: names and warnings come from files."""
    import copy

    from rich.markup import escape

    report = copy.deepcopy(report)
    for s in report.stacks:
        s.path, s.members = escape(s.path), [escape(m) for m in s.members]
        s.kept_dense = {escape(k): escape(v) for k, v in s.kept_dense.items()}
        for m in s.matrices:
            m.name = escape(m.name)
    report.warnings = [escape(w) for w in report.warnings]
    report.quality = {escape(str(k)): escape(str(v)) for k, v in report.quality.items()}
    return report


def render(report: Report, console=None, title: str = "LORS savings") -> None:
    """Print the per-stack and per-matrix tables with rich."""
    from rich.console import Console
    from rich.table import Table

    report = _literal(report)

    console = console or Console(stderr=True)
    table = Table(title=title, show_lines=False)
    for col in ("stack / matrix", "layers", "rank x groups", "dense", "LORS", "savings",
                "rel. error (max)", "retained energy (min)"):
        if col == "stack / matrix":
            table.add_column(col, justify="left", overflow="fold", min_width=24, ratio=3)
        else:
            table.add_column(col, justify="right", overflow="fold")
    for s in report.stacks:
        table.add_row(f"[bold]{s.path or '<root>'}[/] ({s.members[0].rsplit('.', 1)[-1]}..)",
                      str(len(s.members)), "", _fmt_params(s.dense_params), _fmt_params(s.lors_params),
                      f"{100 * s.savings:.1f}%", "", "")
        for m in s.matrices:
            rank = "full" if m.rank is None else str(m.rank)
            groups = ",".join(map(str, m.groups)) if len(set(m.groups)) > 1 else str(m.groups[0])
            err = f"{max(m.relative_error):.4f}" if m.relative_error else "-"
            ret = f"{min(m.retained_energy):.3f}" if m.retained_energy else "-"
            table.add_row(f"  {m.name}" + (" [yellow](clamped)[/]" if m.clamped else "")
                          + ("" if m.shared else " [dim](no shared part)[/]")
                          + (f" [dim]({len(m.dense_members)} dense)[/]" if m.dense_members else ""), "",
                          f"{rank} x {groups}", _fmt_params(m.dense_params), _fmt_params(m.lors_params),
                          f"{100 * m.savings:.1f}%", err, ret)
        reasons: dict[str, int] = {}
        for why in s.kept_dense.values():
            reasons[why] = reasons.get(why, 0) + 1
        for why, count in reasons.items():
            table.add_row(f"  [dim]{count} kept dense: {why}[/]", "", "", "", "", "", "", "")
    table.add_row("[bold]stacked total[/]", "", "", _fmt_params(report.stacked_dense_params),
                  _fmt_params(report.stacked_lors_params),
                  f"{100 * (1 - report.stacked_lors_params / max(report.stacked_dense_params, 1)):.1f}%", "", "")
    table.add_row("[bold]whole model[/]", "", "", _fmt_params(report.params_before),
                  _fmt_params(report.params_after), f"{100 * report.savings:.1f}%", "", "")
    console.print(table)
    for key, value in report.quality.items():
        console.print(f"quality: {key} = {value}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
