"""``lors heal`` as a library call: a LORS checkpoint in, a healed checkpoint out, and its report.

:func:`heal_checkpoint` (parallel to :func:`lors_convert.convert_file.convert_file`) loads the
dense source as teacher and the checkpoint as student, chooses the data (:mod:`.data`), measures
fidelity before and after on the same held-out inputs as ``lors convert`` (``--heldout``, else the
shipped probe text for text models), runs :func:`~lors_convert.heal.train.heal` resumably, and writes
the healed checkpoint with the report: source, tokens trained on, time, fidelity before and after.
``minutes`` bounds the generation of text and the training together.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from .. import checkpoint as ck
from ..calibrate.fidelity import Reference, fidelity, fidelity_problems, fidelity_score, is_causal_lm
from ..calibrate.probes import default_probes, read_probes
from ..errors import LorsError, LorsUsageError, about
from ..io.atomic import check_not_input, check_output
from ..io.hf import has_tokenizer, load_tokenizer
from ..io.sources import SourceInfo, load_source
from ..report import Report
from .data import DataRequest, HealData, input_data, lm_data
from .settings import HealSettings, bf16_pays
from .train import HealResult, HealStatus, heal

POOR_AFTER = "after healing, still"


def _default_output(path: Path) -> Path:
    return path.parent / f"{path.name.rstrip('/') or 'model'}.healed.lors"  # as the CLI names it


def _models(path: Path, ckpt, arch: str | None, trust_arch: bool, trust_pickle: bool):
    src = ckpt.source
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
    return teacher, student


def _probes(report: Report, teacher, tokenizer_dir: Path | None, heldout: Path | None):
    """The held-out inputs of the before/after figures, as ``lors convert`` measures them."""
    probe = read_probes(heldout, tokenizer_dir) if heldout is not None else default_probes(tokenizer_dir)
    if not probe.batches:
        return None, probe
    return Reference(teacher, probe.batches, probe.label, probe.synthetic), probe


def _scored(quality: dict) -> dict:
    """The score that chooses the best state, with the figures behind it (the curve in the report)."""
    kept = ("ppl_ratio", "kl", "top1", "cosine", "rel_error")
    return {
        "score": fidelity_score(quality),
        **{k: quality.get(f"heldout_{k}") for k in kept if f"heldout_{k}" in quality},
    }


def _before(report: Report, student, reference: Reference, probe) -> dict:
    """The student's fidelity now: the conversion's own figures when they were taken on these probes."""
    q = report.quality
    if q.get("heldout_probe") == reference.label and q.get("before_heal_heldout_kind") is None:
        return {k: v for k, v in q.items() if k.startswith("heldout_")}
    with about(probe.origin):
        return fidelity(student, reference)


def _record(report: Report, before: dict, after: dict, result: HealResult, data: HealData, s) -> None:
    q = report.quality
    q.update({f"before_heal_{k}": v for k, v in before.items()})
    q.update(after)
    q.update(
        heal_data=data.sources,
        heal_samples=data.samples,
        heal_tokens=result.tokens,
        heal_steps=result.steps,
        heal_local_steps=result.local_steps,
        heal_seconds=round(result.seconds, 1),
        heal_precision=s.precision,
        heal_loss=s.loss,
        heal_synthetic=result.synthetic,
        heal_final_loss=result.history[-1]["loss"] if result.history else None,
        heal_best_step=result.best_step,
        heal_evaluations=result.evaluations,
    )
    poor = fidelity_problems(before)  # the conversion's warning about the unhealed model is not repeated
    report.warnings = [w for w in report.warnings if not (poor and w.startswith("poor fidelity on"))]
    problems = fidelity_problems(after)
    if problems:
        report.warnings.append(
            f"{POOR_AFTER} poor fidelity on {after.get('heldout_probe')}: {'; '.join(problems)}"
        )
    if result.evaluations and result.best_step == result.resumed_from and result.steps > result.resumed_from:
        report.warnings.append(
            "heal: no step improved held-out fidelity over the start: the model is kept as it was; "
            "try a lower --lr"
        )


def _settle(s: HealSettings, causal: bool, started: float) -> HealSettings:
    """The settings of this run: the loss and precision chosen, the time left of ``minutes``."""
    if causal:  # packed windows of real text: no bigram-chain inputs unless asked for
        s = dataclasses.replace(s, loss=s.loss or "kl", synthetic=s.synthetic or 0.0)
    if s.precision == "auto":
        s = dataclasses.replace(s, precision="bf16" if bf16_pays(s.device) else "fp32")
    if s.minutes:
        left = s.minutes - (time.perf_counter() - started) / 60.0
        # a limit already spent stays a limit (0 would mean none): no step runs
        s = dataclasses.replace(s, minutes=max(left, 1e-9))
    return s


def heal_checkpoint(
    path: str | Path,
    output: str | Path | None = None,
    *,
    settings: HealSettings | None = None,
    request: DataRequest | None = None,
    heldout: Path | None = None,
    arch: str | None = None,
    trust_arch: bool = False,
    trust_pickle: bool = False,
    force: bool = False,
    monitor: Callable[[HealStatus], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Report, Path]:
    """Heal the checkpoint at ``path`` into ``output`` [``<ckpt>.healed.lors``]; the report and the output.

    ``settings.loss`` None: ``kl`` for causal LMs, else ``mse``;
    ``settings.minutes`` counts from this call. Resumable: rerun the same call after an interruption.
    """
    started = time.perf_counter()
    settings, request = settings or HealSettings(), request or DataRequest()
    path = Path(path)
    out = Path(output) if output is not None else _default_output(path)
    ckpt = ck.Checkpoint(path)
    for given in (path, request.data, heldout, ckpt.source.get("path")):  # never replace an input
        if given:
            check_not_input(out, Path(given))
    check_output(out, force)
    teacher, student = _models(path, ckpt, arch, trust_arch, trust_pickle)
    report = ckpt.report()  # read (and checked) before any work: a broken report.json fails here
    src = ckpt.source
    info = SourceInfo(
        kind=src["kind"],
        path=src.get("path"),
        arch=src.get("arch"),
        sha256=src.get("sha256"),
        files=ckpt.side_files() if src.get("kind") in ("hf", "gguf") else [],
    )
    text_model = info.kind in ("hf", "gguf")
    tok_dir = path if has_tokenizer(path) else Path(info.path or "")
    tok_dir = tok_dir if has_tokenizer(tok_dir) else None
    causal = is_causal_lm(teacher) and tok_dir is not None
    if settings.device is not None:
        teacher.to(settings.device)  # the text is generated where the teacher will run
    if causal:
        tokenizer = load_tokenizer(tok_dir)
        data = lm_data(teacher, tokenizer, request, out.parent, info.sha256 or str(info.path), log)
    else:
        data = input_data(request, tok_dir or Path(info.path or ""), text_model)
    reference, probe = _probes(report, teacher, tok_dir, heldout)
    before = _before(report, student, reference, probe) if reference is not None else {}
    choose = Reference(teacher, data.heldout, "held-out heal inputs") if data.heldout else None
    evaluate = (lambda: _scored(fidelity(student, choose))) if choose is not None else None
    s = _settle(settings, causal, started)
    state_file = out.parent / f".{out.name}.heal-state.pt"
    result = heal(
        student,
        teacher,
        data.batches,
        s,
        checkpoint_path=state_file,
        evaluate=evaluate,
        monitor=monitor,
        data_name=data.data_file,
    )
    student = student.to("cpu")
    after = fidelity(student, reference) if reference is not None else {}
    _record(report, before, after, result, data, s)
    report.quality["heal_wall_seconds"] = round(time.perf_counter() - started, 1)
    if reference is None:
        report.warnings.append(f"heal: fidelity not measured ({probe.why_none})")
    ck.save(student, out, report=report, source=info, manifest=ckpt.manifest, force=force, files_dir=path)
    state_file.unlink(missing_ok=True)
    return report, out


__all__ = ["heal_checkpoint", "DataRequest", "HealSettings"]
