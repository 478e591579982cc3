"""The savings report: its sums, its JSON round trip, its rich rendering (file text shown literally)
and what it says about ranks clamped to min(d, h)."""

from __future__ import annotations

import io
import json
import math
import shutil

from lors_convert import Report, convert
from lors_convert.cli.render import render
from tests.badcase import ARCH, run, write_weights
from tests.models import CASES


def test_report_numbers_json_round_trip_and_rendering():
    model, report = convert(CASES["gpt2"].build(), rank=8, groups=[1, 1, 2, 2])
    [stack] = report.stacks
    assert stack.path == "transformer.h" and len(stack.members) == 4
    for m in stack.matrices:
        d, h = m.shape[0], math.prod(m.shape[1:])
        assert m.matrix == [d, h] and m.ranks == [min(8 * k, d, h) for k in (1, 1, 2, 2)]
        assert m.dense_params == 4 * d * h and m.lors_params == d * h + sum(m.ranks) * (d + h)
        assert math.isclose(m.savings, 1 - m.lors_params / m.dense_params)
        assert len(m.relative_error) == len(m.retained_energy) == 4
    assert stack.dense_params == sum(m.dense_params for m in stack.matrices)
    assert report.params_before - report.params_after == stack.dense_params - stack.lors_params > 0

    data = json.loads(json.dumps(report.to_dict()))
    assert Report.from_dict(data).to_dict() == report.to_dict()
    assert data["total"]["params_after"] == report.params_after

    from rich.console import Console

    buf = io.StringIO()
    render(report, console=Console(file=buf, width=200))
    text = buf.getvalue()
    assert "transformer.h" in text and "attn.c_attn.weight" in text and "8 x 1,1,2,2" in text


def test_rank_above_min_dim_is_clamped_with_a_warning(tmp_path):
    src = write_weights(tmp_path / "w.safetensors")
    out = tmp_path / "out.lors"
    res = run("convert", src, "--arch", ARCH, "--rank", "40", "--keep-unsaving", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert any("min(d, h) = 32" in w and "clamped" in w for w in report["warnings"])
    for m in report["stacks"][0]["matrices"]:
        assert m["clamped"] is True and m["ranks"] == [32] * 4
    shown = json.loads(run("report", out, "--json").stdout)
    assert shown["warnings"] == report["warnings"]
    human = run("report", out)
    assert human.exit_code == 0 and "clamped" in human.stderr
    config = json.loads((out / "lors_config.json").read_text())
    assert all(p["clamped"] for s in config["stacks"] for p in s["params"])


def test_report_text_is_not_rich_markup(small_ckpt, tmp_path):
    """Names and warnings come from files: shown literally, never parsed as rich markup."""
    ckpt = shutil.copytree(small_ckpt, tmp_path / "c.lors")
    report = json.loads((ckpt / "report.json").read_text())
    report["warnings"] = ["odd [/] text [bold]"]
    report["stacks"][0]["kept_dense"] = {"x[/]": "why [red]"}
    (ckpt / "report.json").write_text(json.dumps(report))
    res = run("report", ckpt)
    assert res.exit_code == 0, res.output
    assert "odd [/] text [bold]" in res.stderr


def test_json_totals_equal_the_rendered_table():
    """report.json's stacked totals are the table's "stacked total" row: the matrices kept dense
    count on both sides, at their dense size."""
    from rich.console import Console

    from lors_convert.cli.render import fmt_params

    _, report = convert(CASES["gpt2"].build(), rank=16)  # 32x32 c_proj saves nothing at rank 16
    [stack] = report.stacks
    assert stack.kept_dense_params == {"attn.c_proj.weight": 4 * 32 * 32}
    total = json.loads(json.dumps(report.to_dict()))["total"]
    converted_dense = sum(m.dense_params for m in stack.matrices)
    converted_lors = sum(m.lors_params for m in stack.matrices)
    assert total["kept_dense_params"] == 4 * 32 * 32
    assert total["stacked_dense_params"] == converted_dense + 4 * 32 * 32
    assert total["stacked_lors_params"] == converted_lors + 4 * 32 * 32
    assert total["stacked_fraction"] == total["stacked_lors_params"] / total["stacked_dense_params"]
    assert total["params_before"] - total["params_after"] == converted_dense - converted_lors

    buf = io.StringIO()
    render(report, console=Console(file=buf, width=200))
    [row] = [line for line in buf.getvalue().splitlines() if "stacked total" in line]
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    assert cells[3:6] == [
        fmt_params(total["stacked_dense_params"]),
        fmt_params(total["stacked_lors_params"]),
        f"{100 * (1 - total['stacked_fraction']):.1f}%",
    ]
    assert fmt_params(converted_dense) != cells[3]  # the kept-dense matrix changes the figure shown
