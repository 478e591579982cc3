"""The ``lors`` command line: a thin typer layer over the library.

Human output goes to stderr (rich), ``--json`` to stdout. Exit codes: 0 ok, 1 runtime failure,
2 usage error. Errors are one line; ``LORS_DEBUG=1`` shows the traceback of unexpected ones.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from .errors import LorsError, LorsUsageError, about

class _OneLineUsage(TyperGroup):
    """Click's usage errors (a missing argument, an unknown option, a value of the wrong type) as
    one ``error: ...`` line and exit code 2, like every other error of lors; not usage + hint + error.
    (Matched by class name: typer vendors its own click in some versions.)"""

    def main(self, *args, **kwargs):
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except Exception as e:  # noqa: BLE001 - re-raised unless it is click's
            kinds = {c.__name__ for c in type(e).__mro__}
            if "NoArgsIsHelpError" in kinds:  # bare `lors`: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            if "Abort" in kinds:
                _fail("interrupted", 130)
            if "ClickException" not in kinds:
                raise
            ctx = getattr(e, "ctx", None)
            command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
            hint = f" (see lors{command} --help)" if "UsageError" in kinds else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(code) returns its code here


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_OneLineUsage,
                  rich_markup_mode=None, help="LORS (Low-Rank Residual Structure) surgery for stacked networks.")


def _console():
    from rich.console import Console

    # a log or pipe has no width: rich would crop the table at 80 columns
    return Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def _fail(message: str, code: int) -> None:
    first = " ".join(str(message).split())
    typer.echo(f"error: {first}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn every failure into a one-line message and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LorsError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail("out of memory", 1)
        except Exception as e:  # a bug or an unforeseen input: still one line
            if os.environ.get("LORS_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (set LORS_DEBUG=1 for the traceback)", 1)

    return wrapper


def make_progress(enabled: bool):
    """A progress wrapper for long loops (rich, on stderr), or None when output must stay quiet."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def progress(items, total: int, label: str):
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=_console(), transient=True) as bar:
            task = bar.add_task(label, total=total)
            for item in items:
                yield item
                bar.advance(task)

    return progress


def parse_rank(text: str) -> int | None:
    if text.strip().lower() == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        raise LorsUsageError(f"--rank must be a positive integer or 'full', got {text!r}") from None
    if value < 1:
        raise LorsUsageError(f"--rank must be a positive integer or 'full', got {value}")
    return value


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise LorsUsageError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise LorsUsageError(f"{option} must be positive integers, got {text!r}")
    return values


def default_output(src: Path, suffix: str) -> Path:
    name = src.name.rstrip("/") or "model"
    stem = name[: -len(src.suffix)] if src.suffix and not src.is_dir() else name
    return src.parent / f"{stem}{suffix}"


def emit_json(data) -> None:
    typer.echo(json.dumps(data, indent=1))


# ---------------------------------------------------------------------------------------------


@app.command()
@handle_errors
def convert(
    src: Path = typer.Argument(..., help="HF model dir, state dict (.safetensors/.pt, with --arch), "
                                         "TorchScript archive, or pickled module (with --trust-pickle)."),
    rank: str = typer.Option("8", "--rank", "-r", help="Rank r of each private group, or 'full'."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory [<src>.lors]."),
    groups: Optional[str] = typer.Option(None, "--groups", help="Groups K per layer, e.g. 1,1,2,2,3,3 (or one number)."),
    include: list[str] = typer.Option([], "--include", help="fnmatch pattern over parameter names (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="fnmatch pattern over parameter names (repeatable)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="package.module:callable building the model of a state dict."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a whole module: runs code from the file."),
    init: str = typer.Option("svd", "--init", help="svd (fit the trained weights) or paper (from-scratch init)."),
    method: str = typer.Option("auto", "--svd", help="auto, exact or randomized."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where the decomposition runs."),
    adaptive: list[str] = typer.Option([], "--adaptive", help="LORSA on parameter generators: 'auto' (torch.fx) "
                                        "or 'PATTERN: G x [RxC, ...]' (repeatable), see lors_convert.lorsa."),
    preset: Optional[str] = typer.Option(None, "--preset", help="adamixer-paper: LORST r=8 on out_proj, "
                                         "LORSA r=16 K=1,1,2,2,3,3 on the generators (overrides rank/groups)."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="Calibration inputs: a text file (HF text "
                                             "models) or a .safetensors/.pt tensor file; whitened, activation-aware fit."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out inputs for the quality report "
                                           "[20% of --calibrate]."),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help="Share of --calibrate held "
                                                     "out for the quality report [0.2; 0 with --heldout]."),
    refine: int = typer.Option(0, "--refine", help="Alternating refinement sweeps of the shared part."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Target fraction of the stacked parameters; "
                                           "ranks per layer by water-filling (replaces --rank)."),
    sharing: Optional[str] = typer.Option(None, "--sharing", help="With --budget: auto (drop a stack's shared "
                                          "part where private rank pays more), always (LORS everywhere) or never "
                                          "(per-layer low rank) [auto]."),
    objective: Optional[str] = typer.Option(None, "--objective", help="With --calibrate: minimize the model "
                                            "output's error (output: input and output-gradient Grams) or each "
                                            "layer's own (layer) [output]."),
    probes: Optional[int] = typer.Option(None, "--probes", help="Random probes (backward passes) per calibration "
                                         "batch for --objective output [4]."),
    keep_unsaving: bool = typer.Option(False, "--keep-unsaving", help="Convert matrices even where it saves nothing."),
    shard_size: str = typer.Option("2GB", "--max-shard-size", help="Shard the safetensors output above this size."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print stacks and projected savings; write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No tables or progress."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Convert a dense model to a LORS checkpoint and print the savings report."""
    from .convert import convert_file
    from .io.atomic import check_not_input, check_output
    from .io.dist import Dist

    options = convert_options(rank, groups, include, exclude, init, method, device, adaptive, preset, refine,
                              budget, sharing, keep_unsaving, calibrate, heldout, objective, probes)
    if heldout_fraction is not None and calibrate is None:
        raise LorsUsageError("--heldout-fraction goes with --calibrate")
    out = output or default_output(src, ".lors")
    if not dry_run:
        for given in (src, calibrate, heldout):  # never replace an input, even with --force
            if given is not None:
                check_not_input(out, given)
        check_output(out, force)
    data = options.pop("calibration_path")
    if data is not None:
        from .calibrate.data import read_calibration
        from .io.sources import is_hf_dir

        data = read_calibration(data, src, is_hf_dir(src), heldout, heldout_fraction)
    report = convert_file(src, out, arch=arch, trust_pickle=trust_pickle, calibration_data=data,
                          max_shard_size=shard_size, force=force, dist=Dist.from_env(), dry_run=dry_run,
                          progress=make_progress(not (quiet or json_out)), **options)
    if report is not None:  # None on torchrun ranks other than 0
        _show(report, json_out, quiet, title=(f"LORS dry run of {src} (nothing written)" if dry_run
                                              else f"LORS conversion of {src} -> {out}"))


def convert_options(rank, groups, include, exclude, init, method, device, adaptive, preset, refine, budget,
                    sharing, keep_unsaving, calibrate, heldout, objective, probes) -> dict:
    """Check the convert command's flags together and turn them into ``convert_file`` arguments."""
    from .calibrate.grams import OBJECTIVES
    from .fit.calibrated import SHARING

    r = parse_rank(rank)
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
        from .discover.generators import paper_adamixer_settings

        settings = paper_adamixer_settings()
        r, group_arg, adaptive_arg = settings["rank"], settings["groups"], settings["adaptive"]
        include = include or settings["include"]
    if refine < 0:
        raise LorsUsageError(f"--refine must be >= 0, got {refine}")
    if heldout is not None and calibrate is None:
        raise LorsUsageError("--heldout goes with --calibrate")
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
    if sharing is not None and budget is None:
        raise LorsUsageError("--sharing goes with --budget")
    if budget is not None and groups is not None:  # the budget chose the ranks: --groups was ignored
        raise LorsUsageError("--groups does not combine with --budget: the budget chooses one rank per layer")
    sharing = sharing or "auto"
    if sharing not in SHARING:
        raise LorsUsageError(f"--sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    return dict(rank=r, groups=group_arg, include=include, exclude=exclude, init=init, method=method, device=device,
                require_savings=not keep_unsaving, adaptive=adaptive_arg, refine=refine, budget=budget,
                sharing=sharing, calibration_path=calibrate, objective=objective, probes=probes)


def _show(report, json_out: bool, quiet: bool, title: str) -> None:
    from .report import render

    if json_out:
        emit_json(report.to_dict())
    elif not quiet:
        render(report, _console(), title=title)


@app.command()
@handle_errors
def report(
    path: Path = typer.Argument(..., help="A LORS checkpoint directory, or a dense source for a rank sweep."),
    ranks: str = typer.Option("4,8,16,32,64", "--ranks", help="Ranks to project for a dense source."),
    arch: Optional[str] = typer.Option(None, "--arch", help="package.module:callable for a state dict source."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a whole module."),
    include: list[str] = typer.Option([], "--include"),
    exclude: list[str] = typer.Option([], "--exclude"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write error vs parameters over the rank sweep as PNG."),
    json_out: bool = typer.Option(False, "--json", help="JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Show what a LORS checkpoint saved, or project savings and error for a dense model."""
    from .checkpoint import CONFIG_NAME, Checkpoint
    from .io.atomic import recover_output

    recover_output(path)  # a replacement killed half-way: the previous output comes back first
    if (path / CONFIG_NAME).is_file() if path.is_dir() else False:
        if plot is not None:
            raise LorsUsageError("--plot draws a rank sweep: give the dense source, not a LORS checkpoint")
        rep = Checkpoint(path).report()
        _show(rep, json_out, quiet, title=f"LORS checkpoint {path}")
        return
    from .errors import about
    from .io.sources import load_source
    from .sweep import rank_sweep, render_sweep, write_plot

    rank_list = parse_int_list(ranks, "--ranks")
    model, _ = load_source(path, arch=arch, trust_pickle=trust_pickle)
    with about(path):
        sweep = rank_sweep(model, rank_list, include=include, exclude=exclude)
    if plot is not None:
        write_plot(sweep, plot)
    if json_out:
        emit_json(sweep)
    elif not quiet:
        render_sweep(sweep, _console(), title=f"LORS projection for {path}")


@app.command()
@handle_errors
def merge(
    path: Path = typer.Argument(..., help="A LORS checkpoint directory."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Dense output: a directory, or a .safetensors file [<ckpt>.merged]."),
    shard_size: str = typer.Option("2GB", "--max-shard-size"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
) -> None:
    """Merge a LORS checkpoint back to dense weights with the source's keys, shapes and dtypes."""
    from .checkpoint import merge_checkpoint

    out = output or default_output(path, ".merged")
    merge_checkpoint(path, out, force=force, progress=make_progress(not (quiet or json_out)),
                     max_shard_size=shard_size)
    if json_out:
        emit_json({"output": str(out)})
    elif not quiet:
        _console().print(f"merged {path} -> {out}")


@app.command()
@handle_errors
def heal(
    path: Path = typer.Argument(..., help="A LORS checkpoint directory."),
    data: Path = typer.Option(..., "--data", help="Distillation inputs: text file or .safetensors/.pt tensors."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out inputs for the fidelity report."),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help="Share of --data held out "
                                                     "for the fidelity report [0.2; 0 with --heldout]."),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (AdamW, warmup + cosine)."),
    loss: str = typer.Option("mse", "--loss", help="mse, cosine or pooled_cosine (on the last hidden state)."),
    match: str = typer.Option("output", "--match", help="output (the model's) or layers (also every stacked block's)."),
    trainable: str = typer.Option("lors", "--train", help="lors (shared + factors) or all parameters."),
    synthetic: Optional[float] = typer.Option(
        None, "--synthetic", help="Share of steps on synthetic token inputs (a bigram chain over the data's "
        "tokens) [0.75 for token data, else 0]."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Healed checkpoint [<ckpt>.healed.lors]."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a state-dict source (as at convert)."),
    trust_arch: bool = typer.Option(False, "--trust-arch", help="Build the architecture recorded in the checkpoint."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a pickled-module source."),
    json_out: bool = typer.Option(False, "--json", help="The report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output; discard a heal state left "
                               "by other settings."),
) -> None:
    """Distill a LORS checkpoint towards its dense source; resumable (rerun the same command)."""
    from . import checkpoint as ck
    from .calibrate.data import has_tokenizer, read_calibration
    from .calibrate.fidelity import fidelity, reference_outputs
    from .heal import heal as run_heal
    from .io.atomic import check_not_input, check_output
    from .io.sources import SourceInfo, hf_side_files, load_source

    if steps < 1 or lr <= 0:
        raise LorsUsageError("--steps must be >= 1 and --lr > 0")
    if match not in ("output", "layers"):
        raise LorsUsageError(f"--match must be output or layers, got {match!r}")
    if synthetic is not None and not 0.0 <= synthetic <= 1.0:
        raise LorsUsageError(f"--synthetic must be a share of the steps in [0, 1], got {synthetic}")
    ckpt = ck.Checkpoint(path)
    out = output or default_output(path, ".healed.lors")
    src = ckpt.source
    for given in (path, data, heldout, src.get("path")):  # never replace an input, even with --force
        if given:
            check_not_input(out, Path(given))
    check_output(out, force)
    if not src.get("path") or not Path(src["path"]).exists():
        raise LorsError(f"{path}: healing needs the dense source {src.get('path')!r} as teacher, and it is not there")
    recorded_arch = arch or (src.get("arch") if src.get("kind") == "state_dict" and trust_arch else None)
    if src.get("kind") == "state_dict" and recorded_arch is None:
        raise LorsUsageError(f"{path}: pass --arch {src.get('arch')} (or --trust-arch) to rebuild the teacher")
    teacher, _ = load_source(src["path"], arch=recorded_arch, trust_pickle=trust_pickle)
    student = ck.load(path, arch=recorded_arch, trust_pickle=trust_pickle)
    report = ckpt.report()  # read (and checked) before any work: a broken report.json fails here
    info = SourceInfo(kind=src["kind"], path=src.get("path"), arch=src.get("arch"), sha256=src.get("sha256"),
                      files=hf_side_files(path) if src.get("kind") == "hf" else [])
    data_set = read_calibration(data, path if has_tokenizer(path) else Path(info.path or ""), info.kind == "hf",
                                heldout, heldout_fraction)
    with about(data_set.heldout_origin):
        reference = reference_outputs(teacher, data_set.heldout) if data_set.heldout else None
    before = fidelity(student, reference) if reference is not None else {}
    state_file = out.parent / f".{out.name}.heal-state.pt"  # resumable across interruptions
    bar = make_progress(not (quiet or json_out))
    callback = None
    if bar is not None:
        ticks = bar(iter(range(steps)), steps, "healing")

        def callback(step, total, value):
            next(ticks, None)
    result = run_heal(student, teacher, data_set.calibration, steps=steps, lr=lr, loss=loss, trainable=trainable,
                      checkpoint_path=state_file, progress=callback, device=device, match=match,
                      synthetic=synthetic, restart=force, data_name=str(data))
    student = student.to("cpu")
    report.quality.update({f"before_heal_{k}": v for k, v in before.items()})
    if reference is not None:
        report.quality.update(fidelity(student, reference))
    summary = data_set.summary()
    report.quality.update({"heal_data": summary["calibration_data"], "heal_samples": summary["calibration_samples"],
                           "heal_heldout_data": summary["heldout_data"]})
    report.quality.update({"heal_steps": result.steps, "heal_synthetic": result.synthetic,
                           "heal_final_loss": result.history[-1]["loss"]
                           if result.history else None})
    ck.save(student, out, report=report, source=info, manifest=ckpt.manifest, force=force, files_dir=path)
    state_file.unlink(missing_ok=True)
    _show(report, json_out, quiet, title=f"LORS heal of {path} -> {out}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
