"""The everyday command line: help with defaults, suggestions for misspelt options,
one-line errors for wrong choices, --version, experiment headline tables, and
``capsnet predict`` on image files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from capsnet.cli import build_parser, main
from training_helpers import make_mnist, synthetic_digits, tiny_config


def _parsers(parser, path=("capsnet",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_has_help_and_shows_its_default(capsys):
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # each subcommand has its own help line
            assert action.help is not None, f"{' '.join(path)} {action.option_strings}"
    with pytest.raises(SystemExit):
        main(["experiment", "attack", "--help"])
    out = capsys.readouterr().out
    assert "(default: 1000)" in out and "{cross_entropy,model}" in out
    assert "(default: both)" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "{adam,adamw,sgd}" in capsys.readouterr().out


def test_every_command_prints_its_help():
    # argparse %-formats help strings only when they are shown: a bare "95 % intervals"
    # in a subcommand's one-line help crashed `capsnet experiment --help`.
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert text.startswith("usage: " + " ".join(path)), path


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["train", "--epcohs", "3"], "unknown option --epcohs; did you mean --epochs?"),
        (["evaluate", "RUN", "--batchsize", "8"], "did you mean --batch-size?"),
        (["experiment", "attack", "RUN", "--epsilosn", "0.1"], "did you mean --epsilons?"),
    ],
)
def test_misspelt_option_gets_a_suggestion(argv, hint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert hint in err and "usage:" not in err


def test_wrong_choice_is_one_short_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "attack", "RUN", "--which", "bst"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "usage:" not in "\n".join(err)
    assert "invalid choice: 'bst'" in err[0] and "'best', 'last'" in err[0]
    assert "did you mean 'best'?" in err[0]


def test_version(capsys):
    from capsnet import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"capsnet {__version__} (torch {torch.__version__}")


def test_model_kwarg_strict_bool_and_type_errors(capsys):
    assert main(["train", "--dry-run", "--model-kwarg", "reconstruction=no"]) == 0
    assert json.loads(capsys.readouterr().out)["model_kwargs"] == {"reconstruction": False}
    assert main(["train", "--dry-run", "--model-kwarg", "reconstruction=perhaps"]) == 2
    assert "model_kwargs.reconstruction must be a boolean" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--model-kwarg", "conv_channels=wide"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv_channels: 'capsnet' expects int, got 'wide'" in err
    with pytest.raises(SystemExit):
        main(["train", "--dry-run", "--num-threads", "100000"])
    assert "must be in 1..1024" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from capsnet.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("predict")
        root = make_mnist(tmp / "data", n_train=32, n_test=16)
        run = train(tiny_config(root, tmp / "run", epochs=1)).run_dir
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture
def pngs(tmp_path):
    from PIL import Image

    images, _ = synthetic_digits(3, seed=7)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    Image.fromarray(images[1]).resize((56, 56)).save(folder / "b.png")  # resized to 28x28
    Image.fromarray(np.stack([images[2]] * 3, axis=-1)).save(folder / "c.png")  # RGB -> L
    return folder


def test_predict_text_and_json(tiny_run, pngs, capsys):
    assert main(["predict", str(tiny_run), str(pngs / "a.png"), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{pngs / 'a.png'}: ") and len(line.split(": ")[1].split()) == 4
    assert main(["predict", str(tiny_run), str(pngs), "--json", "--top-k", "3"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == [str(pngs / n) for n in ("a.png", "b.png", "c.png")]
    for r in rows:
        assert len(r["top"]) == 3 and r["prediction"] == r["top"][0]["class"]
        assert r["top"][0]["class"] in [str(d) for d in range(10)]
        scores = [t["score"] for t in r["top"]]
        assert scores == sorted(scores, reverse=True)


def test_predict_matches_the_model_on_the_dataset_pipeline(tiny_run, pngs):
    """A PNG of a test image gets the same scores as the image through the dataset."""
    from PIL import Image

    from capsnet.predict import predict_files
    from capsnet.runs import load_run

    run = load_run(tiny_run, device="cpu")
    ds = run.dataset()
    Image.fromarray(ds.images[0, 0].numpy()).save(pngs / "test0.png")
    [result] = predict_files(run, [pngs / "test0.png"], top_k=10)
    with torch.no_grad():
        expected = run.model(ds[0][0].unsqueeze(0)).scores[0]
    got = torch.zeros(10)
    for t in result["top"]:
        got[t["index"]] = t["score"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_predict_errors_are_one_line(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(tiny_run), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.png: cannot decode image" in err
    assert main(["predict", str(tiny_run), str(tmp_path / "missing.png")]) == 1
    assert "no such image file or folder" in capsys.readouterr().err


def test_predict_rejects_a_grayscale_image_for_an_rgb_model(tiny_run, pngs):
    from capsnet.data.transforms import Identity
    from capsnet.predict import Preprocessing, load_images

    prep = Preprocessing(3, (28, 28), Identity(), ["x"], "model")
    with pytest.raises(ValueError, match="grayscale image, but the run's model takes 3"):
        load_images([pngs / "a.png"], prep)
    assert load_images([pngs / "c.png"], prep).shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="2-channel images"):
        load_images([pngs / "a.png"], Preprocessing(2, (28, 28), Identity(), ["x"], "model"))


def test_class_names_and_preprocessing_from_checkpoint_metadata(tiny_run, pngs, tmp_path):
    """With ``class_names`` and ``preprocessing`` in the weights' metadata (what the
    trainer should store), predict needs neither the dataset nor evaluation.json."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from capsnet.data import from_arrays
    from capsnet.predict import predict_files, preprocessing_metadata

    run_dir = tmp_path / "moved"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "evaluation.json").unlink()
    weights = run_dir / "best.safetensors"
    with safe_open(str(weights), "pt") as fh:
        meta = dict(fh.metadata())
    config = json.loads(meta["config"])
    config["data_root"] = str(tmp_path / "nowhere")  # the dataset is gone
    meta["config"] = json.dumps(config)
    names = [f"class-{i}" for i in range(10)]
    ds = from_arrays(np.zeros((1, 28, 28), np.uint8), [0], classes=names, augment="none")
    meta.update(preprocessing_metadata(ds))
    save_file(load_file(weights), weights, metadata=meta)
    [result] = predict_files(run_dir, [pngs / "a.png"], which="best", device="cpu")
    assert result["prediction"].startswith("class-")


def test_experiment_prints_its_headline_table(tiny_run, capsys):
    flags = ["--epsilons", "0,0.1", "--methods", "fgsm", "--targeted", "no"]
    flags += ["--max-examples", "8", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    assert main(["experiment", "attack", str(tiny_run), *flags]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if "eps=0.1" in line)
    assert "attack" in out[header] and "model" in out[header]
    assert out[header + 1].split()[:2] == ["capsnet", "fgsm"]
