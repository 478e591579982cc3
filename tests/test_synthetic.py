"""Synthetic token inputs for healing (lors_convert.synthetic) and heal(synthetic=...)."""

from __future__ import annotations

import copy

import pytest
import torch

from lors_convert import convert
from lors_convert.calibrate.fidelity import fidelity, reference_outputs
from lors_convert.errors import LorsUsageError
from lors_convert.heal import heal, synthetic
from lors_convert.heal.synthetic import BigramChain
from tests.models import bert

CLS, SEP = 1, 2  # inside the tiny BERT's 100-id vocabulary


def token_batch(rows: list[list[int]], pad: int = 0) -> dict:
    """BERT-style padded batch: ``[CLS] row [SEP]`` per row."""
    width = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        framed = [CLS, *r, SEP]
        ids[i, : len(framed)] = torch.tensor(framed)
        mask[i, : len(framed)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def random_rows(n: int, seed: int, low: int = 10, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(low, high, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_framing_tokens_mask_and_other_keys_stay():
    template = token_batch([[5, 6, 7], [8, 9], [5, 6, 7, 8, 9]])
    chain = BigramChain.fit([template])
    assert (chain.head, chain.tail) == (CLS, SEP)
    out = chain.batch(template, seed=0, index=3)
    mask = template["attention_mask"].bool()
    assert torch.equal(out["attention_mask"], template["attention_mask"])
    assert torch.equal(out["token_type_ids"], template["token_type_ids"])
    assert torch.equal(out["input_ids"][~mask], template["input_ids"][~mask])  # padding untouched
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        row = out["input_ids"][i, :n].tolist()
        assert row[0] == CLS and row[-1] == SEP
        assert all(5 <= t <= 9 for t in row[1:-1])  # jumps stay within the span of the inner ids seen
    assert not torch.equal(out["input_ids"], chain.batch(template, seed=0, index=4)["input_ids"])


def test_batches_are_a_pure_function_of_seed_and_index():
    batches = [token_batch(random_rows(6, s)) for s in range(3)]
    chain = BigramChain.fit(batches)
    a = chain.batch(batches[1], seed=7, index=11)["input_ids"]
    assert torch.equal(a, BigramChain.fit(batches).batch(batches[1], seed=7, index=11)["input_ids"])
    assert not torch.equal(a, chain.batch(batches[1], seed=7, index=12)["input_ids"])
    assert not torch.equal(a, chain.batch(batches[1], seed=8, index=11)["input_ids"])


def test_walk_follows_the_calibration_bigrams(monkeypatch):
    rows = random_rows(20, 0)
    chain = BigramChain.fit([token_batch(rows)])
    seen = {(a, b) for r in rows for a, b in zip(r, r[1:], strict=False)}
    monkeypatch.setattr(synthetic, "JUMP", 0.0)
    import random

    walk = chain.walk(200, random.Random(0))
    for a, b in zip(walk, walk[1:], strict=False):
        assert (a, b) in seen or a not in chain.successors  # a jump only where the chain has no successor


def test_rows_without_common_framing_are_redrawn_whole():
    rows = [[11, 12, 13], [14, 15], [16, 11, 12]]  # GPT-2 style: no shared first or last id
    width = 3
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    chain = BigramChain.fit([{"input_ids": ids, "attention_mask": mask}])
    assert chain.head is None and chain.tail is None
    assert sorted(chain.tokens) == sorted(t for r in rows for t in r)


@pytest.mark.parametrize(
    "batches, why",
    [
        ([], "token batches"),
        ([torch.randn(4, 8)], "token batches"),
        ([{"input_ids": torch.randn(2, 3), "attention_mask": torch.ones(2, 3)}], "token batches"),
        (
            [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3)}],
            "at least one real",
        ),
        ([token_batch([[], []])], "besides the framing"),
    ],
)
def test_unusable_inputs_are_refused(batches, why):
    with pytest.raises(LorsUsageError, match=why):
        BigramChain.fit(batches)


def _bert_pair():
    teacher = bert().eval()
    student, _ = convert(copy.deepcopy(teacher), rank=1)
    calib = [token_batch(random_rows(8, s, 10, 30)) for s in range(3)]  # a narrow vocabulary
    held = [token_batch(random_rows(8, 100 + s, 30, 100)) for s in range(2)]  # mostly other ids
    return teacher, student, calib, held


def test_synthetic_heal_improves_fidelity_and_refuses_bad_shares():
    teacher, student, calib, held = _bert_pair()
    ref = reference_outputs(teacher, held)
    before = fidelity(student, ref)["heldout_rel_error"]
    heal(student, teacher, calib, steps=40, lr=3e-3, synthetic=1.0)
    assert fidelity(student, ref)["heldout_rel_error"] < 0.8 * before
    for bad in (-0.1, 1.5):
        with pytest.raises(LorsUsageError, match="synthetic must be"):
            heal(student, teacher, calib, steps=1, synthetic=bad)
    with pytest.raises(LorsUsageError, match="token batches"):
        heal(student, teacher, [torch.zeros(2, 5, dtype=torch.long)], steps=1, synthetic=0.5)


def test_synthetic_heal_resumes_to_the_uninterrupted_result(tmp_path):
    teacher, student_a, calib, _ = _bert_pair()
    original = copy.deepcopy(student_a)
    heal(student_a, teacher, calib, steps=8, lr=1e-3, synthetic=0.5)

    class Stop(Exception):
        pass

    def interrupt(step, steps, loss):
        if step == 5:
            raise Stop

    state = tmp_path / "heal.pt"
    with pytest.raises(Stop):
        heal(
            copy.deepcopy(original),
            teacher,
            calib,
            steps=8,
            lr=1e-3,
            synthetic=0.5,
            checkpoint_path=state,
            progress=interrupt,
        )
    resumed = copy.deepcopy(original)
    with pytest.raises(LorsUsageError, match=r"different command \(synthetic 0.5 -> 0.75\).*--force"):
        heal(copy.deepcopy(original), teacher, calib, steps=8, lr=1e-3, synthetic=0.75, checkpoint_path=state)
    result = heal(resumed, teacher, calib, steps=8, lr=1e-3, synthetic=0.5, checkpoint_path=state)
    assert result.resumed_from == 5
    for (n, a), (_, b) in zip(student_a.named_parameters(), resumed.named_parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_share_of_steps_on_synthetic_inputs(share):
    """The teacher sees calibration batches on 1 - share of the steps, synthetic ones on the rest."""
    teacher, student, calib, _ = _bert_pair()
    seen = []
    hook = teacher.embeddings.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    try:
        heal(student, teacher, calib, steps=40, lr=1e-4, synthetic=share, cache_teacher=False)
    finally:
        hook.remove()
    real = sum(any(torch.equal(ids, b["input_ids"]) for b in calib) for ids in seen)
    assert len(seen) == 40
    if share in (0.0, 1.0):
        assert real == round(40 * (1 - share))
    else:
        assert 10 <= real <= 30


def test_default_share_depends_on_the_inputs():
    """Token batches get 0.75 synthetic steps by default, other inputs none."""
    teacher, student, calib, _ = _bert_pair()
    assert heal(student, teacher, calib, steps=1, lr=1e-4).synthetic == 0.75
    assert heal(student, teacher, calib, steps=1, lr=1e-4, synthetic=0.0).synthetic == 0.0
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    lors_mlp, _ = convert(copy.deepcopy(mlp), rank=1, require_savings=False)
    assert heal(lors_mlp, mlp, [torch.randn(3, 4)], steps=1, lr=1e-4).synthetic == 0.0
