"""Would one input projection shared by the matrices that read the same input pay on SmolLM2? An
estimate from the default conversion's own objective, before building it.

Matrices fed one tensor (q, k, v; gate, up) could share their right factor: ``W_j ~ B_j A`` with one
``A`` (r, h) for the group, ``r (h + sum_j d_j)`` parameters instead of ``sum_j r_j (h + d_j)``. Under
the calibrated objective (output-gradient Gram ``G_j`` of each matrix, input Gram ``C`` common to the
group, both floored and damped as a conversion does) the error of a group is
``sum_j ||L_Gj^T (W_j - B_j A) L_C||^2``, so the best shared factors are a truncated SVD of the whitened
matrices stacked by rows, ``[L_Gj^T W_j L_C]_j``, and the error at rank ``r`` is the tail of its
spectrum; a matrix alone is the same with one block.

The budget is spent as the conversion spends it, by one price per parameter over every stacked matrix
(a Lagrangian sweep: each item takes the rank, or the dense matrix, that minimizes error + price x
parameters). Three ways are compared at the same stacked-parameter fractions: every matrix alone (what
lors does), every group shared, and the better of the two for each group at each price (what a
per-group decision of the budget would give). The figure is the first-order objective, not a measured
perplexity: a ratio of 0.96 is 4% less objective at the same size.

    HF_HUB_OFFLINE=1 python scripts/bench_shared_projection.py [--grams /tmp/shared-projection-grams.pt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import numpy  # noqa: E402
import torch  # noqa: E402
from bench_frontier import smollm2_dir  # noqa: E402
from benchdoc import table, write_section  # noqa: E402

from lors_convert import measure  # noqa: E402
from lors_convert.calibrate.grams import collect_grams  # noqa: E402
from lors_convert.decompose.whitener import DEFAULT_FLOOR, whitener  # noqa: E402
from lors_convert.fit.calibrated import CONVERSION_DAMP  # noqa: E402
from lors_convert.io.sources import load_source  # noqa: E402

GROUPS = {
    "q, k, v": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "gate, up": ("mlp.gate_proj", "mlp.up_proj"),
    "o": ("self_attn.o_proj",),
    "down": ("mlp.down_proj",),
}
FRACTIONS = (0.5, 0.6, 0.7, 0.85)


def grams(src: Path, cache: Path):
    """The default conversion's Grams (text the model writes, output-gradient objective), made once."""
    model, _ = load_source(src)
    if cache.is_file():
        return model, torch.load(cache, weights_only=False)
    data, _ = measure.generated_calibration(model, src, None)
    calibration = collect_grams(model, data.calibration)
    torch.save(calibration, cache)
    return model, calibration


def root(C: torch.Tensor) -> torch.Tensor:
    """``L`` (n, n) with ``L L^T = C'``, the floored and damped Gram a conversion weighs by."""
    w = whitener(C, floor=DEFAULT_FLOOR, damp=CONVERSION_DAMP)
    return w.right_L(torch.eye(C.shape[0], dtype=torch.float64))  # (n, n)


class Item:
    """One way to store a group (or a matrix): the error at each rank (tail of the whitened
    spectrum), the parameters per unit of rank, and the dense size (zero error)."""

    def __init__(self, whitened: list[torch.Tensor]):
        s2 = torch.linalg.svdvals(torch.cat(whitened)) ** 2  # (min(sum d, h),)
        self.tails = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])  # error at rank r
        self.per_rank = sum(M.shape[0] for M in whitened) + whitened[0].shape[1]
        self.dense = sum(M.numel() for M in whitened)

    def best(self, price: float) -> tuple[float, int]:
        """(error, parameters) minimizing error + price x parameters: a rank below break-even, or dense."""
        ranks = torch.arange(min(len(self.tails), self.dense // self.per_rank + 1))
        cost = self.tails[: len(ranks)] + price * ranks * self.per_rank  # (R,)
        r = int(cost.argmin())
        if price * self.dense < float(cost[r]):
            return 0.0, self.dense
        return float(self.tails[r]), r * self.per_rank


def items(model, calibration) -> list[tuple[str, list[Item], Item]]:
    """Per layer and group: the matrices alone and the group shared."""
    state = {k: v.double() for k, v in model.state_dict().items()}
    out = []
    for i in range(model.config.num_hidden_layers):
        for group, owners in GROUPS.items():
            keys = [f"model.layers.{i}.{o}.weight" for o in owners]
            Lc = root(calibration.grams[keys[0]])  # (h, h): one input for the group
            whitened = [root(calibration.out_grams[k]).T @ state[k] @ Lc for k in keys]  # (d_j, h)
            out.append((group, [Item([M]) for M in whitened], Item(whitened)))
    return out


def sweep(groups, choose) -> list[tuple[float, float]]:
    """(stacked-parameter fraction, objective) over prices; ``choose(alone, shared, price)``."""
    total = sum(sum(item.dense for item in alone) for _, alone, _ in groups)
    points = []
    for price in torch.logspace(-3, 7, 300).tolist():
        err = params = 0.0
        for _, alone, shared in groups:
            e, p = choose(alone, shared, price)
            err, params = err + e, params + p
        points.append((params / total, err))
    return sorted(points)


def at(points, fraction: float) -> float:
    """The objective at ``fraction`` by linear interpolation of the swept points."""
    xs, ys = zip(*points, strict=True)
    return float(numpy.interp(fraction, xs, ys))


def alone(group, _shared, price):
    parts = [item.best(price) for item in group]
    return sum(e for e, _ in parts), sum(p for _, p in parts)


def shared_where_not_single(group, shared, price):
    return shared.best(price) if len(group) > 1 else alone(group, shared, price)


def per_group_best(group, shared, price):
    a, s = alone(group, shared, price), shared.best(price)
    return min(a, s, key=lambda ep: ep[0] + price * ep[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grams", type=Path, default=Path("/tmp/shared-projection-grams.pt"))
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = p.parse_args()
    src = smollm2_dir(Path("/tmp/lors-smollm2"))
    model, calibration = grams(src, args.grams)
    groups = items(model, calibration)
    curves = {
        name: sweep(groups, fn)
        for name, fn in (("alone", alone), ("shared", shared_where_not_single), ("best", per_group_best))
    }
    rows = []
    for f in FRACTIONS:
        base = at(curves["alone"], f)
        rows.append(
            [
                f"{f:.2f}",
                f"{base:.4g}",
                f"{at(curves['shared'], f) / base:.3f}",
                f"{at(curves['best'], f) / base:.3f}",
            ]
        )
    header = [
        "stacked parameters kept",
        "objective, every matrix alone",
        "every group shared (x alone)",
        "better of the two per group (x alone)",
    ]
    body = (
        "SmolLM2-135M-Instruct, the default conversion's Grams (text the model writes, output-gradient "
        "objective); groups q/k/v and gate/up of each layer, o and down alone. First-order objective "
        "at equal stacked parameters, not a measured perplexity (below 1: sharing would fit better).\n\n"
        + table(header, rows)
    )
    print(body)
    if not args.no_doc:
        command = "python scripts/bench_shared_projection.py " + " ".join(sys.argv[1:])
        write_section("shared-projection", "Shared input projections: an estimate on SmolLM2", body, command)


if __name__ == "__main__":
    main()
