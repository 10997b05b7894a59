"""The command line: `key=value` overrides anywhere on the line (before or after any --option), unknown
options still refused, and Ctrl-C during `prepare` says how to resume."""

from __future__ import annotations

import pytest

from scaleseg.cli import main, parse_args


@pytest.mark.parametrize(
    "argv,attr,expected",
    [
        # README: scaleseg eval configs/my.yaml --checkpoint my.pth eval.mode=slide eval.crop_size=512 eval.stride=341
        (["eval", "configs/my.yaml", "--checkpoint", "my.pth", "eval.mode=slide", "eval.crop_size=512", "eval.stride=341"],
         "overrides", ["eval.mode=slide", "eval.crop_size=512", "eval.stride=341"]),
        # README: scaleseg predict work_dirs/default/best.pth images/ --out preds/ eval.mode=slide
        (["predict", "best.pth", "images/", "--out", "preds/", "eval.mode=slide"], "overrides", ["eval.mode=slide"]),
        # before, between and after options
        (["predict", "best.pth", "images/", "a.b=1", "--out", "preds/", "c.d=2", "--workers", "0", "e.f=3"],
         "overrides", ["a.b=1", "c.d=2", "e.f=3"]),
        (["train", "cfg.yaml", "--work-dir", "w", "train.iters=2", "--resume"], "args", ["cfg.yaml", "train.iters=2"]),
        (["train", "--work-dir", "w", "cfg.yaml", "train.iters=2"], "args", ["cfg.yaml", "train.iters=2"]),
        (["train", "train.iters=2", "--work-dir", "w", "cfg.yaml"], "args", ["train.iters=2", "cfg.yaml"]),
        # --resume takes an optional checkpoint: an override after it is still an override
        (["train", "cfg.yaml", "--resume", "train.iters=4", "a.b=1"], "args", ["cfg.yaml", "train.iters=4", "a.b=1"]),
        (["check-data", "cfg.yaml", "--splits", "val", "data.root=/x"], "args", ["cfg.yaml", "data.root=/x"]),
        (["export", "best.pth", "--format", "onnx", "eval.mode=whole"], "overrides", ["eval.mode=whole"]),
        (["analyze", "work", "--out", "o", "train.device=cpu", "--images", "2"], "overrides", ["train.device=cpu"]),
    ],
)
def test_overrides_are_accepted_anywhere(argv, attr, expected):
    assert getattr(parse_args(argv), attr) == expected


def test_resume_keeps_its_checkpoint_or_none():
    assert parse_args(["train", "cfg.yaml", "--resume", "train.iters=4"]).resume == ""  # the work dir's last
    assert parse_args(["train", "cfg.yaml", "--resume", "runs/a/iter_000004.pth", "x.y=1"]).resume == "runs/a/iter_000004.pth"
    assert parse_args(["train", "cfg.yaml"]).resume is None


def test_option_values_containing_equals_stay_option_values():
    args = parse_args(["predict", "m.pth", "in", "--out", "a=b", "x.y=1"])
    assert args.out == "a=b" and args.overrides == ["x.y=1"]
    args = parse_args(["bench", "memory", "--set", "model.head.embedding.search_budget_mb=4", "--out", "o"])
    assert args.set == ["model.head.embedding.search_budget_mb=4"]


def test_unknown_options_and_stray_words_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["eval", "work", "--checkpoint", "m.pth", "--no-such-option"])
    assert e.value.code == 2 and "--no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["bench", "memory", "--out", "o", "model.backbone=resnet50"])  # bench takes --set, not overrides
    assert "model.backbone=resnet50" in capsys.readouterr().err
    # a second positional that is not an override is the command's own error, with its fix
    assert main(["export", "m.pth", "--format", "onnx", "other.pth"]) == 2
    assert "unexpected argument 'other.pth'" in capsys.readouterr().err


def test_ctrl_c_during_prepare_says_to_run_it_again(monkeypatch, capsys, tmp_path):
    from scaleseg.data.prepare import cityscapes

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cityscapes, "run", interrupted)
    assert main(["prepare", "cityscapes", "--root", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err
    assert "run the same `scaleseg prepare cityscapes` command again" in err


def test_a_command_with_overrides_after_its_options_runs(capsys):
    # before: "unrecognized arguments: data.num_classes=10 ..." and exit status 2
    assert main(["check-data", "--splits", "val", "data.num_classes=10", "data.synthetic.val_length=2",
                 "data.synthetic.image_size=32", "--no-progress", "data.num_workers=0", "data.train_pipeline.crop_size=32"]) == 0
    assert "synthetic val: 2 samples, 2 read cleanly, 0 problems" in capsys.readouterr().out
