"""The values lors's options take, what a conversion is asked for (:class:`ConvertOptions`) and the
fidelity target: plain Python, no torch.

:class:`ConvertOptions` holds every default of a conversion once and checks its values once, when it
is built: ``convert``, ``convert_file`` (streamed, in memory, dry run), ``--target`` and the CLI all
take one. The CLI builds it before it imports torch (a usage error answers at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from .errors import LorsUsageError

INITS = ("svd", "paper")  # fit the trained weights, or the paper's from-scratch init
METHODS = ("auto", "exact", "randomized")  # truncated SVD
OBJECTIVES = ("output", "layer")  # calibration: the model output's error, or each layer's own
SHARING = ("auto", "always", "never")  # --budget: per parameter, does a shared part pay? (or force it)
LOSSES = ("mse", "cosine", "pooled_cosine", "kl")  # heal
MATCHES = ("output", "layers")  # heal: the model's output, or every stacked block's too


# the held-out fidelity figures a conversion reports and a --target search records per budget tried
FIDELITY_METRICS = ("cosine", "top1", "ppl_ratio", "kl", "rel_error")

# --target name -> (fidelity key, True when higher is better)
METRICS = {
    "top1": ("top1", True),
    "cosine": ("cosine", True),
    "ppl-ratio": ("ppl_ratio", False),
    "rel-error": ("rel_error", False),
}


def check_rank(rank) -> None:
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise LorsUsageError(f"rank must be a positive integer or 'full', got {rank!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LorsUsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class ConvertOptions:
    """How a model is converted: the rank and its groups, which parameters, how they are fitted.

    ``rank`` is ``r`` per group (``None``: full rank, exact); ``groups`` is ``K`` for every layer or
    one ``K_i`` per layer of each stack; ``include``/``exclude`` are fnmatch patterns over full
    parameter names; ``require_savings`` keeps a matrix dense where its factorization would not
    save parameters. ``init="svd"`` fits the trained weights, ``"paper"`` is the paper's
    from-scratch init; ``method`` picks the truncated SVD; ``device`` is where the math runs.
    ``adaptive`` selects parameter generators for LORSA (see :mod:`lors_convert.discover.specs`).
    ``refine`` alternating sweeps re-fit the shared part; ``budget`` (a fraction of the stacked
    parameters) replaces ``rank``/``groups`` by per-layer ranks, and ``sharing`` says whether each
    matrix keeps a shared part under it (``auto``: where it pays). ``closed_loop``: a calibrated
    conversion refits the private factors block by block on the inputs the converted blocks give
    (:mod:`lors_convert.calibrate.closed_loop`); None: for a causal language model, where it measured
    better at every budget (docs/calibration.md), and not for other models.
    """

    rank: int | None = 8
    groups: int | Sequence[int] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    init: str = "svd"
    method: str = "auto"
    device: object = None  # a torch device or its name; None: the CPU
    require_savings: bool = True
    adaptive: object = None  # "auto", a generator spec (string or GeneratorSpec), or a list of them
    refine: int = 0
    budget: float | None = None
    sharing: str = "auto"
    closed_loop: bool | None = None  # None: for causal LMs only

    def __post_init__(self) -> None:
        check_rank(self.rank)
        check_choice("init", self.init, INITS)
        check_choice("method", self.method, METHODS)
        check_choice("sharing", self.sharing, SHARING)
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise LorsUsageError(f"refine must be an integer >= 0, got {self.refine!r}")
        budget = self.budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0
        ):
            raise LorsUsageError(
                f"budget must be a positive fraction of the stacked parameters, got {budget!r}"
            )
        if (self.refine > 0 or budget is not None) and self.init != "svd":
            raise LorsUsageError("calibration, refine and budget apply to init='svd' only")

    @classmethod
    def of(cls, options: ConvertOptions | None = None, **changes) -> ConvertOptions:
        """``options`` (default: the defaults) with ``changes``, checked; unknown names are errors."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown conversion option(s): {', '.join(unknown)}")
        return replace(options or cls(), **changes)


@dataclass(frozen=True)
class Target:
    metric: str  # a key of METRICS
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        name, sep, value = text.partition("=")
        name = name.strip().lower()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or name not in METRICS or number is None:
            raise LorsUsageError(
                f"--target must look like METRIC=VALUE with METRIC one of {', '.join(METRICS)} "
                f"(e.g. top1=0.95), got {text!r}"
            )
        return cls(name, number)

    @property
    def key(self) -> str:
        return METRICS[self.metric][0]

    def met(self, quality: dict, prefix: str = "heldout") -> bool:
        value = quality.get(f"{prefix}_{self.key}")
        if value is None:
            kind = quality.get(f"{prefix}_kind", "this model")
            raise LorsUsageError(
                f"--target {self.metric}: fidelity of a {kind} has no {self.key} "
                f"(it reports {_measured(quality, prefix)}); choose one of those"
            )
        return value >= self.value if METRICS[self.metric][1] else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}"


def _measured(quality: dict, prefix: str) -> str:
    names = [name for name, (key, _) in METRICS.items() if quality.get(f"{prefix}_{key}") is not None]
    return ", ".join(names) or "nothing"


__all__ = [
    "ConvertOptions",
    "Target",
    "check_rank",
    "check_choice",
    "FIDELITY_METRICS",
    "METRICS",
    "INITS",
    "METHODS",
    "OBJECTIVES",
    "SHARING",
    "LOSSES",
    "MATCHES",
]
