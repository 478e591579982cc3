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
from ..errors import LorsUsageError
from ..options import ConvertOptions
from . import calibrated, generator, plain
from .calibrated import SearchMemo
from .result import Fit


class FitOptions:
    """How every parameter of a conversion is fitted: the conversion's options and its calibration
    Grams (a :class:`lors_convert.calibrate.grams.Calibration` or a mapping of input Grams).

    ``FitOptions(options, calibration, memo=None, refit_later=False, **changes)``: ``changes`` are
    :class:`ConvertOptions` fields; ``memo``: a :class:`~lors_convert.fit.calibrated.SearchMemo`
    shared by conversions of the same weights and calibration at several budgets; ``refit_later``:
    a closed loop will refit the private factors of every ``nn.Linear`` it reaches (:meth:`defers`).
    """

    def __init__(
        self,
        options: ConvertOptions | None = None,
        calibration=None,
        memo: calibrated.SearchMemo | None = None,
        refit_later: bool = False,
        **changes,
    ):
        self.convert = ConvertOptions.of(options, **changes)
        self.calibration = calibration
        self.memo = memo
        self.refit_later = refit_later
        if calibration is not None and self.convert.init != "svd":
            raise LorsUsageError("calibration, refine and budget apply to init='svd' only")

    init = property(lambda self: self.convert.init)
    method = property(lambda self: self.convert.method)
    device = property(lambda self: self.convert.device)
    refine = property(lambda self: self.convert.refine)
    budget = property(lambda self: self.convert.budget)

    def defers(self, pp: ParamPlan) -> bool:
        """Whether ``pp``'s private factors are left to the closed loop: static ``nn.Linear`` layers
        that the calibration reached (the loop refits each layer the source block calls), unrefined."""
        return (
            self.refit_later
            and self.calibration is not None
            and self.refine == 0
            and pp.kind == "static"
            and pp.layer_kind == "linear"
            and all(key in self.calibration for key in pp.converted_keys)
        )

    @property
    def weighted(self) -> bool:
        """Whether static parameters take the calibrated (weighted) fit."""
        return self.calibration is not None or self.refine > 0 or self.budget is not None


def with_dense_members(fit: Fit, pp: ParamPlan) -> Fit:
    """A fit of ``pp.lors_view()`` spread over all of ``pp``'s members: None factors, zero error and
    all energy retained for the members kept dense."""
    fit = fit.materialized()
    factors, errors, energies = [None] * len(pp.ranks), [0.0] * len(pp.ranks), [1.0] * len(pp.ranks)
    for j, i in enumerate(pp.lors_members):
        factors[i] = fit.factors[j]
        errors[i] = fit.relative_error[j] if fit.relative_error else 0.0
        energies[i] = fit.retained_energy[j] if fit.retained_energy else 1.0
    return Fit(
        shared=fit.shared,
        factors=factors,
        relative_error=errors if fit.relative_error else [],
        retained_energy=energies if fit.retained_energy else [],
        weighted=fit.weighted,
    )


def fit_param(
    pp: ParamPlan,
    weights: Sequence[torch.Tensor],
    options: FitOptions,
    biases: Sequence[torch.Tensor | None] | None = None,
    shared: torch.Tensor | None = None,
) -> Fit:
    """Fit one planned parameter from its layer tensors (``weights[i]`` of ``pp.keys[i]``).

    ``biases``: the generators' biases (adaptive plans only). ``shared``: a shared part already
    solved for (the budget's), used as the calibrated fit's starting point. Members a budget keeps
    dense (``pp.dense_members``) get ``None`` factors.
    """
    if pp.kind == "adaptive":
        return generator.fit_generators(pp, weights, biases, options.init, options.device)
    if pp.dense_members:  # members kept dense take no part in the fit: exact, no factors
        view = pp.lors_view()
        fit = fit_param(view, [weights[i] for i in pp.lors_members], options, shared=shared)
        return with_dense_members(fit, pp)
    if options.init == "paper":
        return plain.paper_init(pp)
    if options.weighted:
        return calibrated.fit_calibrated(
            pp,
            weights,
            options.calibration,
            options.refine,
            options.device,
            shared,
            memo=options.memo,
            deferred=options.defers(pp),
        )
    return plain.fit_plain(pp, weights, options.method, options.device)


__all__ = ["Fit", "FitOptions", "fit_param", "SearchMemo"]
