"""``lors convert``: its flags, checked together before torch is imported, and one call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LorsUsageError
from .common import (
    app,
    default_output,
    handle_errors,
    log_lines,
    make_progress,
    parse_int_list,
    parse_rank,
    show,
)

Src = Annotated[
    Path,
    typer.Argument(
        help="HF model dir, GGUF file, state dict (.safetensors/.pt, with --arch), "
        "TorchScript archive, or pickled module (with --trust-pickle).",
    ),
]
Rank = Annotated[str, typer.Option("--rank", "-r", help="Rank r of each private group, or 'full'.")]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Output directory [<src>.lors].")]
Groups = Annotated[
    str | None, typer.Option("--groups", help="Groups K per layer, e.g. 1,1,2,2,3,3 (or one number).")
]
Include = Annotated[
    list[str], typer.Option("--include", help="fnmatch pattern over parameter names (repeatable).")
]
Exclude = Annotated[
    list[str], typer.Option("--exclude", help="fnmatch pattern over parameter names (repeatable).")
]
Arch = Annotated[
    str | None, typer.Option("--arch", help="package.module:callable building the model of a state dict.")
]
TrustPickle = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling a whole module: runs code from the file.")
]
Init = Annotated[
    str, typer.Option("--init", help="svd (fit the trained weights) or paper (from-scratch init).")
]
Method = Annotated[str, typer.Option("--svd", help="auto, exact or randomized.")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda: where the decomposition runs.")]
Adaptive = Annotated[
    list[str],
    typer.Option(
        "--adaptive",
        help="LORSA on parameter generators: 'auto' (torch.fx) "
        "or 'PATTERN: G x [RxC, ...]' (repeatable), see lors_convert.discover.specs.",
    ),
]
Preset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="adamixer-paper: LORST r=8 on out_proj, "
        "LORSA r=16 K=1,1,2,2,3,3 on the generators (overrides rank/groups).",
    ),
]
Calibrate = Annotated[
    Path | None,
    typer.Option(
        "--calibrate",
        help="Calibration inputs: a text file (HF text models) or a .safetensors/.pt tensor file "
        "[with --budget/--target: text the model writes for causal LMs, lors's shipped text for "
        "other HF text models].",
    ),
]
Heldout = Annotated[
    Path | None,
    typer.Option(
        "--heldout",
        help="Held-out inputs for the fidelity report "
        "[20% of --calibrate, else lors's probe text for HF text models].",
    ),
]
HeldoutFraction = Annotated[
    float | None,
    typer.Option(
        "--heldout-fraction",
        help="Share of --calibrate held out for the fidelity report [0.2; 0 with --heldout].",
    ),
]
Target = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="Smallest budget keeping a held-out fidelity: "
        "top1=0.95, cosine=0.95, ppl-ratio=1.1 or rel-error=0.2 (replaces --budget).",
    ),
]
Fidelity = Annotated[bool, typer.Option("--fidelity/--no-fidelity", help="Measure held-out fidelity.")]
Refine = Annotated[int, typer.Option("--refine", help="Alternating refinement sweeps of the shared part.")]
Budget = Annotated[
    float | None,
    typer.Option(
        "--budget",
        help="Target fraction of the stacked parameters; ranks per layer by water-filling (replaces --rank).",
    ),
]
Sharing = Annotated[
    str | None,
    typer.Option(
        "--sharing",
        help="With --budget: auto (drop a stack's shared "
        "part where private rank pays more), always (LORS everywhere) or never "
        "(per-layer low rank) [auto].",
    ),
]
ClosedLoop = Annotated[
    bool | None,
    typer.Option(
        "--closed-loop/--open-loop",
        help="With calibration: refit the private factors block by block on the inputs the converted "
        "blocks give them [closed for causal LMs, else open].",
        show_default=False,
    ),
]
Objective = Annotated[
    str | None,
    typer.Option(
        "--objective",
        help="With --calibrate: minimize the model "
        "output's error (output: input and output-gradient Grams) or each "
        "layer's own (layer) [output].",
    ),
]
Probes = Annotated[
    int | None,
    typer.Option(
        "--probes",
        help="Random probes (backward passes) per calibration batch for the output objective "
        "[2 on the text a causal LM writes, else 4].",
    ),
]
KeepUnsaving = Annotated[
    bool, typer.Option("--keep-unsaving", help="Convert matrices even where it saves nothing.")
]
ShardSize = Annotated[
    str, typer.Option("--max-shard-size", help="Shard the safetensors output above this size.")
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print stacks and projected savings; write nothing.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No tables or progress.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
HfCode = Annotated[
    bool,
    typer.Option(
        "--hf-code",
        help="Also write modeling_lors.py and config.json's auto_map: transformers loads the "
        "checkpoint without lors (trust_remote_code=True runs that file).",
    ),
]


@app.command()
@handle_errors
def convert(
    src: Src,
    rank: Rank = "8",
    output: Output = None,
    groups: Groups = None,
    include: Include = [],  # noqa: B006 - typer reads the default, never mutates it
    exclude: Exclude = [],  # noqa: B006
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    init: Init = "svd",
    method: Method = "auto",
    device: Device = "cpu",
    adaptive: Adaptive = [],  # noqa: B006
    preset: Preset = None,
    calibrate: Calibrate = None,
    heldout: Heldout = None,
    heldout_fraction: HeldoutFraction = None,
    target: Target = None,
    fidelity: Fidelity = True,
    refine: Refine = 0,
    budget: Budget = None,
    sharing: Sharing = None,
    closed_loop: ClosedLoop = None,
    objective: Objective = None,
    probes: Probes = None,
    keep_unsaving: KeepUnsaving = False,
    shard_size: ShardSize = "2GB",
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    force: Force = False,
    hf_code: HfCode = False,
) -> None:
    """Convert a dense model to a LORS checkpoint and print the savings report."""
    flags = dict(locals())
    options, calibration = convert_options(**{k: v for k, v in flags.items() if k in _OPTION_FLAGS})
    if heldout_fraction is not None and calibrate is None:
        raise LorsUsageError("--heldout-fraction goes with --calibrate")
    out = output or default_output(src, ".lors")
    _check_output(out, (src, calibrate, heldout), force, dry_run)
    from ..checkpoint.hf_code import check_hf_code_source, write_hf_code
    from ..convert_file import convert_file  # torch and transformers: only once the flags are known good
    from ..heap import return_freed_blocks
    from ..io.dist import Dist

    return_freed_blocks()  # freed tensors leave the RSS: a lower peak at no measured cost (docs/benchmarks.md)

    if hf_code:
        check_hf_code_source(src, options.adaptive)

    report = convert_file(
        src,
        out,
        options,
        arch=arch,
        trust_pickle=trust_pickle,
        heldout=heldout,
        measure=fidelity,
        heldout_fraction=heldout_fraction,
        max_shard_size=shard_size,
        force=force,
        dist=Dist.from_env(),
        dry_run=dry_run,
        progress=make_progress(not (quiet or json_out)),
        log=log_lines(quiet),
        **calibration,
    )
    if hf_code and report is not None and not dry_run:
        write_hf_code(out)
    if report is not None:  # None on torchrun ranks other than 0
        title = (
            f"LORS dry run of {src} (nothing written)" if dry_run else f"LORS conversion of {src} -> {out}"
        )
        show(report, json_out, quiet, title=title)


def _check_output(out: Path, inputs: tuple, force: bool, dry_run: bool) -> None:
    from ..io.atomic import check_not_input, check_output

    if dry_run:
        return
    for given in inputs:  # never replace an input, even with --force
        if given is not None:
            check_not_input(out, given)
    check_output(out, force)


# the flags convert_options reads; a ConvertOptions field's error names its flag
_OPTION_FLAGS = (
    "rank groups include exclude init method device adaptive preset refine budget sharing closed_loop "
    "keep_unsaving calibrate objective probes target"
).split()
_FLAG_OF = {"method": "--svd"}


def convert_options(
    rank, groups, include, exclude, init, method, device, adaptive, preset, refine, budget, sharing,
    closed_loop, keep_unsaving, calibrate, objective, probes, target,
):  # fmt: skip
    """Check the convert command's flags together: the :class:`~lors_convert.options.ConvertOptions`
    and ``convert_file``'s calibration arguments (``calibrate``, ``objective``, ``probes``, ``target``)."""
    from ..options import ConvertOptions

    fields = dict(rank=parse_rank(rank), include=include, exclude=exclude, init=init, method=method)
    fields.update(device=_device(device), adaptive=adaptive or None, refine=refine, budget=budget)
    fields["closed_loop"] = closed_loop
    groups_given = parse_int_list(groups, "--groups")
    fields["groups"] = groups_given[0] if groups_given and len(groups_given) == 1 else groups_given
    if preset is not None:
        fields.update(_preset(preset, include))
    if sharing is not None and budget is None and target is None:
        raise LorsUsageError("--sharing goes with --budget or --target")
    if (budget is not None or target is not None) and groups is not None:  # the budget chooses the ranks
        raise LorsUsageError(
            "--groups does not combine with --budget or --target: the budget chooses one rank per layer"
        )
    calibration = _calibration_flags(calibrate, objective, probes, target)
    try:
        options = ConvertOptions(**fields, sharing=sharing or "auto", require_savings=not keep_unsaving)
    except LorsUsageError as e:  # the field's name -> its flag
        name, _, rest = str(e).partition(" ")
        raise LorsUsageError(f"{_FLAG_OF.get(name, '--' + name)} {rest}") from None
    return options, calibration


def _device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LorsUsageError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LorsUsageError("--device cuda: no CUDA device is available")
    return device


def _preset(preset: str, include: list[str]) -> dict:
    """The ConvertOptions fields ``--preset`` sets (``--include`` still narrows it)."""
    if preset != "adamixer-paper":
        raise LorsUsageError(f"--preset must be adamixer-paper, got {preset!r}")
    from ..discover.preset import paper_adamixer_settings

    settings = paper_adamixer_settings()
    return dict(
        rank=settings["rank"],
        groups=settings["groups"],
        adaptive=settings["adaptive"],
        include=include or settings["include"],
    )


def _calibration_flags(calibrate, objective, probes, target) -> dict:
    from ..options import OBJECTIVES, Target, check_choice

    if objective is not None and calibrate is None:
        raise LorsUsageError("--objective goes with --calibrate")
    objective = objective or "output"
    check_choice("--objective", objective, OBJECTIVES)
    if probes is not None and probes < 1:
        raise LorsUsageError(f"--probes must be >= 1, got {probes}")
    if probes is not None and objective != "output":
        raise LorsUsageError("--probes goes with --objective output")
    parsed = Target.parse(target) if target is not None else None
    return dict(calibrate=calibrate, objective=objective, probes=probes, target=parsed)
