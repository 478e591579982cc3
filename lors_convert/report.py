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
    def stacked_dense_params(self) -> int:
        return sum(s.dense_params for s in self.stacks)

    @property
    def stacked_lors_params(self) -> int:
        return sum(s.lors_params for s in self.stacks)

    @property
    def savings(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def stacked_fraction(self) -> float | None:
        """What the stacked matrices keep, matrices left dense included: a budget's measure."""
        kept = sum(sum(s.kept_dense_params.values()) for s in self.stacks)
        dense = self.stacked_dense_params + kept
        return (self.stacked_lors_params + kept) / dense if dense else None

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


def _ranks(m: MatrixReport) -> str:
    """``r x K`` of a uniform conversion; ``lo-hi`` per-layer total ranks after a budget."""
    if m.rank is None:
        rank = "full"
    elif len(set(m.ranks)) > 1 and all(g == 1 for g in m.groups):
        return f"{min(m.ranks)}-{max(m.ranks)}"
    else:
        rank = str(m.rank)
    groups = ",".join(map(str, m.groups)) if len(set(m.groups)) > 1 else str(m.groups[0])
    return f"{rank} x {groups}"


def fidelity_line(quality: dict, prefix: str = "heldout") -> str | None:
    """One line a person reads: what the conversion kept of the model's function, and on what."""
    if f"{prefix}_rel_error" not in quality:
        return None
    q = {k.removeprefix(prefix + "_"): v for k, v in quality.items() if k.startswith(prefix + "_")}
    parts = []
    if q.get("cosine") is not None:
        parts.append(f"embedding cosine {q['cosine']:.4f} (5th pct {q['cosine_p05']:.4f})")
    if q.get("ppl") is not None:
        parts.append(f"perplexity {q['ppl']:.4g} vs {q['ppl_source']:.4g} ({q['ppl_ratio']:.4g}x)")
    if q.get("top1") is not None:
        parts.append(f"top-1 agreement {q['top1']:.4f}")
    if q.get("kl") is not None:
        parts.append(f"KL {q['kl']:.4f}")
    if q.get("rel_error") is not None:
        parts.append(f"rel. output error {q['rel_error']:.4f}")
    synthetic = " (synthetic inputs)" if q.get("synthetic") else ""
    return (
        f"fidelity on {q.get('probe', 'held-out inputs')}{synthetic}, {q.get('samples')} samples: "
        + ", ".join(parts)
    )


def render(report: Report, console=None, title: str = "LORS savings") -> None:
    """Print the per-stack and per-matrix tables and the fidelity line with rich (warnings are the
    caller's, on stderr)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    line = fidelity_line(report.quality)
    frontier = report.quality.get("target")
    report = _literal(report)

    console = console or Console()
    table = Table(title=title, show_lines=False)
    for col in (
        "stack / matrix",
        "layers",
        "rank x groups",
        "dense",
        "LORS",
        "savings",
        "rel. error (max)",
        "retained energy (min)",
    ):
        if col == "stack / matrix":
            table.add_column(col, justify="left", overflow="fold", min_width=24, ratio=3)
        else:
            table.add_column(col, justify="right", overflow="fold")
    for s in report.stacks:
        table.add_row(
            f"[bold]{s.path or '<root>'}[/] ({s.members[0].rsplit('.', 1)[-1]}..)",
            str(len(s.members)),
            "",
            _fmt_params(s.dense_params),
            _fmt_params(s.lors_params),
            f"{100 * s.savings:.1f}%",
            "",
            "",
        )
        for m in s.matrices:
            err = f"{max(m.relative_error):.4f}" if m.relative_error else "-"
            ret = f"{min(m.retained_energy):.3f}" if m.retained_energy else "-"
            table.add_row(
                f"  {m.name}"
                + (" [yellow](clamped)[/]" if m.clamped else "")
                + ("" if m.shared else " [dim](no shared part)[/]")
                + (f" [dim]({len(m.dense_members)} dense)[/]" if m.dense_members else ""),
                "",
                _ranks(m),
                _fmt_params(m.dense_params),
                _fmt_params(m.lors_params),
                f"{100 * m.savings:.1f}%",
                err,
                ret,
            )
        for name in s.kept_dense:
            n = s.kept_dense_params.get(name)
            size = _fmt_params(n) if n is not None else ""
            table.add_row(f"  [dim]{name} (kept dense)[/]", "", "dense", size, size, "0.0%", "0", "")
    fraction = report.stacked_fraction
    kept = sum(sum(s.kept_dense_params.values()) for s in report.stacks)
    table.add_row(
        "[bold]stacked total[/]",
        "",
        "",
        _fmt_params(report.stacked_dense_params + kept),
        _fmt_params(report.stacked_lors_params + kept),
        f"{100 * (1 - fraction):.1f}%" if fraction is not None else "",
        "",
        "",
    )
    table.add_row(
        "[bold]whole model[/]",
        "",
        "",
        _fmt_params(report.params_before),
        _fmt_params(report.params_after),
        f"{100 * report.savings:.1f}%",
        "",
        "",
    )
    console.print(table)
    reasons: dict[str, list[str]] = {}
    for s in report.stacks:
        for name, why in s.kept_dense.items():
            reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        console.print(f"[dim]kept dense ({len(names)}): {why}: {', '.join(sorted(set(names)))}[/]")
    if line is not None:
        console.print(escape(line))
    if isinstance(frontier, dict):
        console.print(
            f"target {escape(str(frontier.get('target')))}: the budgets tried (fraction of the stacked "
            "parameters kept -> fidelity)"
        )
        for p in frontier.get("frontier", []):
            kept = "-" if p.get("stacked_fraction") is None else f"{p['stacked_fraction']:.3f}"
            console.print(
                escape(
                    f"  budget {p['budget']:.3f}: kept {kept}, "
                    + ", ".join(
                        f"{k} {v:.4f}"
                        for k, v in p.items()
                        if k in ("cosine", "top1", "ppl_ratio", "kl", "rel_error") and v is not None
                    )
                    + (" (meets)" if p.get("meets") else "")
                    + (f" {p['note']}" if p.get("note") else "")
                )
            )
    for key, value in report.quality.items():
        if not key.startswith(("heldout_", "target")):
            console.print(f"quality: {key} = {value}")
