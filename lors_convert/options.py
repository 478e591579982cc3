"""The values lors's options take, and the fidelity target: plain Python, no torch.

Every module that accepts one of these checks against the tuple here, and the CLI checks flags with
them before it imports torch (a usage error answers at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LorsUsageError

INITS = ("svd", "paper")  # fit the trained weights, or the paper's from-scratch init
METHODS = ("auto", "exact", "randomized")  # truncated SVD
OBJECTIVES = ("output", "layer")  # calibration: the model output's error, or each layer's own
SHARING = ("auto", "always", "never")  # --budget: per parameter, does a shared part pay? (or force it)
LOSSES = ("mse", "cosine", "pooled_cosine", "kl")  # heal
MATCHES = ("output", "layers")  # heal: the model's output, or every stacked block's too


# --target name -> (fidelity key, True when higher is better)
METRICS = {
    "top1": ("top1", True),
    "cosine": ("cosine", True),
    "ppl-ratio": ("ppl_ratio", False),
    "rel-error": ("rel_error", False),
}


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
