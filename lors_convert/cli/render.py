"""The savings report for people: the per-stack and per-matrix table (rich), and the fidelity block
under it (what the conversion kept of the model's function, what it was calibrated on, the budgets
a ``--target`` search tried, what healing did).

The table's totals are the report's (:attr:`~lors_convert.report.Report.stacked_dense_params` and
friends: the matrices kept dense included), so ``report.json`` and the table show the same numbers.
"""

from __future__ import annotations

import copy

from ..options import FIDELITY_METRICS
from ..report import MatrixReport, Report

COLUMNS = (
    "stack / matrix",
    "layers",
    "rank x groups",
    "dense",
    "LORS",
    "savings",
    "rel. error (max)",
    "retained energy (min)",
)


def fmt_params(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render(report: Report, console=None, title: str = "LORS savings") -> None:
    """Print the table and the fidelity block with rich (warnings are the caller's, on stderr)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    console.print(table(report, title))
    for line in kept_dense_lines(report):
        console.print(f"[dim]{escape(line)}[/]")
    for line in fidelity_block(report.quality):
        console.print(escape(line))


def table(report: Report, title: str):
    """The rich table: a row per stack, per converted matrix and per matrix kept dense, then the
    stacked total and the whole model."""
    from rich.table import Table

    shown = _literal(report)
    t = Table(title=title, show_lines=False)
    for col in COLUMNS:
        if col == "stack / matrix":
            t.add_column(col, justify="left", overflow="fold", min_width=24, ratio=3)
        else:
            t.add_column(col, justify="right", overflow="fold")
    for s in shown.stacks:
        members = f"({s.members[0].rsplit('.', 1)[-1]}..)"
        t.add_row(f"[bold]{s.path or '<root>'}[/] {members}", str(len(s.members)), "", *_sizes(s), "", "")
        for m in s.matrices:
            t.add_row(*_matrix_row(m))
        for name in s.kept_dense:
            n = s.kept_dense_params.get(name)
            size = fmt_params(n) if n is not None else ""
            t.add_row(f"  [dim]{name} (kept dense)[/]", "", "dense", size, size, "0.0%", "0", "")
    fraction = report.stacked_fraction
    t.add_row(
        "[bold]stacked total[/]",
        "",
        "",
        fmt_params(report.stacked_dense_params),
        fmt_params(report.stacked_lors_params),
        f"{100 * (1 - fraction):.1f}%" if fraction is not None else "",
        "",
        "",
    )
    t.add_row("[bold]whole model[/]", "", "", *_sizes(report), "", "")
    return t


def _sizes(part) -> tuple[str, str, str]:
    """Dense, LORS and savings cells of a stack or of the whole model."""
    if isinstance(part, Report):
        dense, lors = part.params_before, part.params_after
    else:
        dense, lors = part.dense_params, part.lors_params
    return fmt_params(dense), fmt_params(lors), f"{100 * part.savings:.1f}%"


def _matrix_row(m: MatrixReport) -> tuple[str, ...]:
    name = (
        f"  {m.name}"
        + (" [yellow](clamped)[/]" if m.clamped else "")
        + ("" if m.shared else " [dim](no shared part)[/]")
        + (f" [dim]({len(m.dense_members)} dense)[/]" if m.dense_members else "")
    )
    err = f"{max(m.relative_error):.4f}" if m.relative_error else "-"
    ret = f"{min(m.retained_energy):.3f}" if m.retained_energy else "-"
    return (
        name,
        "",
        _ranks(m),
        fmt_params(m.dense_params),
        fmt_params(m.lors_params),
        f"{100 * m.savings:.1f}%",
        err,
        ret,
    )


def _literal(report: Report) -> Report:
    """A copy whose texts print literally under rich markup: names come from files."""
    from rich.markup import escape

    report = copy.deepcopy(report)
    for s in report.stacks:
        s.path, s.members = escape(s.path), [escape(m) for m in s.members]
        s.kept_dense = {escape(k): escape(v) for k, v in s.kept_dense.items()}
        s.kept_dense_params = {escape(k): v for k, v in s.kept_dense_params.items()}
        for m in s.matrices:
            m.name = escape(m.name)
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


def kept_dense_lines(report: Report) -> list[str]:
    """Why matrices were kept dense, one line per reason."""
    reasons: dict[str, list[str]] = {}
    for s in report.stacks:
        for name, why in s.kept_dense.items():
            reasons.setdefault(why, []).append(name)
    return [
        f"kept dense ({len(names)}): {why}: {', '.join(sorted(set(names)))}" for why, names in reasons.items()
    ]


# ---------------------------------------------------------------------------------------------
# the fidelity block

LABELS = {  # a fidelity metric -> what a person reads
    "cosine": "embedding cosine",
    "top1": "top-1 agreement",
    "ppl_ratio": "perplexity ratio",
    "kl": "KL divergence",
    "rel_error": "rel. output error",
}


def fidelity_block(quality: dict) -> list[str]:
    """The report's quality figures as lines a person reads: the held-out fidelity (before healing
    too, when healed), the calibration, the budget, the target search and the healing run."""
    lines = fidelity_lines(quality, "before_heal_heldout", "before healing")
    lines += fidelity_lines(quality, "heldout", "after healing" if "heal_steps" in quality else "")
    lines += _calibration_lines(quality) + _budget_lines(quality) + _target_lines(quality.get("target"))
    lines += _heal_lines(quality)
    return lines


def fidelity_lines(quality: dict, prefix: str = "heldout", when: str = "") -> list[str]:
    """``fidelity on PROBES, N samples:`` and one line per metric measured."""
    if f"{prefix}_rel_error" not in quality:
        return []
    q = {k.removeprefix(prefix + "_"): v for k, v in quality.items() if k.startswith(prefix + "_")}
    synthetic = " (synthetic inputs)" if q.get("synthetic") else ""
    head = f"fidelity{' ' + when if when else ''} on {q.get('probe', 'held-out inputs')}{synthetic}"
    lines = [f"{head}, {q.get('samples')} samples:"]
    for key in FIDELITY_METRICS:
        if key in q:
            value = "not finite" if q[key] is None else f"{q[key]:.4f}"
            lines.append(f"  {LABELS[key]:<18} {value}{_detail(key, q)}")
    return lines


def _detail(key: str, q: dict) -> str:
    if key == "cosine" and q.get("cosine_p05") is not None:
        low = f", lowest {q['cosine_min']:.4f}" if q.get("cosine_min") is not None else ""
        return f"  (5th percentile {q['cosine_p05']:.4f}{low})"
    if key == "ppl_ratio" and q.get("ppl") is not None and q.get("ppl_source") is not None:
        return f"  (perplexity {q['ppl']:.4g} against the source's {q['ppl_source']:.4g})"
    if key == "kl" and q.get("tokens"):
        return f"  (per token, {q['tokens']} tokens)"
    return ""


def _calibration_lines(quality: dict) -> list[str]:
    if "calibration_data" not in quality and not quality.get("calibrated"):
        return []
    data = quality.get("calibration_data", "the given Grams")
    samples = quality.get("calibration_samples")
    objective = quality.get("objective")
    line = f"calibrated on {data}" + (f", {samples} samples" if samples is not None else "")
    lines = [line + (f", objective {objective}" if objective else "")]
    if quality.get("heldout_data"):
        lines.append(f"  held out: {quality['heldout_data']}")
    if quality.get("calib_rel_output_error_mean") is not None:
        lines.append(
            "  rel. output error per matrix on the calibration data: "
            f"mean {quality['calib_rel_output_error_mean']:.4f}, max {quality['calib_rel_output_error_max']:.4f}"
        )
    if quality.get("closed_loop_layers"):
        lines.append(
            f"  closed loop: {quality['closed_loop_layers']} layers refitted on the converted model's inputs"
        )
    history = quality.get("refine_weighted_error")
    if history:
        lines.append(
            f"  refined {quality.get('refine_sweeps')} sweeps: weighted error "
            + " -> ".join(f"{e:.4g}" for e in history)
        )
    return lines


def _budget_lines(quality: dict) -> list[str]:
    if quality.get("budget") is None:
        return []
    kept = quality.get("stacked_fraction")
    searched = " (the smallest tried that meets the target)" if "target" in quality else ""
    shown = "" if kept is None else f": the stacked matrices keep {100 * kept:.1f}% of their parameters"
    return [f"budget {quality['budget']:.4g}{searched}{shown}"]


def _target_lines(frontier) -> list[str]:
    if not isinstance(frontier, dict):
        return []
    lines = [
        f"target {frontier.get('target')}: the budgets tried (fraction of the stacked parameters kept -> fidelity)"
    ]
    for p in frontier.get("frontier", []):
        kept = "-" if p.get("stacked_fraction") is None else f"{p['stacked_fraction']:.3f}"
        parts = [f"kept {kept}"] + [
            f"{LABELS[k]} {p[k]:.4f}" for k in FIDELITY_METRICS if p.get(k) is not None
        ]
        lines.append(
            f"  budget {p['budget']:.3f}: {', '.join(parts)}"
            + (" (meets)" if p.get("meets") else "")
            + (f"; {p['note']}" if p.get("note") else "")
        )
    return lines


def _heal_lines(quality: dict) -> list[str]:
    if "heal_steps" not in quality:
        return []
    synthetic = " (synthetic inputs)" if quality.get("heal_synthetic") else ""
    lines = [
        f"healed {quality['heal_steps']} steps on {quality.get('heal_data')}{synthetic}, "
        f"{quality.get('heal_samples')} samples, loss {quality.get('heal_loss')}"
    ]
    final, best = quality.get("heal_final_loss"), quality.get("heal_best_step")
    evaluations = quality.get("heal_evaluations") or []
    if final is not None:
        lines.append(
            f"  final loss {final:.4g}; kept the state of step {best} ({len(evaluations)} evaluations)"
        )
    return lines


__all__ = ["render", "table", "fidelity_block", "fidelity_lines", "kept_dense_lines", "fmt_params"]
