"""Generator specs: which stacked Linears a user names as LORSA parameter generators, and how.

A *generator* is an ``nn.Linear`` whose output is reshaped into matrices that then multiply
features (AdaMixer's ``parameter_generator``). ``convert(model, adaptive=...)`` takes:

- ``"auto"``: every stacked Linear weight whose layout torch.fx finds
  (:func:`lors_convert.discover.tracing.detect_generators`);
- a spec, or a list of specs: a string ``"PATTERN: LAYOUT"`` or a :class:`GeneratorSpec`.
  ``PATTERN`` is an fnmatch pattern over full parameter names (``*.parameter_generator.0.weight``)
  or over the Linear's full module name (``*.parameter_generator.0``). ``LAYOUT`` is
  ``G x [R1xC1, R2xC2, ...]``: ``G`` repetitions of a block of row-major ``R x C`` matrices placed
  side by side in the output vector (AdaMixer with G=4, e=64, P_in=32, P_out=128:
  ``"4 x [64x64, 128x32]"``, M then S); ``x`` may be written ``*``; ``"auto"`` or an empty layout
  means "detect it with torch.fx". A :class:`GeneratorSpec` also carries its own ``rank``,
  ``groups`` (``K`` or one ``K_i`` per layer) and block-HOOI ``sweeps`` (default: none for
  ``K=1``, up to 30 for ``K>1``, see :func:`lors_convert.decompose.tucker.hosvd`); string specs
  use the ``rank``/``groups`` given to ``convert``.

How specs select parameters is :mod:`lors_convert.discover.generators`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LorsUsageError
from ..layers.adaptive import Layout


@dataclass
class GeneratorSpec:
    """Which stacked Linear weights are generators, their output layout and LORSA ranks."""

    pattern: str = "*"
    layout: str | Layout | None = None  # None / "auto": detect with torch.fx
    rank: int | None | str = "default"  # r per group; None = full rank; "default": convert's rank
    groups: int | Sequence[int] | None | str = "default"  # K or one K_i per layer
    sweeps: int | None = None  # block-HOOI sweeps after the HOSVD; None: 0 for K=1, 30 for K>1

    @classmethod
    def parse(cls, text: str | GeneratorSpec) -> GeneratorSpec:
        if isinstance(text, GeneratorSpec):
            return text
        s = str(text).strip()
        if s == "auto":
            return cls()
        pattern, sep, layout = s.partition(":")
        if not sep:
            raise LorsUsageError(
                f"bad generator spec {text!r}: expected 'PATTERN: LAYOUT', e.g. "
                "'*.parameter_generator.0.weight: 4 x [64x64, 128x32]' (or 'auto')"
            )
        layout = layout.strip()
        if layout and layout != "auto":
            Layout.parse(layout)  # fail early on a bad layout
        return cls(pattern=pattern.strip(), layout=layout or None)

    @property
    def auto_layout(self) -> bool:
        return self.layout is None or (isinstance(self.layout, str) and self.layout.strip() in ("", "auto"))


AdaptiveArg = str | GeneratorSpec | Sequence[str | GeneratorSpec] | None


def parse_specs(adaptive: AdaptiveArg) -> list[GeneratorSpec]:
    if adaptive is None:
        return []
    if isinstance(adaptive, (str, GeneratorSpec)):
        adaptive = [adaptive]
    return [GeneratorSpec.parse(a) for a in adaptive]


__all__ = ["GeneratorSpec", "AdaptiveArg", "parse_specs"]
