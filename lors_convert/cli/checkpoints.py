"""``lors report``, ``lors merge`` and ``lors heal``: the commands that read a checkpoint (or project one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LorsUsageError, about
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


def _heal_monitor(enabled: bool):
    """A line on stderr every few seconds: phase, step, tokens, tokens/s, loss, latest held-out score."""
    if not enabled:
        return None
    import time

    last = [time.monotonic()]

    def monitor(st) -> None:
        now = time.monotonic()
        if now - last[0] < 10.0 and st.fraction < 1.0:
            return
        last[0] = now
        held = f", held-out score {st.heldout:.4g}" if st.heldout is not None else ""
        typer.echo(
            f"heal ({st.phase}): step {st.step}, {st.tokens:,} tokens, "
            f"{st.tokens / max(st.seconds, 1e-9):.0f} tokens/s, loss {st.loss:.4g}{held}, "
            f"{st.seconds / 60:.1f} min, {min(st.fraction, 1.0):.0%} done",
            err=True,
        )

    return monitor


# lors heal's flags
HealPath = Annotated[Path, typer.Argument(help="A LORS checkpoint directory.")]
HealData = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Inputs to heal on: a text file (one sample per line) or .safetensors/.pt tensors "
        "[causal LMs: text the source writes; text encoders: lors's shipped text; others: required].",
    ),
]
HealGenerate = Annotated[
    bool,
    typer.Option(
        "--generate/--no-generate",
        help="Causal LMs: train on text the source model writes (cached beside the output), "
        "besides --data; --no-generate trains on --data alone (its last windows choose the best state).",
    ),
]
HealGenerated = Annotated[int, typer.Option("--generated-tokens", help="Tokens of text the source writes.")]
HealHeldout = Annotated[
    Path | None,
    typer.Option("--heldout", help="Held-out inputs for the fidelity report [the shipped probe text]."),
]
HealHeldoutFraction = Annotated[
    float | None,
    typer.Option(
        "--heldout-fraction",
        help="Models that do not generate: share of --data held out to keep the best state [0.2].",
    ),
]
HealSteps = Annotated[
    int | None,
    typer.Option("--steps", help="Stop after N optimizer steps [300 without --tokens or --minutes]."),
]
HealTokens = Annotated[int, typer.Option("--tokens", help="Stop after training on N tokens (0: no limit).")]
HealMinutes = Annotated[
    float, typer.Option("--minutes", help="Stop after N minutes, text generation included (0: no limit).")
]
HealLr = Annotated[
    float | None,
    typer.Option(
        "--lr", help="Peak learning rate (Adam, linear warm-up, cosine decay) [1e-4 for kl, else 1e-3]."
    ),
]
HealWarmup = Annotated[
    int | None, typer.Option("--warmup", help="Warm-up steps [steps/20; 10 under a limit].")
]
HealSeqLen = Annotated[int, typer.Option("--seq-len", help="Causal LMs: tokens per packed window.")]
HealBatchTokens = Annotated[int, typer.Option("--batch-tokens", help="Causal LMs: tokens per step.")]
HealLocalShare = Annotated[
    float, typer.Option("--local-share", help="Share of the run spent on block-local distillation first.")
]
HealPrecision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 on CPUs with AVX512-BF16/AMX and bf16 GPUs), fp32, or bf16 (autocast, fp32 master weights).",
    ),
]
HealLoss = Annotated[
    str | None,
    typer.Option(
        "--loss",
        help="mse, cosine or pooled_cosine (on the last hidden "
        "state), or kl (on next-token logits) [kl for causal LMs, else mse].",
    ),
]
HealEvalEvery = Annotated[
    int | None,
    typer.Option(
        "--eval-every",
        help="Measure held-out fidelity every N steps and keep the best state [steps/10].",
    ),
]
HealMatch = Annotated[
    str, typer.Option("--match", help="output (the model's) or layers (also every stacked block's).")
]
HealTrainable = Annotated[str, typer.Option("--train", help="lors (shared + factors) or all parameters.")]
HealSynthetic = Annotated[
    float | None,
    typer.Option(
        "--synthetic",
        help="Share of steps on synthetic token inputs (a bigram chain over the data's "
        "tokens) [0.75 for padded token data, else 0].",
    ),
]
HealSeed = Annotated[int, typer.Option("--seed", help="Seed of the generated text and of the batch order.")]
HealDevice = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
HealOutput = Annotated[
    Path | None, typer.Option("--output", "-o", help="Healed checkpoint [<ckpt>.healed.lors].")
]
HealArch = Annotated[
    str | None, typer.Option("--arch", help="Architecture of a state-dict source (as at convert).")
]
HealTrustArch = Annotated[
    bool, typer.Option("--trust-arch", help="Build the architecture recorded in the checkpoint.")
]
HealTrustPickle = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling a pickled-module source.")
]
HealJsonOut = Annotated[bool, typer.Option("--json", help="The report as JSON on stdout.")]
HealQuiet = Annotated[bool, typer.Option("--quiet", "-q")]
HealForce = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing output; discard a heal state left by other settings."),
]
HealHfCode = Annotated[
    bool,
    typer.Option(
        "--hf-code",
        help="Also write modeling_lors.py and config.json's auto_map: transformers loads the "
        "healed checkpoint without lors (trust_remote_code=True runs that file).",
    ),
]


@app.command()
@handle_errors
def heal(
    path: HealPath,
    data: HealData = None,
    generate: HealGenerate = True,
    generated: HealGenerated = 32768,
    heldout: HealHeldout = None,
    heldout_fraction: HealHeldoutFraction = None,
    steps: HealSteps = None,
    tokens: HealTokens = 0,
    minutes: HealMinutes = 0.0,
    lr: HealLr = None,
    warmup: HealWarmup = None,
    seq_len: HealSeqLen = 64,
    batch_tokens: HealBatchTokens = 512,
    local_share: HealLocalShare = 0.0,
    precision: HealPrecision = "auto",
    loss: HealLoss = None,
    eval_every: HealEvalEvery = None,
    match: HealMatch = "output",
    trainable: HealTrainable = "lors",
    synthetic: HealSynthetic = None,
    seed: HealSeed = 0,
    device: HealDevice = "cpu",
    output: HealOutput = None,
    arch: HealArch = None,
    trust_arch: HealTrustArch = False,
    trust_pickle: HealTrustPickle = False,
    json_out: HealJsonOut = False,
    quiet: HealQuiet = False,
    force: HealForce = False,
    hf_code: HealHfCode = False,
) -> None:
    """Distill a LORS checkpoint towards its dense source; resumable (rerun the same command)."""
    from ..heal.checkpoint import DataRequest, HealSettings, heal_checkpoint

    _check_heal_flags(steps, lr, tokens, minutes, match, synthetic, eval_every, heldout_fraction, heldout)
    steps = steps if steps is not None else (0 if tokens or minutes else 300)
    settings = HealSettings(
        steps=steps,
        tokens=tokens,
        minutes=minutes,
        lr=lr,
        warmup=warmup,
        loss=loss,
        trainable=trainable,
        match=match,
        synthetic=synthetic,
        local_share=local_share,
        precision=precision,
        seed=seed,
        eval_every=eval_every or (max(1, steps // 10) if steps else 0),
        eval_seconds=0.0 if steps else 120.0,
        device=device,
        restart=force,
    )
    request = DataRequest(data, generate, generated, seq_len, batch_tokens, seed, heldout_fraction)
    talk = not (quiet or json_out)
    report, out = heal_checkpoint(
        path,
        output,
        settings=settings,
        request=request,
        heldout=heldout,
        arch=arch,
        trust_arch=trust_arch,
        trust_pickle=trust_pickle,
        force=force,
        monitor=_heal_monitor(talk),
        log=(lambda line: typer.echo(line, err=True)) if talk else None,
    )
    if hf_code:
        from ..checkpoint.hf_code import write_hf_code

        write_hf_code(out)
    show(report, json_out, quiet, title=f"LORS heal of {path} -> {out}")


def _check_heal_flags(steps, lr, tokens, minutes, match, synthetic, eval_every, heldout_fraction, heldout):
    """Usage errors of lors heal's flags, before anything is loaded."""
    if (steps is not None and steps < 1) or (lr is not None and lr <= 0) or tokens < 0 or minutes < 0:
        raise LorsUsageError("--steps must be >= 1, --lr > 0, --tokens and --minutes >= 0")
    if match not in ("output", "layers"):
        raise LorsUsageError(f"--match must be output or layers, got {match!r}")
    if synthetic is not None and not 0.0 <= synthetic <= 1.0:
        raise LorsUsageError(f"--synthetic must be a share of the steps in [0, 1], got {synthetic}")
    if eval_every is not None and eval_every < 1:
        raise LorsUsageError(f"--eval-every must be >= 1, got {eval_every}")
    if heldout_fraction is not None or heldout is not None:
        from ..calibrate.data import resolve_heldout

        resolve_heldout(heldout_fraction, heldout)
