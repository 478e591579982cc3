"""Rank sweep of a dense model: projected parameters and reconstruction error for several ranks.

One singular-value computation per stacked parameter serves every rank: by Eckart-Young the error
at total rank ``k`` is the energy of the singular values past ``k``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .counting import count_parameters
from .decompose.lorst import as_matrix, compute_dtype, dense_param_count, lors_param_count
from .discover.plan import plan_conversion
from .errors import LorsError
from .finite import first_non_finite
from .io.atomic import atomic_output


def residual_spectra(weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of each ``W_i - mean`` (N, m) and the norms ``||W_i||_F`` (N,)."""
    dtype = compute_dtype(weights[0].dtype)
    W = torch.stack([as_matrix(w).to(dtype) for w in weights])  # (N, d, h)
    R = W - W.mean(dim=0)  # (N, d, h)
    return torch.linalg.svdvals(R).double(), torch.linalg.matrix_norm(W).double()


def rank_sweep(model: nn.Module, ranks: list[int], include=None, exclude=None) -> dict:
    plan = plan_conversion(model, None, None, include, exclude, require_savings=False)
    params_before = count_parameters(model)
    spectra = []
    for pp in plan.params:
        weights = [model.get_parameter(k).detach() for k in pp.keys]
        bad = first_non_finite(weights, pp.keys)
        if bad is not None:
            raise LorsError(f"tensor {bad!r} contains NaN or Inf values")
        S, norms = residual_spectra(weights)
        spectra.append((pp, S, norms))
    rows = []
    for r in ranks:
        dense_total = lors_total = 0
        discarded = weight_energy = 0.0
        worst = 0.0
        for pp, S, norms in spectra:
            d, h = pp.matrix
            n = len(pp.keys)
            k = min(r, S.shape[1])
            dense = dense_param_count(d, h, n)
            lors = lors_param_count(d, h, [k] * n)
            dense_total += dense
            energy = (S[:, k:] ** 2).sum(dim=1)  # (N,)
            if lors >= dense:  # stays dense: exact
                lors_total += dense
                energy = torch.zeros_like(energy)
            else:
                lors_total += lors
            discarded += float(energy.sum())
            weight_energy += float((norms**2).sum())
            worst = max(worst, float((energy.sqrt() / norms.clamp_min(1e-30)).max()))
        saved = dense_total - lors_total
        rows.append(
            {
                "rank": r,
                "stacked_dense_params": dense_total,
                "stacked_lors_params": lors_total,
                "params_before": params_before,
                "params_after": params_before - saved,
                "savings": saved / params_before if params_before else 0.0,
                "stacked_savings": saved / dense_total if dense_total else 0.0,
                "relative_error": math.sqrt(discarded / weight_energy) if weight_energy else 0.0,
                "max_relative_error": worst,
            }
        )
    return {"ranks": rows, "stacks": [{"path": s.path, "members": s.members} for s in plan.stacks]}


def render_sweep(sweep: dict, console, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "rank",
        "stacked dense",
        "stacked LORS",
        "model params",
        "savings",
        "rel. error",
        "max rel. error",
    ):
        table.add_column(col, justify="right")
    for row in sweep["ranks"]:
        table.add_row(
            str(row["rank"]),
            f"{row['stacked_dense_params']:,}",
            f"{row['stacked_lors_params']:,}",
            f"{row['params_after']:,}",
            f"{100 * row['savings']:.1f}%",
            f"{row['relative_error']:.4f}",
            f"{row['max_relative_error']:.4f}",
        )
    console.print(table)


def write_plot(sweep: dict, path) -> None:
    """Error vs parameters over the sweep, as PNG (needs matplotlib: ``pip install lors-convert[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LorsError("--plot needs matplotlib: pip install 'lors-convert[plot]'") from None
    rows = sweep["ranks"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["params_after"] for r in rows], [r["relative_error"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(
            f"r={r['rank']}",
            (r["params_after"], r["relative_error"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("model parameters after LORS")
    ax.set_ylabel("relative reconstruction error (stacked weights)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path, force=True, directory=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
