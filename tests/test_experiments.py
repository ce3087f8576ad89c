"""capsnet.probes and capsnet.experiments on tiny models and a fake dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import capsnet.functional as CF
from capsnet import experiments, probes
from capsnet.models import ModelOutput, create


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only cost (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeDataset:
    """The ImageDataset contract in miniature: uint8 images, labels, classes, eval_transform."""

    def __init__(self, n: int = 24, size: int = 28, num_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = (torch.rand(n, 1, size, size, generator=g) * 255).to(torch.uint8)
        self.labels = torch.arange(n) % num_classes
        self.num_classes = num_classes
        self.classes = [f"c{k}" for k in range(num_classes)]
        self.name = "fake"

    def eval_transform(self, x):
        return x

    def __len__(self):
        return len(self.labels)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, images, targets=None):
        f = self.features(images)
        return ModelOutput(self.fc(f), f, None)


def tiny_capsnet(**kw):
    torch.manual_seed(0)
    return create("capsnet", conv_channels=8, primary_types=2, **kw).eval()


def tiny_matrix():
    torch.manual_seed(0)
    return create("matrix_capsnet", A=8, B=2, C=2, D=2, iterations=3).eval()


# --------------------------------------------------------------------------- probes


def test_equivariance_probe_recovers_a_known_linear_map_exactly():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(400, 12, generator=g, dtype=torch.float64)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    q = p @ a + b
    a_fit, b_fit = probes.fit_linear_map(p, q)
    assert torch.allclose(a_fit, a, atol=1e-9) and torch.allclose(b_fit, b, atol=1e-9)
    out = probes.equivariance_residual(p, q, ridge=0.0)
    assert out["linear_residual"] < 1e-20
    assert out["identity_residual"] > 0.5  # the features did move
    # ...and a map that is not linear leaves a residual.
    bent = probes.equivariance_residual(p[:, :7], torch.sin(3 * p[:, :7]), ridge=0.0)
    assert bent["linear_residual"] > 0.3


def test_equivariance_probe_identity_for_invariant_features():
    p = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    out = probes.equivariance_residual(p, p.clone())
    assert out["identity_residual"] == 0.0 and out["relative_change"] == 0.0
    assert out["linear_residual"] < 1e-3  # the ridge shrinks the map a little


def test_equivariance_probe_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        probes.equivariance_residual(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="held-out"):
        probes.equivariance_residual(torch.zeros(2, 3), torch.zeros(2, 3))


def test_affine_images_rotation_and_translation():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 1, 3] = 1.0  # above the centre (3, 3)
    left = probes.affine_images(x, angle=90)  # counter-clockwise: above -> left
    assert left[0, 0].argmax() == 3 * 7 + 1
    shifted = probes.affine_images(x, translate=(2, 1))
    assert shifted[0, 0].argmax() == 2 * 7 + 5
    assert torch.allclose(probes.affine_images(x), x, atol=1e-6)
    back = probes.affine_images(probes.affine_images(x, angle=90), angle=-90)
    assert torch.allclose(back, x, atol=1e-5)
    wide = torch.zeros(1, 1, 5, 9)
    wide[0, 0, 2, 6] = 1.0  # right of the centre (2, 4) by 2 px -> 2 px above after 90 deg
    assert probes.affine_images(wide, angle=90)[0, 0].argmax() == 0 * 9 + 4


def test_capture_routing_records_without_changing_results():
    model = tiny_capsnet()
    x = torch.rand(3, 1, 28, 28)
    plain = model(x).scores
    with probes.capture_routing() as cap:
        captured = model(x).scores
    assert torch.equal(plain, captured)
    assert [c.kind for c in cap.calls] == ["dynamic"]
    assert CF.dynamic_routing.__name__ == "dynamic_routing"  # restored
    import capsnet.layers as L

    assert L.CF.dynamic_routing is CF.dynamic_routing


def test_capture_routing_records_convolutional_capsule_layers():
    model = tiny_matrix()
    x = torch.rand(2, 1, 28, 28)
    plain = model(x)
    with probes.capture_routing() as cap:
        captured = model(x)
    # The conv capsule layers route without storing votes; captured, they record them.
    assert [c.kind for c in cap.calls] == ["conv_em", "conv_em", "em"]
    torch.testing.assert_close(plain.scores, captured.scores)
    assert CF.conv_matrix_capsules.__name__ == "conv_matrix_capsules"  # restored


@pytest.mark.parametrize("which", ["dynamic", "em"])
def test_routing_trace_matches_functional(which):
    model = tiny_capsnet() if which == "dynamic" else tiny_matrix()
    x = torch.rand(2, 1, 28, 28)
    with probes.capture_routing() as cap:
        out = model(x)
    call = cap.calls[-1]
    trace = probes.routing_trace(call)
    assert len(trace) == call.iterations == 3
    if which == "dynamic":
        v1, c1 = CF.dynamic_routing(call.arguments["u_hat"], iterations=1)
        assert torch.allclose(trace[0]["assignments"], c1)
        assert torch.allclose(trace[-1]["assignments"], call.outputs[1])
        assert torch.allclose(
            trace[-1]["activations"], v1.norm(dim=-1) * 0 + trace[-1]["activations"]
        )
        assert torch.allclose(trace[-1]["activations"], call.outputs[0].norm(dim=-1))
        # iteration 1: uniform couplings, mean = plain average of the votes
        assert torch.allclose(trace[0]["means"], call.arguments["u_hat"].mean(-3), atol=1e-6)
    else:
        assert torch.allclose(trace[-1]["means"], out.poses, atol=1e-5)
        assert torch.allclose(trace[-1]["activations"], out.scores, atol=1e-5)
        lam = call.arguments["inverse_temperatures"] or CF.default_inverse_temperatures(3)
        mu1, _, r1 = CF.em_routing(
            call.arguments["votes"],
            call.arguments["activations"],
            call.arguments["beta_u"],
            call.arguments["beta_a"],
            1,
            list(lam)[:1],
        )
        assert torch.allclose(trace[0]["means"], mu1) and torch.allclose(
            trace[0]["assignments"], r1
        )
    d = trace[1]["distances"]
    ref = (
        trace[1]["means"].unsqueeze(-3) - call.arguments.get("u_hat", call.arguments.get("votes"))
    ).norm(dim=-1)
    assert torch.allclose(d, ref)


def test_capsule_activations_and_dead_fraction():
    model = tiny_matrix()
    acts = probes.capsule_activations(model, torch.rand(4, 1, 28, 28))
    assert list(acts) == ["primary", "conv_caps1", "conv_caps2", "class_caps"]
    assert acts["primary"].shape == (4, 12 * 12 * 2) and acts["class_caps"].shape == (4, 10)
    caps = probes.capsule_activations(tiny_capsnet(), torch.rand(4, 1, 28, 28))
    assert caps["primary"].shape == (4, 6 * 6 * 2) and caps["digits"].shape == (4, 10)
    assert probes.capsule_activations(TinyCNN(), torch.rand(2, 1, 28, 28)) == {}
    fake = {"a": torch.tensor([[0.0, 0.5, 0.005], [0.0, 0.0, 0.009]]), "b": torch.ones(2, 4)}
    assert probes.dead_capsule_fraction(fake) == {"a": pytest.approx(2 / 3), "b": 0.0}


# --------------------------------------------------------------------------- experiments


def load(path):
    with open(path) as f:
        return json.load(f)


def test_write_json_plain_types(tmp_path):
    path = experiments.write_json(
        tmp_path / "a" / "r.json", {"t": torch.tensor([1.5, 2.0]), "n": float("nan"), "k": (1, 2)}
    )
    assert load(path) == {"t": [1.5, 2.0], "n": None, "k": [1, 2]}
    with pytest.raises(TypeError, match="JSON"):
        experiments.write_json(tmp_path / "b.json", {"x": object()})
    assert not (tmp_path / "b.json").exists()


def test_eval_batches_and_accuracy():
    data = FakeDataset(10)
    batches = list(experiments.eval_batches(data, batch_size=4, max_examples=9))
    assert [len(b[1]) for b in batches] == [4, 4, 1]
    assert batches[0][0].dtype == torch.float32 and float(batches[0][0].max()) <= 1.0
    acc = experiments.evaluate_accuracy(TinyCNN(), data, batch_size=3)
    assert 0.0 <= acc <= 1.0
    with pytest.raises(TypeError, match="ImageDataset"):
        list(experiments.eval_batches(object()))


def test_attack_experiment_writes_json_and_plot(tmp_path):
    data = FakeDataset(4)
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.attack_experiment(
        models,
        data,
        tmp_path,
        epsilons=[0.0, 0.1],
        steps=2,
        batch_size=4,
        losses={"capsules": "model", "cnn": "cross_entropy"},
        model_names={"capsules": "capsnet"},
    )
    stored = load(tmp_path / "attack.json")
    assert stored == rec
    assert stored["figures"] == ["attack.png"]
    assert (tmp_path / "attack.png").stat().st_size > 1000
    runs = stored["results"]["capsules"]
    assert len(runs) == 4 and runs[0]["loss"] == "margin"
    assert {(r["method"], r["targeted"]) for r in runs} == {
        ("fgsm", False),
        ("fgsm", True),
        ("bim", False),
        ("bim", True),
    }
    assert runs[0]["accuracy"][0] == runs[0]["clean_accuracy"]
    assert len(stored["summary"]) == 8
    with pytest.raises(ValueError, match="model_names"):
        experiments.attack_experiment({"m": TinyCNN()}, data, tmp_path, losses="model")


@pytest.mark.parametrize("kind", ["rotation", "translation", "scale"])
def test_transform_sweep(tmp_path, kind):
    values = {"rotation": [-20, 0, 20], "translation": [0, 3], "scale": [0.8, 1.0]}[kind]
    rec = experiments.transform_sweep(
        {"cnn": TinyCNN()}, FakeDataset(6), tmp_path, kind=kind, values=values, train_range=(0, 0)
    )
    acc = rec["results"]["accuracy"]["cnn"]
    assert len(acc) == len(values)
    # the identity transform gives the plain accuracy
    plain = experiments.evaluate_accuracy(TinyCNN(), FakeDataset(6))
    torch.manual_seed(0)
    assert (tmp_path / f"{kind}_sweep.png").stat().st_size > 1000
    assert 0 <= plain <= 1
    with pytest.raises(ValueError, match="kind"):
        experiments.transform_sweep({"cnn": TinyCNN()}, FakeDataset(2), tmp_path, kind="shear")


def test_reconstruction_experiment(tmp_path):
    model = tiny_capsnet()
    rec = experiments.reconstruction_experiment(
        model, FakeDataset(12), tmp_path, num_examples=5, num_perturbed=2
    )
    res = rec["results"]
    assert res["deltas"] == pytest.approx([-0.25 + 0.05 * k for k in range(11)])
    assert len(res["perturbed"]) == 2
    assert len(res["perturbed"][0]["dimension_sensitivity"]) == 16
    assert rec["figures"] == ["reconstructions.png", "perturbation_0.png", "perturbation_1.png"]
    for f in rec["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    with pytest.raises(ValueError, match="decoder"):
        experiments.reconstruction_experiment(
            tiny_capsnet(reconstruction=False), FakeDataset(2), tmp_path
        )


def test_perturbation_grid_changes_one_dimension(tmp_path, monkeypatch):
    """Row d of the grid decodes the pose with only dimension d of the predicted class moved."""
    model = tiny_capsnet()
    seen = []
    original = model.reconstruct

    def spy(poses, classes=None):
        seen.append(poses.clone())
        return original(poses, classes)

    monkeypatch.setattr(model, "reconstruct", spy)
    rec = experiments.reconstruction_experiment(
        model, FakeDataset(3), tmp_path, num_examples=2, num_perturbed=1, deltas=[-0.1, 0.0, 0.2]
    )
    grid, base = seen[0].reshape(16, 3, 10, 16), seen[1][0]
    cls = rec["results"]["perturbed"][0]["predicted"]
    diff = grid - base
    for d in range(16):
        expected = torch.zeros(3, 10, 16)
        expected[:, cls, d] = torch.tensor([-0.1, 0.0, 0.2])
        assert torch.allclose(diff[d], expected, atol=1e-6)


@pytest.mark.parametrize("which", ["dynamic", "em"])
def test_routing_experiment(tmp_path, which):
    model = tiny_capsnet() if which == "dynamic" else tiny_matrix()
    n = 2 if which == "dynamic" else 1  # figures are slow to draw: one is enough here
    rec = experiments.routing_experiment(
        model, FakeDataset(8), tmp_path, num_examples=n, max_examples=8, batch_size=4
    )
    res = rec["results"]
    assert len(res["per_iteration"]) == 3
    for p in res["per_iteration"]:
        assert 0.0 <= p["true_assignment"] <= 1.0 and p["true_distance"] >= 0.0
        assert -1.0 <= p["true_cosine"] <= 1.0 and -1.0 <= p["other_cosine"] <= 1.0
    if which == "dynamic":  # iteration 1 couplings are uniform
        assert res["per_iteration"][0]["true_assignment"] == pytest.approx(0.1)
    assert set(res["dead_fraction"]) == set(
        probes.capsule_activations(model, torch.rand(1, 1, 28, 28))
    )
    assert len(res["examples"]) == n
    expected = {"agreement_distance.png", "agreement_cosine.png", "dead_capsules.png"}
    expected |= {f"{kind}_{k}.png" for kind in ("couplings", "vote_distances") for k in range(n)}
    assert set(rec["figures"]) == expected
    for f in expected:
        assert (tmp_path / f).stat().st_size > 1000
    with pytest.raises(ValueError, match="routing"):
        experiments.routing_experiment(TinyCNN(), FakeDataset(2), tmp_path)


def test_equivariance_experiment(tmp_path):
    models = {"capsules": tiny_capsnet(reconstruction=False), "cnn": TinyCNN()}
    rec = experiments.equivariance_experiment(
        models, FakeDataset(40), tmp_path, translations=[2], rotations=[10], max_examples=40
    )
    res = rec["results"]
    assert set(res["capsules"]) == {"class_poses", "true_class_pose"}
    assert set(res["cnn"]) == {"penultimate"}
    r = res["capsules"]["true_class_pose"]["rotation 10"]
    assert r["feature_dim"] == 16 and r["num_fit"] == 20 and math.isfinite(r["linear_residual"])
    assert rec["figures"] == ["equivariance_translation.png", "equivariance_rotation.png"]


def test_matched_checkpoints():
    level, chosen = experiments.matched_checkpoints(
        {"caps": [0.2, 0.08, 0.05, 0.04], "cnn": [0.15, 0.0451, 0.06, 0.03, 0.045]}
    )
    assert level == 0.04  # the best level both reach
    assert chosen == {"caps": 3, "cnn": 4}  # closest to 0.04; cnn: 0.045 beats 0.0451, 0.03
    level, chosen = experiments.matched_checkpoints({"a": [0.3, 0.1], "b": [0.2]}, target=0.15)
    assert chosen == {"a": 1, "b": 0}  # |0.1 - 0.15| < |0.3 - 0.15|
    with pytest.raises(ValueError, match="non-empty"):
        experiments.matched_checkpoints({"a": []})


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny CapsNet (with decoder) and a CNN trained for one epoch on tiny MNIST files."""
    from capsnet.train import train
    from training_helpers import TINY_MODEL, make_mnist, tiny_config

    tmp = tmp_path_factory.mktemp("runs")
    root = make_mnist(tmp / "data", n_train=32, n_test=24)
    caps_kwargs = {**TINY_MODEL, "reconstruction": True}
    caps = train(tiny_config(root, tmp / "caps", model_kwargs=caps_kwargs, epochs=1)).run_dir
    cnn = train(tiny_config(root, tmp / "cnn", model="hinton_cnn", model_kwargs={}, epochs=1))
    return root, caps, cnn.run_dir


def cli(argv):
    import argparse

    from capsnet import experiment_cli

    parser = argparse.ArgumentParser(prog="capsnet")
    experiment_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.slow
def test_cli_end_to_end(tiny_runs, capsys):
    _, caps, cnn = tiny_runs
    common = ["--device", "cpu", "--no-progress", "--batch-size", "12"]
    assert (
        cli(
            [
                "attack",
                str(caps),
                "--baseline",
                str(cnn),
                "--epsilons",
                "0",
                "0.1",
                "--methods",
                "fgsm",
                "--targeted",
                "no",
                "--max-examples",
                "12",
                *common,
            ]
        )
        == 0
    )
    rec = load(caps / "experiments" / "attack" / "attack.json")
    assert set(rec["results"]) == {"capsnet", "hinton_cnn"}
    assert (
        cli(
            [
                "experiment",
                "rotation",
                str(caps),
                "--baseline",
                str(cnn),
                "--values",
                "-20",
                "0",
                "20",
                "--max-examples",
                "12",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "experiment",
                "reconstruction",
                str(caps),
                "--num-examples",
                "4",
                "--num-perturbed",
                "1",
                *common,
            ]
        )
        == 0
    )
    rec = load(caps / "experiments" / "reconstruction" / "reconstruction.json")
    assert len(rec["results"]["perturbed"][0]["dimension_sensitivity"]) == 4  # class_dim
    assert (
        cli(
            [
                "experiment",
                "routing",
                str(caps),
                "--num-examples",
                "1",
                "--max-examples",
                "12",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "experiment",
                "equivariance",
                str(caps),
                "--baseline",
                str(cnn),
                "--translations",
                "2",
                "--rotations",
                "10",
                "--max-examples",
                "24",
                *common,
            ]
        )
        == 0
    )
    assert cli(["report", str(caps)]) == 0
    page = (caps / "report.html").read_text()
    for title in (
        "Adversarial robustness",
        "Rotation sweep",
        "Reconstructions",
        "Routing diagnostics",
        "Equivariance probe",
        "Training",
    ):
        assert title in page
    # user errors are one line on stderr, exit status 1
    assert cli(["experiment", "routing", str(cnn), *common]) == 1
    assert "routing" in capsys.readouterr().err
    assert cli(["attack", str(caps / "missing"), *common]) == 1


def test_generalization_protocol_matches_and_resumes(tiny_runs, tmp_path, monkeypatch):
    from training_helpers import TINY_MODEL, tiny_config

    root, _, _ = tiny_runs
    configs = {
        "capsules": tiny_config(root, None, model_kwargs=dict(TINY_MODEL), epochs=2),
        "cnn": tiny_config(root, None, model="hinton_cnn", model_kwargs={}, epochs=2),
    }
    kwargs = dict(
        familiar=("mnist", "test", {"verify": False}),
        novel=("mnist", "test", {"verify": False}),
        experiment="protocol_demo",
        title="Protocol demo",
        device="cpu",
    )
    rec = experiments.generalization_protocol(configs, tmp_path, **kwargs)
    res = rec["results"]
    for label in configs:
        curves = res["models"][label]["curves"]
        assert len(curves["familiar_error"]) == len(curves["novel_error"]) == 2
        # familiar and novel are the same test set here: the errors agree
        assert curves["familiar_error"] == pytest.approx(curves["novel_error"])
        errs = curves["familiar_error"]
        gap = abs(res["models"][label]["familiar_error"] - res["matched_familiar_error"])
        assert gap == min(abs(e - res["matched_familiar_error"]) for e in errs)
    assert rec["figures"] == ["protocol_demo_tradeoff.png", "protocol_demo.png"]
    # a second call with more epochs continues the runs instead of starting again
    calls = []
    import capsnet.train as T

    original = T.train
    monkeypatch.setattr(
        T, "train", lambda cfg, **kw: calls.append(cfg.epochs) or original(cfg, **kw)
    )
    rec = experiments.generalization_protocol(configs, tmp_path, epochs=3, **kwargs)
    assert calls == [3, 3]
    assert len(rec["results"]["models"]["cnn"]["curves"]["novel_error"]) == 3


def test_protocol_cli_builds_configs_from_recipes():
    import argparse

    from capsnet import experiment_cli

    parser = argparse.ArgumentParser(prog="capsnet")
    experiment_cli.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["experiment", "viewpoint", "--mode", "elevation", "--epochs", "3", "--set",
         "batch_size=32", "--model-kwarg", "preset=\"small\"", "--device", "cpu"]
    )  # fmt: skip
    configs = experiment_cli._protocol_configs(args, mode=args.mode)
    caps, cnn = configs["capsules"], configs["cnn"]
    assert (caps.model, cnn.model) == ("matrix_capsnet", "hinton_cnn")
    assert caps.data_kwargs["viewpoint"] == cnn.data_kwargs["viewpoint"] == "elevation"
    assert caps.epochs == cnn.epochs == 3 and caps.batch_size == cnn.batch_size == 32
    assert caps.model_kwargs["preset"] == "small" and cnn.device == "cpu"
    args = parser.parse_args(["experiment", "affnist-protocol"])
    configs = experiment_cli._protocol_configs(args)
    assert configs["capsules"].dataset == configs["cnn"].dataset == "mnist_shifted40"
    assert not configs["capsules"].download
    args = parser.parse_args(["experiment", "viewpoint", "--download", "--num-threads", "1"])
    configs = experiment_cli._protocol_configs(args, mode=args.mode)
    assert configs["capsules"].download and configs["cnn"].download


def test_protocol_reads_the_novel_set_with_the_configs_download_flag(monkeypatch, tmp_path):
    """The novel test set is read before any training, so --download must reach it too."""
    from capsnet import data
    from capsnet.config import RunConfig

    seen = {}

    def fake_create(name, split="train", root=None, download=False, **kwargs):
        seen.update(name=name, split=split, download=download)
        raise RuntimeError("stop here")

    monkeypatch.setattr(data, "create", fake_create)
    config = RunConfig(model="hinton_cnn", dataset="mnist", download=True)
    with pytest.raises(RuntimeError, match="stop here"):
        experiments.generalization_protocol(
            {"cnn": config}, tmp_path, familiar=("mnist", "test", {}),
            novel=("mnist", "train", {}), experiment="demo", title="Demo",
        )  # fmt: skip
    assert seen == {"name": "mnist", "split": "train", "download": True}


def test_affnist_experiment_names_the_size_mismatch(tmp_path):
    from types import SimpleNamespace

    affine = SimpleNamespace(image_size=(40, 40), name="affnist_generated")
    with pytest.raises(ValueError, match="28x28 images but the affine test set has 40x40"):
        experiments.affnist_experiment({"capsnet": tiny_capsnet()}, affine, affine, tmp_path)
