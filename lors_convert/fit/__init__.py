"""Fitting: one planned parameter and its N layer weights -> the LORS factors that replace them.

:func:`fit_param` is the one entry the conversion loop calls. It picks the method from the plan and
:class:`FitOptions`: the paper's from-scratch init, the plain mean + truncated SVD
(:mod:`lors_convert.decompose.lorst`), the calibrated weighted fit (:mod:`.calibrated`, Grams from
:mod:`lors_convert.calibrate`), or the HOSVD of a generator stack (:mod:`.generator`, LORSA).
A :class:`Fit` holds float tensors in the compute dtype; casting to the storage dtype and placing
them (in a module, in a checkpoint) is the sink's job.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..discover.plan import ParamPlan
from . import calibrated, generator, plain
from .options import INITS, METHODS, Fit, FitOptions

def fit_param(pp: ParamPlan, weights: Sequence[torch.Tensor], options: FitOptions,
              biases: Sequence[torch.Tensor | None] | None = None, shared: torch.Tensor | None = None) -> Fit:
    """Fit one planned parameter from its layer tensors (``weights[i]`` of ``pp.keys[i]``).

    ``biases``: the generators' biases (adaptive plans only). ``shared``: a shared part already
    solved for (the budget's), used as the calibrated fit's starting point.
    """
    if pp.kind == "adaptive":
        return generator.fit_generators(pp, weights, biases, options.init, options.device)
    if options.init == "paper":
        return plain.paper_init(pp)
    if options.weighted:
        return calibrated.fit_calibrated(pp, weights, options.calibration, options.refine, options.device, shared)
    return plain.fit_plain(pp, weights, options.method, options.device)


__all__ = ["Fit", "FitOptions", "fit_param", "INITS", "METHODS"]
