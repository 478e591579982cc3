"""The public ``convert`` of the Python API: the in-place conversion, and a converted model that
saves as what it now is.

:func:`lors_convert.conversion.convert` does the work; this adds what needs the checkpoint layer
beside it: the source's state-dict manifest (taken before conversion) and the report are recorded on
the model (``model.lors_origin``), and a transformers model's ``save_pretrained`` writes a LORS
checkpoint (:mod:`lors_convert.checkpoint.pretrained`).
"""

from __future__ import annotations

import functools

from torch import nn

from .checkpoint import source_manifest
from .checkpoint.pretrained import enable_save_pretrained
from .checkpoint.writer import Origin
from .conversion import convert as convert_in_place
from .report import Report


@functools.wraps(convert_in_place)
def convert(model: nn.Module, *args, **kwargs) -> tuple[nn.Module, Report]:
    manifest = source_manifest(model)
    lors_model, report = convert_in_place(model, *args, **kwargs)
    lors_model.lors_origin = Origin(manifest=manifest, report=report)
    enable_save_pretrained(lors_model)
    return lors_model, report


__all__ = ["convert"]
