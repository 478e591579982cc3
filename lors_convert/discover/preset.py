"""Presets: ``convert`` settings that reproduce a published configuration (``--preset``)."""

from __future__ import annotations

from .specs import GeneratorSpec


def paper_adamixer_settings(num_stages: int = 6) -> dict:
    """``convert`` keyword arguments for the LORS paper's AdaMixer setting.

    LORST r=8, K=1 on ``adaptive_mixing.out_proj``; LORSA r=16, K=[1,1,2,2,3,3] on the
    ``parameter_generator`` (layout detected with torch.fx). Use on a decoder built with G=2,
    P_in=64 (``AdaMixerConfig.paper_lors()``).
    """
    groups = [1 + (3 * i) // num_stages for i in range(num_stages)]  # 6 stages: [1, 1, 2, 2, 3, 3]
    return {
        "rank": 8,
        "groups": 1,
        "include": ["*adaptive_mixing.out_proj.weight", "*adaptive_mixing.parameter_generator.0.weight"],
        "adaptive": [
            GeneratorSpec(
                pattern="*adaptive_mixing.parameter_generator.0.weight", layout=None, rank=16, groups=groups
            )
        ],
    }


__all__ = ["paper_adamixer_settings"]
