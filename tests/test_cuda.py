"""The CUDA path, skipped where there is no GPU: the math, the calibration passes and healing run on
the device and give the CPU's results within float32/bf16 tolerances, and what is saved loads on
either."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from heal_tiny import llama, llama_dir

from lors_convert import convert, load, merge
from lors_convert.calibrate.generated import sample
from lors_convert.calibrate.packing import pack, window_batches
from lors_convert.heal import HealSettings, heal, stack_members
from lors_convert.heal.blocks import block_errors
from tests.clirun import run_ok
from tests.models import gpt2, token_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _dense(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in merge(copy.deepcopy(model).cpu()).state_dict().items()}


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12))
        assert err <= rtol, (k, err)


def test_plain_conversion_on_cuda_gives_the_cpu_weights():
    source = gpt2()
    on_cpu, _ = convert(copy.deepcopy(source), rank=4)
    on_gpu, report = convert(copy.deepcopy(source), rank=4, device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())  # the model stays where it was
    _close(_dense(on_gpu), _dense(on_cpu), rtol=1e-4)  # the merged weights: sign-free, float32 SVDs
    assert report.params_after < report.params_before


def test_a_calibrated_conversion_runs_its_passes_on_the_device(tmp_path):
    """``lors convert --budget --device cuda`` on a causal LM: the text it calibrates on is written,
    the Grams collected, the closed loop run and fidelity measured on the GPU; the checkpoint matches
    the CPU run's parameter count (2%), and its fidelity the CPU's (10%: float32 sums in another
    order can flip a sampled token of the calibration text)."""
    src = llama_dir(tmp_path / "src")
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.lors"
        run_ok("convert", src, "--budget", "0.6", "--device", device, "-o", out, "-q")
        reports[device] = json.loads((out / "report.json").read_text())
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["total"]["params_after"] == pytest.approx(cpu["total"]["params_after"], rel=0.02)
    assert gpu["quality"]["closed_loop_layers"] == cpu["quality"]["closed_loop_layers"] > 0
    assert gpu["quality"]["heldout_ppl_ratio"] == pytest.approx(cpu["quality"]["heldout_ppl_ratio"], rel=0.1)
    model = load(tmp_path / "cuda.lors").cuda()
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]], device="cuda")
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_lors_model_runs_and_trains_on_cuda():
    source = gpt2()
    model, _ = convert(copy.deepcopy(source).eval(), rank=4)  # eval: no dropout, one function
    batch = token_batches(100, n=1)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    model.cuda()
    got = model(**{k: v.cuda() for k, v in batch.items()}).logits
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    got.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "cuda" and torch.isfinite(g).all() for g in grads)


def _windows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack([torch.randint(2, 60, (n * 16,), generator=g).tolist()], 16).windows  # (n, 16)


def test_heal_on_cuda_lowers_every_blocks_error_in_bf16():
    teacher = llama(4, 48)
    student = copy.deepcopy(teacher)
    convert(student, rank=2)
    train = window_batches(_windows(16, seed=0), batch_tokens=64)
    held = window_batches(_windows(4, seed=1), batch_tokens=64)
    members = stack_members(teacher)
    before = [sum(e) for e in zip(*(block_errors(student, teacher, members, b) for b in held), strict=True)]
    teacher.cuda()
    settings = HealSettings(steps=30, lr=1e-2, local_share=1.0, loss="kl", warmup=1, device="cuda")
    result = heal(student, teacher, train, settings)
    assert result.local_steps == 30
    assert next(student.parameters()).device.type == "cuda"
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights
    student.cpu(), teacher.cpu()
    after = [sum(e) for e in zip(*(block_errors(student, teacher, members, b) for b in held), strict=True)]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        assert a < 0.97 * b, (i, b, a)


def test_lors_heal_on_cuda_end_to_end(tmp_path):
    src = llama_dir(tmp_path / "src")
    run_ok("convert", src, "--rank", "2", "-o", tmp_path / "c.lors", "-q")
    res = run_ok(
        "heal", tmp_path / "c.lors", "-o", tmp_path / "h.lors", "--device", "cuda", "--steps", "6",
        "--seq-len", "16", "--batch-tokens", "32", "--generated-tokens", "512", "--json",
    )  # fmt: skip
    q = json.loads(res.stdout)["quality"]
    assert q["heal_steps"] == 6 and q["heal_precision"] == "bf16"  # autocast where the GPU has bf16
    scores = {e["step"]: e["score"] for e in q["heal_evaluations"]}
    assert scores[q["heal_best_step"]] == max(scores.values()) >= scores[0]
    healed = load(tmp_path / "h.lors")
    assert all(p.device.type == "cpu" for p in healed.parameters())


def test_generated_text_samples_the_same_tokens_on_the_gpu():
    """The draws come from CPU uniforms and a float64 cumulative sum: the GPU picks the CPU's tokens."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 4096, generator=g)  # (64, V)
    u = torch.rand(64, 1, generator=g, dtype=torch.float64)  # (64, 1)
    assert torch.equal(sample(logits.cuda(), u).cpu(), sample(logits, u))
