"""``lors convert``: its flags, checked together before torch is imported, and one call."""

from __future__ import annotations

from pathlib import Path

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


@app.command()
@handle_errors
def convert(
    src: Path = typer.Argument(
        ...,
        help="HF model dir, GGUF file, state dict (.safetensors/.pt, with --arch), "
        "TorchScript archive, or pickled module (with --trust-pickle).",
    ),
    rank: str = typer.Option("8", "--rank", "-r", help="Rank r of each private group, or 'full'."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output directory [<src>.lors]."),
    groups: str | None = typer.Option(
        None, "--groups", help="Groups K per layer, e.g. 1,1,2,2,3,3 (or one number)."
    ),
    include: list[str] = typer.Option(
        [], "--include", help="fnmatch pattern over parameter names (repeatable)."
    ),
    exclude: list[str] = typer.Option(
        [], "--exclude", help="fnmatch pattern over parameter names (repeatable)."
    ),
    arch: str | None = typer.Option(
        None, "--arch", help="package.module:callable building the model of a state dict."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow unpickling a whole module: runs code from the file."
    ),
    init: str = typer.Option(
        "svd", "--init", help="svd (fit the trained weights) or paper (from-scratch init)."
    ),
    method: str = typer.Option("auto", "--svd", help="auto, exact or randomized."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where the decomposition runs."),
    adaptive: list[str] = typer.Option(
        [],
        "--adaptive",
        help="LORSA on parameter generators: 'auto' (torch.fx) "
        "or 'PATTERN: G x [RxC, ...]' (repeatable), see lors_convert.lorsa.",
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="adamixer-paper: LORST r=8 on out_proj, "
        "LORSA r=16 K=1,1,2,2,3,3 on the generators (overrides rank/groups).",
    ),
    calibrate: Path | None = typer.Option(
        None,
        "--calibrate",
        help="Calibration inputs: a text file (HF text "
        "models) or a .safetensors/.pt tensor file; whitened, activation-aware fit.",
    ),
    heldout: Path | None = typer.Option(
        None,
        "--heldout",
        help="Held-out inputs for the fidelity report "
        "[20% of --calibrate, else lors's probe text for HF text models].",
    ),
    heldout_fraction: float | None = typer.Option(
        None,
        "--heldout-fraction",
        help="Share of --calibrate held out for the fidelity report [0.2; 0 with --heldout].",
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        help="Smallest budget keeping a held-out fidelity: "
        "top1=0.95, cosine=0.95, ppl-ratio=1.1 or rel-error=0.2 (replaces --budget).",
    ),
    fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Measure held-out fidelity."),
    refine: int = typer.Option(0, "--refine", help="Alternating refinement sweeps of the shared part."),
    budget: float | None = typer.Option(
        None,
        "--budget",
        help="Target fraction of the stacked parameters; ranks per layer by water-filling (replaces --rank).",
    ),
    sharing: str | None = typer.Option(
        None,
        "--sharing",
        help="With --budget: auto (drop a stack's shared "
        "part where private rank pays more), always (LORS everywhere) or never "
        "(per-layer low rank) [auto].",
    ),
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="With --calibrate: minimize the model "
        "output's error (output: input and output-gradient Grams) or each "
        "layer's own (layer) [output].",
    ),
    probes: int | None = typer.Option(
        None,
        "--probes",
        help="Random probes (backward passes) per calibration batch for --objective output [4].",
    ),
    keep_unsaving: bool = typer.Option(
        False, "--keep-unsaving", help="Convert matrices even where it saves nothing."
    ),
    shard_size: str = typer.Option(
        "2GB", "--max-shard-size", help="Shard the safetensors output above this size."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print stacks and projected savings; write nothing."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No tables or progress."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    hf_code: bool = typer.Option(
        False,
        "--hf-code",
        help="Also write modeling_lors.py and config.json's auto_map: transformers loads the "
        "checkpoint without lors (trust_remote_code=True runs that file).",
    ),
) -> None:
    """Convert a dense model to a LORS checkpoint and print the savings report."""
    from ..io.atomic import check_not_input, check_output

    options = convert_options(
        rank,
        groups,
        include,
        exclude,
        init,
        method,
        device,
        adaptive,
        preset,
        refine,
        budget,
        sharing,
        keep_unsaving,
        calibrate,
        objective,
        probes,
        target,
    )
    if heldout_fraction is not None and calibrate is None:
        raise LorsUsageError("--heldout-fraction goes with --calibrate")
    out = output or default_output(src, ".lors")
    if not dry_run:
        for given in (src, calibrate, heldout):  # never replace an input, even with --force
            if given is not None:
                check_not_input(out, given)
        check_output(out, force)
    from ..checkpoint.hf_code import check_hf_code_source, write_hf_code
    from ..convert_file import convert_file  # torch and transformers: only once the flags are known good
    from ..io.dist import Dist

    if hf_code:
        check_hf_code_source(src, options["adaptive"])

    report = convert_file(
        src,
        out,
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
        **options,
    )
    if hf_code and report is not None and not dry_run:
        write_hf_code(out)
    if report is not None:  # None on torchrun ranks other than 0
        show(
            report,
            json_out,
            quiet,
            title=(
                f"LORS dry run of {src} (nothing written)"
                if dry_run
                else f"LORS conversion of {src} -> {out}"
            ),
        )


def convert_options(
    rank,
    groups,
    include,
    exclude,
    init,
    method,
    device,
    adaptive,
    preset,
    refine,
    budget,
    sharing,
    keep_unsaving,
    calibrate,
    objective,
    probes,
    target,
) -> dict:
    """Check the convert command's flags together and turn them into ``convert_file`` arguments."""
    from ..options import INITS, METHODS, OBJECTIVES, SHARING, Target

    r = parse_rank(rank)
    if init not in INITS:
        raise LorsUsageError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if method not in METHODS:
        raise LorsUsageError(f"--svd must be one of {', '.join(METHODS)}, got {method!r}")
    group_list = parse_int_list(groups, "--groups")
    group_arg = group_list[0] if group_list and len(group_list) == 1 else group_list
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LorsUsageError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LorsUsageError("--device cuda: no CUDA device is available")
    adaptive_arg = adaptive or None
    if preset is not None:
        if preset != "adamixer-paper":
            raise LorsUsageError(f"--preset must be adamixer-paper, got {preset!r}")
        from ..discover.generators import paper_adamixer_settings

        settings = paper_adamixer_settings()
        r, group_arg, adaptive_arg = settings["rank"], settings["groups"], settings["adaptive"]
        include = include or settings["include"]
    if refine < 0:
        raise LorsUsageError(f"--refine must be >= 0, got {refine}")
    for flag, value in (("--objective", objective), ("--probes", probes)):
        if value is not None and calibrate is None:
            raise LorsUsageError(f"{flag} goes with --calibrate")
    objective = objective or "output"
    if objective not in OBJECTIVES:
        raise LorsUsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if probes is not None and probes < 1:
        raise LorsUsageError(f"--probes must be >= 1, got {probes}")
    if probes is not None and objective != "output":
        raise LorsUsageError("--probes goes with --objective output")
    if sharing is not None and budget is None and target is None:
        raise LorsUsageError("--sharing goes with --budget or --target")
    if (budget is not None or target is not None) and groups is not None:  # the budget chooses the ranks
        raise LorsUsageError(
            "--groups does not combine with --budget or --target: the budget chooses one rank per layer"
        )
    sharing = sharing or "auto"
    if sharing not in SHARING:
        raise LorsUsageError(f"--sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    return dict(
        rank=r,
        groups=group_arg,
        include=include,
        exclude=exclude,
        init=init,
        method=method,
        device=device,
        require_savings=not keep_unsaving,
        adaptive=adaptive_arg,
        refine=refine,
        budget=budget,
        sharing=sharing,
        calibrate=calibrate,
        objective=objective,
        probes=probes,
        target=Target.parse(target) if target is not None else None,
    )
