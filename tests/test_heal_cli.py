"""``lors heal`` end to end on a tiny causal LM: data-free by default, tokens and time in the report,
the generated text cached beside the output, the conversion's warning not repeated as heal's."""

from __future__ import annotations

import json

import pytest
from clirun import run_ok, runner
from heal_tiny import llama_dir

from lors_convert.calibrate.generated import CHUNK
from lors_convert.cli import app
from lors_convert.heal.data import heldout_windows


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    work = tmp_path_factory.mktemp("heal-cli")
    src = llama_dir(work / "src")
    run_ok("convert", src, "--rank", "2", "-o", work / "c.lors", "-q")
    return work / "c.lors"


def _heal(ckpt, out, *flags):
    res = run_ok("heal", ckpt, "-o", out, "--seq-len", "16", "--batch-tokens", "32", "--json", *flags)
    return json.loads(res.stdout)["quality"], res


def test_heal_of_a_causal_lm_needs_no_data(converted, tmp_path):
    q, res = _heal(converted, tmp_path / "h.lors", "--steps", "6", "--generated-tokens", "512")
    assert q["heal_steps"] == 6 and q["heal_tokens"] == 6 * 32  # two 16-token windows a step
    held = heldout_windows(16)
    assert held == CHUNK // 2  # 1,024 tokens would be 64 windows: half a chunk at most
    n = (CHUNK - held) * 16  # whole chunks of 16-token sequences, the last ones held out
    assert q["heal_data"] == [f"{n} tokens written by the source model (seed 0)"] and q["heal_loss"] == "kl"
    assert q["heal_synthetic"] == 0.0
    assert [e["step"] for e in q["heal_evaluations"]] == [0, 1, 2, 3, 4, 5, 6]  # --eval-every steps/10
    assert all("ppl_ratio" in e for e in q["heal_evaluations"])
    assert q["before_heal_heldout_probe"] == q["heldout_probe"] and "ppl_ratio" in json.dumps(q)
    converted_q = json.loads((converted / "report.json").read_text())["quality"]
    assert converted_q["heldout_probe"] == q["heldout_probe"]  # so heal reuses the "before" figures
    cached = sorted(tmp_path.glob(".lors-generated-*.json"))
    assert len(cached) == 1  # the training text and, after it, the held-out windows
    rows = json.loads(cached[0].read_text())["sequences"]
    assert len(rows) == CHUNK  # one whole chunk: 32 windows to train on, 32 held out
    assert not any(w.startswith("poor fidelity on") for w in json.loads(res.stdout)["warnings"])
    assert not (tmp_path / ".h.lors.heal-state.pt").exists()


def test_heal_resumes_the_same_command_after_an_interruption(converted, tmp_path, monkeypatch):
    from lors_convert.heal import train

    flags = ("--steps", "4", "--generated-tokens", "256", "--eval-every", "2")
    whole, _ = _heal(converted, tmp_path / "a.lors", *flags)
    real = train._Run.one_step

    def stop_at_3(self):
        if self.p.step == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(train._Run, "one_step", stop_at_3)
    res = runner.invoke(
        app,
        [
            "heal",
            str(converted),
            "-o",
            str(tmp_path / "b.lors"),
            "--seq-len",
            "16",
            "--batch-tokens",
            "32",
            "--json",
            *flags,
        ],
    )
    assert res.exit_code != 0 and (tmp_path / ".b.lors.heal-state.pt").is_file()
    monkeypatch.setattr(train._Run, "one_step", real)
    again, _ = _heal(converted, tmp_path / "b.lors", *flags)
    assert again["heal_final_loss"] == pytest.approx(whole["heal_final_loss"], rel=1e-5)
    assert again["heldout_kl"] == pytest.approx(whole["heldout_kl"], rel=1e-5)


def test_token_and_time_limits(converted, tmp_path):
    q, _ = _heal(converted, tmp_path / "t.lors", "--tokens", "96", "--generated-tokens", "256")
    assert q["heal_tokens"] == 96 and q["heal_steps"] == 3
    q, _ = _heal(converted, tmp_path / "m.lors", "--minutes", "0.0001", "--generated-tokens", "256")
    assert q["heal_steps"] == 0  # the time was up before the first step: the model is as it was
    assert q["heldout_kl"] == pytest.approx(q["before_heal_heldout_kl"], rel=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--no-generate"], "--no-generate needs --data"),
        (["--precision", "fp8"], "precision must be one of"),
        (["--local-share", "2"], "local_share must be in"),
    ],
)
def test_heal_usage_errors(converted, tmp_path, flags, message):
    res = runner.invoke(app, ["heal", str(converted), "-o", str(tmp_path / "x.lors"), "--steps", "1", *flags])
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_the_heal_commands_data_defaults_are_the_librarys():
    """The CLI spells its defaults out (it imports the heal modules only when it runs): they must stay
    those of :class:`DataRequest`, which ``heal_checkpoint`` callers get."""
    import inspect

    from lors_convert.cli.checkpoints import heal
    from lors_convert.heal.data import DataRequest

    cli = inspect.signature(heal).parameters
    lib = DataRequest()
    assert cli["seq_len"].default == lib.seq_len == 64
    assert cli["batch_tokens"].default == lib.batch_tokens
    assert cli["generated"].default == lib.generated_tokens
    assert cli["seed"].default == lib.seed
