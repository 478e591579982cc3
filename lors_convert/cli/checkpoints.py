"""``lors report``, ``lors merge`` and ``lors heal``: the commands that read a checkpoint (or project one)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import LorsError, LorsUsageError, about
from .common import (
    app,
    console,
    default_output,
    emit_json,
    handle_errors,
    make_progress,
    parse_int_list,
    show,
)


@app.command()
@handle_errors
def report(
    path: Path = typer.Argument(..., help="A LORS checkpoint directory, or a dense source for a rank sweep."),
    ranks: str = typer.Option("4,8,16,32,64", "--ranks", help="Ranks to project for a dense source."),
    arch: str | None = typer.Option(None, "--arch", help="package.module:callable for a state dict source."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a whole module."),
    include: list[str] = typer.Option([], "--include"),
    exclude: list[str] = typer.Option([], "--exclude"),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write error vs parameters over the rank sweep as PNG."
    ),
    json_out: bool = typer.Option(False, "--json", help="JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Show what a LORS checkpoint saved, or project savings and error for a dense model."""
    from ..checkpoint import CONFIG_NAME, Checkpoint
    from ..io.atomic import recover_output

    recover_output(path)  # a replacement killed half-way: the previous output comes back first
    if (path / CONFIG_NAME).is_file() if path.is_dir() else False:
        if plot is not None:
            raise LorsUsageError("--plot draws a rank sweep: give the dense source, not a LORS checkpoint")
        rep = Checkpoint(path).report()
        show(rep, json_out, quiet, title=f"LORS checkpoint {path}")
        return
    from ..io.sources import load_source
    from ..sweep import rank_sweep, render_sweep, write_plot

    rank_list = parse_int_list(ranks, "--ranks")
    model, _ = load_source(path, arch=arch, trust_pickle=trust_pickle)
    with about(path):
        sweep = rank_sweep(model, rank_list, include=include, exclude=exclude)
    if plot is not None:
        write_plot(sweep, plot)
    if json_out:
        emit_json(sweep)
    elif not quiet:
        render_sweep(sweep, console(), title=f"LORS projection for {path}")


@app.command()
@handle_errors
def merge(
    path: Path = typer.Argument(..., help="A LORS checkpoint directory."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Dense output: a directory, a .safetensors file, or a .gguf file [<ckpt>.merged].",
    ),
    shard_size: str = typer.Option("2GB", "--max-shard-size"),
    out_format: str | None = typer.Option(
        None,
        "--format",
        help="hf (a directory, or a .safetensors file) or "
        "gguf (a GGUF source only) [gguf for an output ending in .gguf].",
    ),
    outtype: str | None = typer.Option(None, "--outtype", help="With --format gguf: f32 or f16 [f32]."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Merge a LORS checkpoint back to dense weights with the source's keys, shapes and dtypes."""
    from ..checkpoint import merge_checkpoint

    out = output or default_output(path, ".gguf" if out_format == "gguf" else ".merged")
    is_gguf = (out_format or ("gguf" if out.suffix.lower() == ".gguf" else "hf")) == "gguf"
    if outtype is not None and not is_gguf:
        raise LorsUsageError("--outtype goes with --format gguf")
    merge_checkpoint(
        path,
        out,
        force=force,
        progress=make_progress(not (quiet or json_out)),
        max_shard_size=shard_size,
        format=out_format,
        gguf_type=outtype or "f32",
    )
    if json_out:
        emit_json({"output": str(out)})
    elif not quiet:
        console().print(f"merged {path} -> {out}")


@app.command()
@handle_errors
def heal(
    path: Path = typer.Argument(..., help="A LORS checkpoint directory."),
    data: Path = typer.Option(
        ..., "--data", help="Distillation inputs: text file or .safetensors/.pt tensors."
    ),
    heldout: Path | None = typer.Option(None, "--heldout", help="Held-out inputs for the fidelity report."),
    heldout_fraction: float | None = typer.Option(
        None,
        "--heldout-fraction",
        help="Share of --data held out for the fidelity report [0.2; 0 with --heldout].",
    ),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (AdamW, warmup + cosine)."),
    loss: str | None = typer.Option(
        None,
        "--loss",
        help="mse, cosine or pooled_cosine (on the last hidden "
        "state), or kl (on next-token logits) [kl for causal LMs, else mse].",
    ),
    eval_every: int | None = typer.Option(
        None,
        "--eval-every",
        help="Measure held-out fidelity every N steps and keep the best state [steps/10].",
    ),
    match: str = typer.Option(
        "output", "--match", help="output (the model's) or layers (also every stacked block's)."
    ),
    trainable: str = typer.Option("lors", "--train", help="lors (shared + factors) or all parameters."),
    synthetic: float | None = typer.Option(
        None,
        "--synthetic",
        help="Share of steps on synthetic token inputs (a bigram chain over the data's "
        "tokens) [0.75 for token data, else 0].",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Healed checkpoint [<ckpt>.healed.lors]."
    ),
    arch: str | None = typer.Option(
        None, "--arch", help="Architecture of a state-dict source (as at convert)."
    ),
    trust_arch: bool = typer.Option(
        False, "--trust-arch", help="Build the architecture recorded in the checkpoint."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow unpickling a pickled-module source."
    ),
    json_out: bool = typer.Option(False, "--json", help="The report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output; discard a heal state left by other settings."
    ),
) -> None:
    """Distill a LORS checkpoint towards its dense source; resumable (rerun the same command)."""
    from .. import checkpoint as ck
    from ..calibrate.data import read_calibration
    from ..calibrate.fidelity import Reference, fidelity, fidelity_score, is_causal_lm
    from ..heal import heal as run_heal
    from ..io.atomic import check_not_input, check_output
    from ..io.hf import has_tokenizer
    from ..io.sources import SourceInfo, load_source

    if steps < 1 or lr <= 0:
        raise LorsUsageError("--steps must be >= 1 and --lr > 0")
    if match not in ("output", "layers"):
        raise LorsUsageError(f"--match must be output or layers, got {match!r}")
    if synthetic is not None and not 0.0 <= synthetic <= 1.0:
        raise LorsUsageError(f"--synthetic must be a share of the steps in [0, 1], got {synthetic}")
    if eval_every is not None and eval_every < 1:
        raise LorsUsageError(f"--eval-every must be >= 1, got {eval_every}")
    ckpt = ck.Checkpoint(path)
    out = output or default_output(path, ".healed.lors")
    src = ckpt.source
    for given in (path, data, heldout, src.get("path")):  # never replace an input, even with --force
        if given:
            check_not_input(out, Path(given))
    check_output(out, force)
    if not src.get("path") or not Path(src["path"]).exists():
        raise LorsError(
            f"{path}: healing needs the dense source {src.get('path')!r} as teacher, and it is not there"
        )
    recorded_arch = arch or (src.get("arch") if src.get("kind") == "state_dict" and trust_arch else None)
    if src.get("kind") == "state_dict" and recorded_arch is None:
        raise LorsUsageError(
            f"{path}: pass --arch {src.get('arch')} (or --trust-arch) to rebuild the teacher"
        )
    teacher, _ = load_source(src["path"], arch=recorded_arch, trust_pickle=trust_pickle)
    student = ck.load(path, arch=recorded_arch, trust_pickle=trust_pickle)
    report = ckpt.report()  # read (and checked) before any work: a broken report.json fails here
    info = SourceInfo(
        kind=src["kind"],
        path=src.get("path"),
        arch=src.get("arch"),
        sha256=src.get("sha256"),
        files=ckpt.side_files() if src.get("kind") in ("hf", "gguf") else [],
    )
    data_set = read_calibration(
        data,
        path if has_tokenizer(path) else Path(info.path or ""),
        info.kind in ("hf", "gguf"),
        heldout,
        heldout_fraction,
    )
    reference = Reference(teacher, data_set.heldout) if data_set.heldout else None
    with about(data_set.heldout_origin):
        before = fidelity(student, reference) if reference is not None else {}
    loss = loss or ("kl" if is_causal_lm(teacher) else "mse")
    state_file = out.parent / f".{out.name}.heal-state.pt"  # resumable across interruptions
    bar = make_progress(not (quiet or json_out))
    callback = None
    if bar is not None:
        ticks = bar(iter(range(steps)), steps, "healing")

        def callback(step, total, value):
            next(ticks, None)

    evaluate = (lambda: fidelity_score(fidelity(student, reference))) if reference is not None else None
    result = run_heal(
        student,
        teacher,
        data_set.calibration,
        steps=steps,
        lr=lr,
        loss=loss,
        trainable=trainable,
        checkpoint_path=state_file,
        progress=callback,
        device=device,
        match=match,
        synthetic=synthetic,
        evaluate=evaluate,
        eval_every=eval_every or max(1, steps // 10),
        restart=force,
        data_name=str(data),
    )
    student = student.to("cpu")
    report.quality.update({f"before_heal_{k}": v for k, v in before.items()})
    if reference is not None:
        report.quality.update(fidelity(student, reference))
    summary = data_set.summary()
    report.quality.update(
        {
            "heal_data": summary["calibration_data"],
            "heal_samples": summary["calibration_samples"],
            "heal_heldout_data": summary["heldout_data"],
        }
    )
    report.quality.update(
        {
            "heal_steps": result.steps,
            "heal_synthetic": result.synthetic,
            "heal_loss": loss,
            "heal_final_loss": result.history[-1]["loss"] if result.history else None,
            "heal_best_step": result.best_step,
            "heal_evaluations": result.evaluations,
        }
    )
    if reference is None:
        report.warnings.append(
            "heal: no held-out inputs, so fidelity was not measured and the last state is kept; "
            "give --heldout FILE (or more --data lines: 20% are held out)"
        )
    elif result.best_step == result.resumed_from:
        report.warnings.append(
            f"heal: no step improved held-out fidelity over the start (score "
            f"{result.evaluations[0]['score']:.4f}, best of {len(result.evaluations)} "
            "measurements): the model is kept as it was; try a lower --lr or more --data"
        )
    ck.save(student, out, report=report, source=info, manifest=ckpt.manifest, force=force, files_dir=path)
    state_file.unlink(missing_ok=True)
    show(report, json_out, quiet, title=f"LORS heal of {path} -> {out}")
