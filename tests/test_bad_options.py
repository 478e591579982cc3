"""Bad options: flags, values and combinations that are wrong are usage errors (exit 2).

Ranks, groups, budgets, devices, presets, calibration and heal settings, selections that match
nothing, unknown options and missing arguments, for ``convert``, ``report``, ``merge`` and ``heal``.
Each is answered with one line that names the option, before anything is written (see
tests/badcase.py); the inputs stay byte-identical.
"""

from __future__ import annotations

import pytest

from tests.badcase import (
    ARCH,
    TEXT,
    Case,
    calib_conv,
    case_ids,
    check_case,
    conv,
    copy_in,
    good_tensors,
    grouped,
    heal_args,
    make_file,
    weights,
)

# selections and ranks that fit no matrix of the model
SELECTIONS = grouped(
    "usage",
    [
        Case("include_matches_nothing", conv("--include", "*nothing*"), 2, ("*nothing*", "matches no")),
        Case("exclude_everything", conv("--exclude", "*"), 2, ("no stacked parameter",)),
        Case("rank_zero", conv("--rank", "0"), 2, ("--rank", "positive"), names=None),
        Case("rank_negative", conv("--rank", "-3"), 2, ("--rank", "-3"), names=None),
        Case("rank_not_a_number", conv("--rank", "eight"), 2, ("--rank", "eight"), names=None),
        Case("groups_wrong_length", conv("--groups", "1,2"), 2, ("groups has 2 entries", "4 layers")),
        Case("groups_zero", conv("--groups", "1,0,1,1"), 2, ("--groups",), names=None),
    ],
)

USAGE = grouped(
    "usage",
    [
        Case("rank_empty", conv("--rank", ""), 2, ("--rank",), names=None),
        Case("rank_fraction", conv("--rank", "1.5"), 2, ("--rank", "1.5"), names=None),
        Case("rank_full_suffix", conv("--rank", "full8"), 2, ("--rank", "full8"), names=None),
        Case("rank_hex", conv("--rank", "0x10"), 2, ("--rank", "0x10"), names=None),
        Case("groups_letters", conv("--groups", "a,b"), 2, ("--groups", "a,b"), names=None),
        Case("groups_negative", conv("--groups", "-1"), 2, ("--groups",), names=None),
        Case("groups_empty_items", conv("--groups", ",,"), 2, ("--groups",), names=None),
        Case("device_unknown", conv("--device", "tpu"), 2, ("--device", "tpu"), names=None),
        Case("svd_unknown", conv("--svd", "magic"), 2, ("magic",), names=None),
        Case("init_unknown", conv("--init", "random"), 2, ("random",), names=None),
        Case("preset_unknown", conv("--preset", "other"), 2, ("--preset", "other"), names=None),
        Case("refine_negative", conv("--refine", "-1"), 2, ("--refine",), names=None),
        Case("refine_not_int", conv("--refine", "two"), 2, ("--refine",), names=None),
        Case("budget_zero", conv("--budget", "0"), 2, ("budget",), names=None),
        Case("budget_negative", conv("--budget", "-0.5"), 2, ("budget",), names=None),
        Case("budget_not_a_number", conv("--budget", "half"), 2, ("--budget",), names=None),
        Case("budget_with_groups", conv("--budget", "0.5", "--groups", "2"), 2, ("groups",), names=None),
        Case(
            "sharing_unknown",
            conv("--budget", "0.5", "--sharing", "sometimes"),
            2,
            ("--sharing",),
            names=None,
        ),
        Case("sharing_without_budget", conv("--sharing", "never"), 2, ("--sharing", "--budget"), names=None),
        Case(
            "objective_without_calibrate",
            conv("--objective", "layer"),
            2,
            ("--objective", "--calibrate"),
            names=None,
        ),
        Case("objective_unknown", calib_conv("--objective", "sideways"), 2, ("--objective",), names=None),
        Case("probes_zero", calib_conv("--probes", "0"), 2, ("--probes",), names=None),
        Case("probes_without_calibrate", conv("--probes", "2"), 2, ("--probes", "--calibrate"), names=None),
        Case(
            "probes_with_layer_objective",
            calib_conv("--objective", "layer", "--probes", "2"),
            2,
            ("--probes",),
            names=None,
        ),
        Case(
            "heldout_text_without_a_tokenizer",
            lambda t: [*conv()(t), "--heldout", make_file(t, "held.txt", TEXT.encode())],
            2,
            ("text held-out inputs need a Hugging Face text model",),
            names=None,
        ),
        Case(
            "heldout_fraction_without_calibrate",
            conv("--heldout-fraction", "0.2"),
            2,
            ("--heldout-fraction",),
            names=None,
        ),
        Case("heldout_fraction_one", calib_conv("--heldout-fraction", "1"), 2, ("[0, 1)",), names=None),
        Case(
            "heldout_fraction_negative", calib_conv("--heldout-fraction", "-0.2"), 2, ("[0, 1)",), names=None
        ),
        Case(
            "heldout_fraction_zero_alone",
            calib_conv("--heldout-fraction", "0"),
            2,
            ("holds nothing back",),
            names=None,
        ),
        Case(
            "heldout_fraction_with_heldout",
            lambda t: [
                *calib_conv("--heldout-fraction", "0.3")(t),
                "--heldout",
                good_tensors(t, "held.safetensors"),
            ],
            2,
            ("replaces the split",),
            names=None,
        ),
        Case(
            "adaptive_bad_spec",
            conv("--adaptive", "blocks.*.up: 2 x [3y4]"),
            2,
            ("generator layout", "3y4"),
            names=None,
        ),
        Case("arch_without_colon", conv("--arch", "tests.models.stacked_mlp"), 2, ("--arch",), names=None),
        Case(
            "arch_missing_attribute",
            conv("--arch", "tests.models:no_such_fn"),
            2,
            ("no_such_fn",),
            names=None,
        ),
        Case("unknown_option", conv("--bogus"), 2, ("--bogus",), names=None),
        Case("extra_argument", lambda t: [*conv()(t), "extra"], 2, ("extra",), names=None),
        Case("convert_without_source", lambda t: ["convert"], 2, ("Missing argument",), names=None),
        Case(
            "report_ranks_letters",
            lambda t: ["report", weights(t), "--arch", ARCH, "--ranks", "4,x"],
            2,
            ("--ranks",),
            names=None,
        ),
        Case(
            "report_ranks_zero",
            lambda t: ["report", weights(t), "--arch", ARCH, "--ranks", "0"],
            2,
            ("--ranks",),
            names=None,
        ),
        Case(
            "report_plot_of_a_checkpoint",
            lambda t: ["report", copy_in(t, "mlp.lors"), "--plot", t / "p.png"],
            2,
            ("--plot",),
            names=None,
        ),
        Case("merge_without_path", lambda t: ["merge"], 2, ("Missing argument",), names=None, out="merged"),
        Case("heal_steps_zero", heal_args("--steps", "0"), 2, ("--steps",), names=None),
        Case("heal_lr_zero", heal_args("--lr", "0"), 2, ("--lr",), names=None),
        Case("heal_lr_negative", heal_args("--lr", "-1e-3"), 2, ("--lr",), names=None),
        Case("heal_match_unknown", heal_args("--match", "blocks"), 2, ("--match", "blocks"), names=None),
        Case("heal_loss_unknown", heal_args("--loss", "l1", "--steps", "2"), 2, ("loss", "l1"), names=None),
        Case(
            "heal_train_unknown",
            heal_args("--train", "some", "--steps", "2"),
            2,
            ("trainable", "some"),
            names=None,
        ),
        Case("heal_synthetic_above_one", heal_args("--synthetic", "2"), 2, ("--synthetic",), names=None),
        Case("heal_synthetic_negative", heal_args("--synthetic", "-0.5"), 2, ("--synthetic",), names=None),
        Case("heal_without_data", heal_args(data=False), 2, ("--data",), names=None),
        Case(
            "heal_without_arch",
            lambda t: ["heal", copy_in(t, "mlp.lors"), "--data", good_tensors(t)],
            2,
            ("--arch",),
        ),
        Case(
            "heal_heldout_fraction_zero_alone",
            heal_args("--heldout-fraction", "0"),
            2,
            ("holds nothing back",),
            names=None,
        ),
    ],
)

OPTIONS = SELECTIONS + USAGE


@pytest.mark.parametrize("case", OPTIONS, ids=case_ids(OPTIONS))
def test_bad_option(case: Case, tmp_path):
    check_case(case, tmp_path)
