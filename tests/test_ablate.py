"""ablate.py: bad input refused before any training, the variants grid, every variant's scoring checked
first, and a run that trains, scores, plots and does not retrain."""

import json

import pytest

import ablate
import cli
import distributed

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ ablate.py
def test_ablate_refuses_bad_input():
    with pytest.raises(cli.UserError, match="KEY=V1,V2"):
        ablate.make_variants(ablate.parse_args(["--vary", "block"])[0])
    with pytest.raises(cli.UserError, match="--cfg-scale"):
        ablate.parse_cfg_scales("1,nan")
    with pytest.raises(cli.UserError, match="--seeds"):
        ablate.make_variants(ablate.parse_args(["--vary", "block=adaLN", "--seeds", "a"])[0])
    with pytest.raises(cli.UserError, match="--max-steps is set by ablate.py"):
        ablate.parse_args(["--vary", "block=adaLN", "--max-steps", "5"])
    with pytest.raises(cli.UserError, match="variant block=adaLN-zero, seed=0: argument --block: invalid choice"):
        ablate.main(["--vary", "block=adaLN-zero"])


def test_ablate_variants_make_a_grid():
    args, extra = ablate.parse_args(["--vary", "block=adaLN,mm-dit", "--vary", "grad-checkpointing=on,off",
                                     "--seeds", "0,1", "--lr", "1e-3"])
    variants = ablate.make_variants(args)
    assert len(variants) == 8 and len({v.folder for v in variants}) == 8
    assert variants[0].name == "block=adaLN, grad-checkpointing=on, seed=0"
    assert variants[1].flags == ["--block", "adaLN"]  # a store_true switch left off
    argv = ablate.train_argv(args, extra, variants[0])
    assert argv[argv.index("--lr", argv.index("--lr") + 1) + 1] == "1e-3"  # the user's flag wins over the demo's
    assert argv[-2:] == ["--global-seed", "0"]


@pytest.mark.parametrize("argv,words", [
    (["--vary", "objective=eps,flow"], ["variant objective=flow, seed=0, scoring", "--sampler dpm-solver needs",
                                        "use heun"]),
    (["--vary", "lr=1e-3", "--sampler", "euler"], ["variant lr=1e-3, seed=0, scoring", "--sampler euler needs"]),
    (["--vary", "lr=1e-3", "--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
])
def test_ablate_checks_every_variants_scoring_before_any_training(tmp_path, monkeypatch, argv, words):
    monkeypatch.setattr(ablate, "train_variant", lambda *a: pytest.fail("trained before checking"))
    monkeypatch.setattr(distributed, "visible_cuda_devices", lambda: 0)  # a CPU machine, also on a GPU one
    with pytest.raises(cli.UserError) as e:
        ablate.main([*argv, "--steps", "2", "--out", str(tmp_path / "out")])
    for text in words:
        assert text in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_ablate_sampler_names_are_argparse_choices_and_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        ablate.parse_args(["--vary", "lr=1e-3", "--sampler", "bogus"])
    assert "argument --sampler: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "(default: 2000)" in out and "(default: dpm-solver)" in out and "(default: 25)" in out


class StubScorer:
    """Stands in for the digit classifier (fitting it takes ~10 s; tests/test_digits.py checks it)."""
    calls = 0

    def score(self, images, labels):
        StubScorer.calls += 1
        return {"accuracy": float(images.mean() / 255), "frechet_distance": float(len(labels))}


@pytest.mark.slow
def test_ablate_trains_scores_plots_and_does_not_retrain(pixels, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "lazy_scorer", lambda: StubScorer)
    out = tmp_path / "ablation"
    argv = ["--vary", "block=adaLN-Zero,in-context", "--steps", 4, "--evals", 2, "--nproc", 1, "--out", out,
            "--data-path", pixels, "--num-classes", 3, "--global-batch-size", 8, "--per-class", 2,
            "--num-sampling-steps", 2, "--log-every", 1]
    results = ablate.main(argv)
    assert [r["name"] for r in results] == ["block=adaLN-Zero, seed=0", "block=in-context, seed=0"]
    for r in results:  # guidance 1 and 4 (the default), at both checkpoints
        assert {cfg: sorted(steps) for cfg, steps in r["scores"].items()} == {1.0: [2, 4], 4.0: [2, 4]}
        assert len(r["loss"]) == 4 and r["gflops"] > 0 and r["params"] > 0
    table = (out / "ablation.md").read_text()
    assert table.count("| block=") == 2 and "Command: `python ablate.py --vary block=adaLN-Zero,in-context" in table
    assert "| accuracy, guidance 1 | Frechet distance, guidance 1 | accuracy, guidance 4 |" in table
    assert (out / "ablation.png").stat().st_size > 10_000
    assert len(json.loads((out / "ablation.json").read_text())) == 2
    calls, written = StubScorer.calls, {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/*.pt")}
    assert calls == 8 and len(written) == 4
    again = ablate.main(argv)  # all done: nothing trained or scored again
    assert StubScorer.calls == calls
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoints/*.pt")} == written
    assert [r["scores"] for r in again] == [r["scores"] for r in results]
    with pytest.raises(cli.UserError, match="trained with other flags"):
        ablate.main(argv + ["--lr", "1e-3"])
