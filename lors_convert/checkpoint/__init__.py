"""The LORS checkpoint directory: its format (:mod:`.format`), writing (:mod:`.writer`), reading
(:mod:`.reader`), merging back to dense weights (:mod:`.merge`) and loading a runnable model
(:mod:`.load`).

Layout (``lors_config.json`` documents every name)::

    OUT/
      model.safetensors            # or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      lors_config.json             # format, source, source state-dict manifest, stacks and parameters
      report.json                  # the savings report
      config.json, tokenizer...    # copied from a Hugging Face source, written from a GGUF source's metadata
      gguf_metadata.gguf           # a GGUF source's key/values and tensors without a place in the model
      modeling_lors.py             # --hf-code: transformers loads the checkpoint alone (config.json auto_map)

Tensor names: every untouched tensor keeps its original name; for a converted parameter
``<member>.<owner>.weight`` the stack's shared matrix is stored once as
``<first member>.<owner>.shared`` (absent for a private-only stack, whose entry lists ``shared: []``)
and each member's factors as ``<member>.<owner>.lors_A`` / ``lors_B`` (other tensors of the owner,
such as ``bias``, keep their names). Non-persistent buffers needed to run the model are stored as
``__buffers__.<name>``.
"""

from __future__ import annotations

from .format import CONFIG_NAME, REPORT_NAME, source_manifest
from .load import load
from .merge import merge_checkpoint
from .reader import Checkpoint
from .writer import CheckpointWriter, save

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "save",
    "load",
    "merge_checkpoint",
    "source_manifest",
    "CONFIG_NAME",
    "REPORT_NAME",
]
