"""Bounded-memory calibration: Grams spilled to disk in their eigenbasis, the output-gradient pass in
chunks, and fidelity against the source's recorded outputs instead of a second model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from lors_convert import convert
from lors_convert.calibrate import sensitivity
from lors_convert.calibrate.fidelity import Reference, fidelity, reference_outputs
from lors_convert.calibrate.grams import collect_grams, gram_owners
from lors_convert.calibrate.spilled import SpilledGrams
from lors_convert.calibrate.streamed import lockstep
from lors_convert.io.spill import Spill
from tests.models import LinStack, tiny_bert, tiny_llama, token_batches


def test_spilled_grams_equal_the_in_memory_ones_and_share_one_file(tmp_path):
    model = tiny_llama()
    batches = token_batches(61)
    memory = collect_grams(model, batches, probes=2)
    spill = Spill(near=tmp_path)
    disk = collect_grams(model, batches, probes=2, spill=spill)
    assert isinstance(disk.grams, SpilledGrams) and isinstance(disk.out_grams, SpilledGrams)
    assert set(disk.grams) == set(memory.grams) and set(disk.out_grams) == set(memory.out_grams)
    for mine, theirs in ((disk.grams, memory.grams), (disk.out_grams, memory.out_grams)):
        for key, C in theirs.items():
            rel = float(torch.linalg.matrix_norm(mine[key] - C) / torch.linalg.matrix_norm(C))
            assert rel < 1e-6, (key, rel)  # float32 accumulation and storage
    # q/k/v see one input, gate/up another: 3 input layers x 4 distinct Grams (q, o, gate, down)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert disk.grams.load(q) is disk.grams.load(k)  # one stored Gram, read once while in use
    inputs = sum(1 for p in spill.path.iterdir() if "-input_" in p.name)
    assert inputs == 3 * 4
    assert spill.path.parent == tmp_path
    spill.close()
    assert not spill.path.exists()


def test_a_small_memory_budget_collects_the_same_grams_in_more_passes(tmp_path, monkeypatch):
    """With accumulators for about one layer at a time (a model that fills most of the machine), the
    input and output Grams are collected in several passes, each group spilled as its pass ends, and
    equal those of one pass bit for bit (the same batches, the same probes)."""
    import lors_convert.calibrate.grams as grams_module

    model = tiny_llama()
    batches = token_batches(61)
    runs = []
    real_run = grams_module.run_model
    monkeypatch.setattr(grams_module, "run_model", lambda m, b: runs.append(1) or real_run(m, b))
    one = collect_grams(model, batches, probes=2, spill=Spill(near=tmp_path))
    one_pass = len(runs)
    assert one_pass == len(batches)
    per_layer = grams_module.accumulator_budget(model) // 40  # the model is under a third of free memory
    monkeypatch.setattr(grams_module, "accumulator_budget", lambda m: per_layer)
    runs.clear()
    many = collect_grams(model, batches, probes=2, spill=Spill(near=tmp_path))
    assert len(runs) >= 3 * len(batches)  # several input passes
    assert many.counts == one.counts and many.samples == one.samples and many.skipped == one.skipped
    for mine, theirs in ((many.grams, one.grams), (many.out_grams, one.out_grams)):
        assert set(mine) == set(theirs)
        for key in theirs:
            assert torch.equal(mine.load(key), theirs.load(key)), key


@pytest.mark.parametrize("objective", ["output", "layer"])
def test_conversion_with_spilled_grams_matches_the_in_memory_one(tmp_path, objective, monkeypatch):
    import lors_convert.calibrate.spilled as spilled_module

    factored = []  # every Cholesky factorization of a spilled Gram, by the Gram's side and trace
    real = spilled_module.gram_cholesky
    monkeypatch.setattr(
        spilled_module,
        "gram_cholesky",
        lambda C, damp: factored.append((C.shape[0], float(C.diagonal().sum()), damp)) or real(C, damp),
    )
    source = tiny_llama()
    batches = token_batches(61)
    results = []
    for spill in (None, Spill(near=tmp_path)):
        model = copy.deepcopy(source)
        calibration = collect_grams(model, batches, probes=2, spill=spill, objective=objective)
        _, report = convert(model, calibration=calibration, budget=0.6)
        results.append((report.to_dict()["stacks"], fidelity(model, Reference(source, batches))))
    # a spilled Gram is factored once, however often the budget, the fits and the refits read it
    assert factored and len(factored) == len(set(factored))
    (stacks_mem, q_mem), (stacks_disk, q_disk) = results
    ranks = [[m.get("ranks") for m in s["matrices"]] for s in stacks_mem]
    assert ranks == [[m.get("ranks") for m in s["matrices"]] for s in stacks_disk]
    assert q_disk["heldout_kl"] == pytest.approx(q_mem["heldout_kl"], rel=1e-3)
    assert q_disk["heldout_rel_error"] == pytest.approx(q_mem["heldout_rel_error"], rel=1e-3)


def test_output_grams_do_not_depend_on_the_chunk_size(monkeypatch):
    model = tiny_llama()
    batches = token_batches(61)
    owners = gram_owners(model)
    # a probe that does not depend on how the batch was cut: all ones on real tokens
    monkeypatch.setattr(
        sensitivity,
        "_probe",
        lambda y, mask, g: torch.ones_like(y) * (1.0 if mask is None else mask.to(y.dtype).unsqueeze(-1)),
    )
    whole = {}
    for chunk in (10_000, 12, 1):  # whole batches, one sample of 12 tokens, one sample each
        monkeypatch.setattr(sensitivity, "chunk_positions", lambda owners, n=chunk: n)
        grams = sensitivity.collect_output_grams(model, owners, batches, probes=1)
        if not whole:
            whole = grams
            continue
        for key, G in whole.items():
            assert torch.allclose(grams[key], G, rtol=1e-4, atol=1e-6 * float(G.abs().max())), key


@pytest.mark.parametrize("make, vocab", [(tiny_llama, 61), (tiny_bert, 50)])
def test_recorded_reference_gives_the_same_fidelity_as_a_source_copy(tmp_path, make, vocab):
    source = make()
    batches = token_batches(vocab)
    spill = Spill(near=tmp_path)
    recorded = reference_outputs(source, batches, spill=spill)
    assert recorded.source is None and len(spill) == len(batches)
    copied = reference_outputs(source, batches)
    with torch.no_grad():  # a perturbed model stands in for a converted one
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    q_rec, q_copy = fidelity(source, recorded), fidelity(source, copied)
    assert q_rec.keys() == q_copy.keys()
    for key, value in q_copy.items():
        assert q_rec[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    spill.close()


def test_output_grams_in_groups_equal_one_pass():
    model = tiny_llama()
    batches = token_batches(61)
    owners = gram_owners(model)
    whole = sensitivity.collect_output_grams(model, owners, batches, probes=2, seed=3)
    parts: list[dict] = []
    per_layer = 4 * sum(
        m.out_features**2 for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)
    )
    left = sensitivity.collect_output_grams(
        model,
        owners,
        batches,
        probes=2,
        seed=3,
        max_bytes=per_layer,
        finished=lambda grams: parts.append(dict(grams)),
    )
    assert left == {} and len(parts) == 3  # one group per layer
    grouped = {k: g for part in parts for k, g in part.items()}
    assert grouped.keys() == whole.keys()
    for key, G in whole.items():
        assert torch.allclose(grouped[key], G, rtol=1e-5, atol=1e-7 * float(G.abs().max())), key
    with pytest.raises(ValueError, match="finished"):
        sensitivity.collect_output_grams(model, owners, batches, probes=2, max_bytes=per_layer)


def test_fidelity_in_pieces_equals_whole_batches(monkeypatch, tmp_path):
    from lors_convert.calibrate import fidelity as fidelity_module

    source = tiny_llama()
    batches = token_batches(61)
    converted = copy.deepcopy(source)
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.02 * torch.randn_like(p))
    whole = fidelity(converted, Reference(source, batches))
    monkeypatch.setattr(fidelity_module, "PIECE_POSITIONS", 12)  # one sample of 12 tokens per piece
    spill = Spill(near=tmp_path)
    recorded = reference_outputs(source, batches, spill=spill)
    assert len(spill) == 4 * len(batches)
    for q in (fidelity(converted, Reference(source, batches)), fidelity(converted, recorded)):
        for key, value in whole.items():
            assert q[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    spill.close()


def test_own_memory_keeps_values_and_ties():
    from lors_convert.io.memory import own_memory

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {k: v.untyped_storage().data_ptr() for k, v in model.state_dict().items()}
    own_memory(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(after[k].untyped_storage().data_ptr() != p for k, p in storages.items())  # copies
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("n", [5, 511, 512, 700, 1536])
def test_blocked_gram_equals_the_full_product_and_stores_what_it_says(n):
    from lors_convert.calibrate.accumulate import UpperBlocks, add_gram, completed, stored_bytes

    g = torch.Generator().manual_seed(n)
    rows = [torch.randn(37, n, generator=g, dtype=torch.float64) for _ in range(3)]
    acc = None
    for r in rows:
        acc = add_gram(acc, r)
    held = sum(t.numel() for t in acc.rows) if isinstance(acc, UpperBlocks) else acc.numel()
    assert held * 8 == stored_bytes(n, 8)
    assert (held < n * n) == (n >= 512)  # the upper block triangle only, from 2 blocks on (1536: 58%)
    other = add_gram(None, rows[0])
    summed = other.clone()
    summed += add_gram(None, rows[1])  # how the input Grams add a batch's Gram to a key's sum
    expected = sum(r.T @ r for r in rows)
    assert torch.allclose(completed(acc), expected, rtol=1e-12, atol=1e-10)
    assert torch.allclose(
        completed(summed), rows[0].T @ rows[0] + rows[1].T @ rows[1], rtol=1e-12, atol=1e-10
    )
    assert torch.allclose(
        completed(other), rows[0].T @ rows[0], rtol=1e-12, atol=1e-10
    )  # clone left it alone


def test_streamed_skeleton_runs_like_the_loaded_model():
    from lors_convert.calibrate.streamed import blocks_of
    from lors_convert.io.memory import empty_model

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    state = model.state_dict()
    skeleton = empty_model(lambda: type(model)(model.config))
    blocks = blocks_of(skeleton)
    assert blocks == [f"model.layers.{i}" for i in range(3)]
    reads: list[str] = []
    seen: list[tuple] = []  # what each block saw while it ran

    def get(key):
        reads.append(key)
        return state[key]

    def look(mod, args, out):
        layers = skeleton.model.layers
        seen.append(
            (
                skeleton.lm_head.weight is skeleton.model.embed_tokens.weight,  # read once, still tied
                not skeleton.lm_head.weight.is_meta,
                [not any(p.is_meta for p in layer.parameters()) for layer in layers],
            )
        )

    hooks = [skeleton.get_submodule(b).register_forward_hook(look) for b in blocks]
    batch = token_batches(61)[0]
    outputs = dict(lockstep(skeleton, get, [batch]))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert torch.equal(outputs[0].logits, model(**batch).logits)
    # while block i ran it alone of the blocks was read
    assert seen == [(True, True, [j == i for j in range(3)]) for i in range(3)]
    assert all(p.is_meta for p in skeleton.parameters())  # a skeleton again
    assert reads.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in reads


def test_streamed_fidelity_of_a_checkpoint_equals_the_in_memory_one(tmp_path):
    from lors_convert.checkpoint.merge import merged_getter
    from lors_convert.checkpoint.reader import Checkpoint
    from lors_convert.checkpoint.writer import save
    from lors_convert.io.memory import empty_model

    source = tiny_llama()
    batches = token_batches(61)
    converted, report = convert(copy.deepcopy(source), rank=4)
    save(converted, tmp_path / "ck.lors", report=report)
    expected = fidelity(converted, Reference(source, batches))
    skeleton = empty_model(lambda: type(source)(source.config))
    state = source.state_dict()
    spill = Spill(near=tmp_path)
    # the CLI's way: every block read once for all pieces, the source's outputs recorded on disk
    reference = reference_outputs(
        skeleton, batches, spill=spill, run=functools.partial(lockstep, skeleton, state.__getitem__)
    )
    q = fidelity(
        skeleton,
        reference,
        run=functools.partial(lockstep, skeleton, merged_getter(Checkpoint(tmp_path / "ck.lors"))),
    )
    spill.close()
    for key, value in expected.items():
        assert q[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value), (
            key
        )


def _skeleton_and_reads(model):
    from lors_convert.io.memory import empty_model

    skeleton = empty_model(lambda: type(model)(model.config))
    state = model.state_dict()
    reads: list[str] = []

    def get(key):
        reads.append(key)
        return state[key]

    return skeleton, get, reads


def test_lockstep_reads_every_block_once_and_gives_each_batch_its_own_output():
    model = tiny_llama().eval()
    skeleton, get, reads = _skeleton_and_reads(model)
    batches = token_batches(61, n=4)
    assert len(batches) > 2
    outputs = dict(lockstep(skeleton, get, batches))
    assert sorted(outputs) == list(range(len(batches)))
    with torch.no_grad():
        for i, batch in enumerate(batches):
            assert torch.equal(outputs[i].logits, model(**batch).logits), i
    block_keys = [k for k in model.state_dict() if k.startswith("model.layers.")]
    assert sorted(k for k in reads if k.startswith("model.layers.")) == sorted(block_keys)  # once each
    assert all(p.is_meta for p in skeleton.parameters())  # a skeleton again
    assert skeleton.config.use_cache == model.config.use_cache
    assert not any(m._forward_pre_hooks for m in skeleton.modules())


def test_lockstep_stopped_early_or_failing_leaves_a_skeleton():
    from lors_convert.errors import LorsError

    model = tiny_llama().eval()
    skeleton, get, _ = _skeleton_and_reads(model)
    batches = token_batches(61, n=4)
    run = lockstep(skeleton, get, batches)
    next(run)
    run.close()  # the consumer stopped: the waiting batches are unwound
    assert all(p.is_meta for p in skeleton.parameters())
    bad = dict(batches[1], input_ids=batches[1]["input_ids"] + 10_000)  # beyond the vocabulary
    with pytest.raises(LorsError, match="cannot run on these inputs"):
        list(lockstep(skeleton, get, [batches[0], bad, batches[2]]))
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(m._forward_pre_hooks for m in skeleton.modules())


def test_a_spill_removes_the_one_a_killed_process_left(tmp_path):
    import socket
    import subprocess
    import sys

    from lors_convert.io.spill import PREFIX

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(child.stdout)  # a pid whose process has exited
    host = socket.gethostname()
    orphan = tmp_path / f"{PREFIX}{dead}@{host}.abc"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "0-input.safetensors").write_bytes(b"x" * 100)
    alive = tmp_path / f"{PREFIX}1@{host}.def"  # pid 1 always exists
    alive.mkdir()
    elsewhere = tmp_path / f"{PREFIX}{dead}@not-{host}.ghi"  # another machine's, on a shared filesystem
    elsewhere.mkdir()
    other = tmp_path / "keep.lors"
    other.mkdir()
    spill = Spill(near=tmp_path)
    assert not orphan.exists() and alive.exists() and other.exists() and spill.path.exists()
    assert elsewhere.exists()
    spill.close()


@pytest.mark.parametrize("spilled", [False, True])
def test_wide_layers_collect_exact_grams_through_upper_blocks(tmp_path, spilled):
    """Layers 520 wide (two blocks and more): input and output Grams through the blocked accumulators,
    in memory and spilled; an overflowing input is a one-line error."""
    from lors_convert.errors import LorsError

    torch.manual_seed(0)
    model = LinStack(n=3, d=520)
    x = torch.randn(8, 4, 520)
    spill = Spill(near=tmp_path) if spilled else None
    cal = collect_grams(model, list(x.split(4)), objective="output", probes=2, spill=spill)
    X = x.reshape(-1, 520).double()
    C = cal["blocks.0.lin.weight"]
    assert torch.allclose(C.double(), X.T @ X / 32, rtol=1e-4, atol=1e-4)
    G = cal.out_grams["blocks.2.lin.weight"]  # the output itself: E[u u^T] summed over 4 rows
    assert torch.allclose(G.double(), G.double().T) and float(G.diagonal().mean()) == pytest.approx(
        4.0, rel=0.1
    )
    with pytest.raises(LorsError, match="not finite"):
        collect_grams(model, [torch.full((2, 4, 520), 3e30)], objective="layer", spill=spill)
    if spill is not None:
        spill.close()
