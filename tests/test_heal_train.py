"""The heal loop on a tiny Llama: the block-local phase, bf16 against fp32, resuming, the best state."""

from __future__ import annotations

import copy

import pytest
import torch
from heal_tiny import llama

from lors_convert import convert
from lors_convert.calibrate.fidelity import Reference, fidelity, fidelity_score
from lors_convert.calibrate.packing import pack, window_batches
from lors_convert.heal import HealSettings, heal, stack_members
from lors_convert.heal.blocks import block_errors
from lors_convert.heal.objective import GlobalObjective, TeacherCache


def _windows(n: int, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack([torch.randint(2, 60, (n * seq_len,), generator=g).tolist()], seq_len).windows


def _setup(layers: int = 4, hidden: int = 48, rank: int = 2):
    teacher = llama(layers, hidden)
    student = copy.deepcopy(teacher)
    convert(student, rank=rank)
    train = window_batches(_windows(16), batch_tokens=64)
    held = window_batches(_windows(4, seed=1), batch_tokens=64)
    return teacher, student, train, held


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_block_local_phase_lowers_every_blocks_error_on_held_out_inputs():
    teacher, student, train, held = _setup()
    members = stack_members(teacher)
    before = [sum(e) for e in zip(*(block_errors(student, teacher, members, b) for b in held), strict=True)]
    result = heal(student, teacher, train, steps=30, lr=1e-2, local_share=1.0, loss="kl", warmup=1)
    after = [sum(e) for e in zip(*(block_errors(student, teacher, members, b) for b in held), strict=True)]
    assert result.local_steps == 30 and len(before) == len(members) == 4
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        assert a < 0.97 * b, (i, b, a)  # each block: at least 3% less output error on unseen windows


@pytest.mark.parametrize("kind", ["global", "local"])
def test_a_bf16_step_matches_fp32_within_tolerance(kind):
    """Loss within 3%, gradient direction (cosine) above 0.98 of the fp32 step's, from the same start."""
    teacher, student, train, _ = _setup()
    grads, losses = {}, {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(student)
        for p in model.parameters():
            p.grad = None
        if kind == "global":
            objective = GlobalObjective(model, teacher, "kl", [], train[0], precision == "bf16")
            losses[precision] = objective.backward(train[0])
            objective.close()
        else:
            from lors_convert.heal.blocks import local_backward

            losses[precision] = local_backward(
                model, teacher, stack_members(teacher), train[0], precision == "bf16"
            )
        grads[precision] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.03 * abs(losses["fp32"])
    assert torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.98
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights


def test_the_kl_step_runs_the_teachers_body_once_per_batch_and_matches_the_uncached_step():
    teacher, student, train, _ = _setup()
    calls = []
    teacher.model.register_forward_hook(lambda *_: calls.append(1))  # the body, under the output head
    grads = {}
    for cached in (False, True):
        model = copy.deepcopy(student)
        objective = GlobalObjective(model, teacher, "kl", [], train[0], False)
        calls.clear()
        for _ in range(3):  # three passes over the same two batches
            for key in (0, 1):
                model.zero_grad(set_to_none=True)
                objective.backward(train[key], key if cached else None)
        objective.close()
        assert len(calls) == (2 if cached else 6)
        grads[cached] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)  # same arithmetic, kept


def test_the_teacher_cache_keeps_results_only_within_its_byte_limit():
    cache, runs = TeacherCache(limit=3 * 4 * 10), []

    def compute(n):
        return lambda: runs.append(n) or [torch.zeros(10)]  # 40 bytes each

    for key in (0, 1, 2, 3, 0, 3, None, None):
        cache.get(key, compute(key))
    assert sorted(cache.kept) == [0, 1, 2] and cache.used == 120
    assert runs == [0, 1, 2, 3, 3, None, None]  # batch 3 did not fit; None is never kept


def test_an_interrupted_heal_resumes_to_the_uninterrupted_result(tmp_path):
    teacher, student, train, held = _setup()
    settings = HealSettings(steps=10, lr=2e-3, loss="kl", local_share=0.3, eval_every=3, save_every=4)

    def score(model):
        ref = Reference(teacher, held)
        return lambda: fidelity_score(fidelity(model, ref))

    whole = copy.deepcopy(student)
    expected = heal(whole, teacher, train, settings, evaluate=score(whole))

    class Stop(Exception):
        pass

    def interrupt(step, steps, loss):
        if step == 7:  # after the phase change, between two saves
            raise Stop

    state = tmp_path / "heal.pt"
    cut = copy.deepcopy(student)
    with pytest.raises(Stop):
        heal(cut, teacher, train, settings, evaluate=score(cut), checkpoint_path=state, progress=interrupt)
    resumed = copy.deepcopy(student)  # a new process rebuilds the unhealed model; the state restores it
    result = heal(resumed, teacher, train, settings, evaluate=score(resumed), checkpoint_path=state)
    assert result.resumed_from == 7 and result.steps == 10 and result.local_steps == expected.local_steps
    assert [h["loss"] for h in result.history] == pytest.approx(
        [h["loss"] for h in expected.history], rel=1e-5
    )
    assert result.best_step == expected.best_step and result.tokens == expected.tokens == 10 * 64
    assert [e["step"] for e in result.evaluations] == [e["step"] for e in expected.evaluations]
    for n, p in _params(whole).items():
        assert torch.allclose(p, _params(resumed)[n], atol=1e-6), n


def test_heal_never_returns_a_model_worse_than_its_start():
    """When every trained state scores below the start, the start comes back bit for bit; otherwise the
    best-scoring state does, and its held-out score is the best measured."""
    teacher, student, train, held = _setup()
    start = _params(student)
    drift = lambda: -sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in student.named_parameters())  # noqa: E731
    result = heal(student, teacher, train, steps=6, lr=1e-2, loss="kl", evaluate=drift, eval_every=2)
    assert [e["step"] for e in result.evaluations] == [0, 2, 4, 6] and result.best_step == 0
    assert all(torch.equal(p, start[n]) for n, p in _params(student).items())

    ref = Reference(teacher, held)
    evaluate = lambda: fidelity_score(fidelity(student, ref))  # noqa: E731
    result = heal(
        student, teacher, train, steps=6, lr=0.3, loss="kl", warmup=1, evaluate=evaluate, eval_every=2
    )
    scores = [e["score"] for e in result.evaluations]
    best = max(range(len(scores)), key=scores.__getitem__)
    assert result.best_step == result.evaluations[best]["step"]
    assert evaluate() == pytest.approx(scores[best]) and scores[best] >= scores[0]


def test_a_token_limit_ends_the_run_and_counts_the_tokens():
    teacher, student, train, _ = _setup()
    result = heal(student, teacher, train, HealSettings(steps=0, tokens=5 * 64, lr=1e-3, loss="kl"))
    assert result.steps == 5 and result.tokens == 5 * 64
    with pytest.raises(Exception, match="needs a limit"):
        heal(student, teacher, train, HealSettings(steps=0, lr=1e-3))


@pytest.mark.parametrize("which", ["lors", "all"])
def test_trainable_names_which_parameters_heal_changes(which):
    """``lors``: the LORS modules' parameters only (not the blocks' norms, not the embeddings or the
    head); ``all``: every parameter."""
    teacher, student, train, _ = _setup()
    start = _params(student)
    heal(student, teacher, train, steps=2, lr=1e-2, loss="kl", warmup=1, trainable=which)
    changed = {n for n, p in _params(student).items() if not torch.equal(p, start[n])}
    in_blocks = {n for n in start if n.startswith("model.layers.")}
    norms = {n for n in in_blocks if "norm" in n}
    assert norms and in_blocks - norms
    assert changed == (in_blocks - norms if which == "lors" else set(start))
