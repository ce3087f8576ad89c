"""ToyNORB: objects, renderer, generated files, the registered dataset and the CLI.

Everything renders tiny selections (one category, few views, 16x16 images), so the file
runs in seconds; the full dataset is checked by its recorded MD5s, not here.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
import torch

import capsnet.data as data
from capsnet.data.formats import parse_smallnorb
from capsnet.data.smallnorb import AZIMUTH_FAMILIAR, ELEVATION_FAMILIAR
from capsnet.data.toynorb import dataset as toynorb_dataset
from capsnet.data.toynorb import generate as toynorb_generate
from capsnet.data.toynorb.objects import TEST_INSTANCES, TRAIN_INSTANCES, build_object
from capsnet.data.toynorb.render import LIGHTINGS, Light, render_views

# One category, one instance per split, every view, 2 lightings, 16x16 images.
TINY = dict(
    categories=(2,),
    instances={"train": (4,), "test": (0,)},
    lightings=(0, 3),
    size=16,
    supersample=1,
    workers=1,
    progress=False,
)
SMALL = dict(size=8, crop_size=4, cache=False, progress=False)


@pytest.fixture
def tiny_root(tmp_path, monkeypatch):
    """A root with tiny ToyNORB files, installed as the standard ones (their MD5s)."""
    root = tmp_path / "root"
    digests = toynorb_generate.generate_toynorb(root / "toynorb", **TINY)
    specs = {s: toynorb_generate.file_specs(s, digests[s]) for s in ("train", "test")}
    monkeypatch.setattr(toynorb_dataset, "TOYNORB_FILES", specs)
    monkeypatch.setattr(toynorb_dataset, "FULL_SHAPE", (2 * 9 * 18, 2, 16, 16))
    return root, digests


def _read(folder, split, kind):
    stem = toynorb_generate.TOYNORB_FILES[split][kind].name
    path = folder / stem
    return parse_smallnorb(path.read_bytes(), path)


# --------------------------------------------------------------------------- objects


def test_objects_closed_outward_and_all_different():
    """Every object's triangles wind outward (the rasteriser culls by winding), and no
    two instances of a category are the same shape rescaled."""
    for category in range(5):
        signatures = []
        for instance in range(10):
            mesh = build_object(category, instance)
            v = mesh.vertices[mesh.faces]  # (F, 3 corners, 3)
            winding = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
            smooth = mesh.normals[mesh.faces].sum(1)
            agree = (winding * smooth).sum(1) > 0
            assert agree.mean() > 0.995, (category, instance, agree.mean())
            lo, hi = mesh.bounds
            assert np.allclose((lo + hi) / 2, 0, atol=1e-9)
            assert 0.85 < np.linalg.norm(hi - lo) / 2 < 1.1
            extent = (hi - lo) / np.linalg.norm(hi - lo)  # scale-free proportions
            signatures.append((mesh.faces.shape[0], *np.round(extent, 3)))
        assert len(set(signatures)) == 10, (category, signatures)


def test_build_object_checks_arguments():
    with pytest.raises(ValueError, match="category"):
        build_object(5, 0)
    with pytest.raises(ValueError, match="instance"):
        build_object(0, 10)


# --------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("category, instance", [(4, 4), (2, 1)])
def test_symmetric_object_at_plus_minus_azimuth_gives_mirror_images(category, instance):
    """A car / airplane (symmetric in y) at azimuth a and -a: mirror images, the left
    camera's image mirroring the right camera's (a light in the symmetry plane)."""
    mesh = build_object(category, instance)
    lights = [Light(0.0, 50.0)]
    views = [(40, 60), (40, 300), (55, 100), (55, 260)]
    out = render_views(mesh, views, lights=lights, size=48).astype(np.int16)
    for a, b in ((0, 1), (2, 3)):
        left_a, right_a = out[a, 0, 0], out[a, 0, 1]
        mirrored = out[b, 0, 1, :, ::-1]
        diff = np.abs(left_a - mirrored)
        assert diff.mean() < 0.2 and (diff > 2).mean() < 0.005, (diff.mean(), (diff > 2).mean())
        assert np.abs(left_a - left_a[:, ::-1]).mean() > 1  # not trivially symmetric
        assert np.abs(left_a - right_a).mean() > 0.5  # the two cameras differ


def test_light_changes_shading_not_silhouette():
    """Same covered pixels under two lightings (found by changing the background from
    black to white: covered pixels do not change), different intensities on them."""
    mesh = build_object(0, 4)
    views = [(45, 120)]

    def render(light):
        dark = render_views(mesh, views, lights=[light], size=32, background=0.0)[0, 0, 0]
        bright = render_views(mesh, views, lights=[light], size=32, background=1.0)[0, 0, 0]
        covered = dark == bright
        empty = (dark == 0) & (bright == 255)
        return covered, empty, dark

    covered_a, empty_a, image_a = render(LIGHTINGS[0])
    covered_b, empty_b, image_b = render(LIGHTINGS[4])
    assert 0.03 < covered_a.mean() < 0.7 and 0.3 < empty_a.mean() < 0.97
    assert np.array_equal(covered_a, covered_b) and np.array_equal(empty_a, empty_b)
    assert np.abs(image_a.astype(int) - image_b.astype(int))[covered_a].mean() > 5


def test_render_is_deterministic_and_varies_with_view():
    mesh = build_object(1, 6)
    views = [(30, 0), (70, 180)]
    a = render_views(mesh, views, size=24)
    b = render_views(mesh, views, size=24)
    assert a.dtype == np.uint8 and a.shape == (2, 6, 2, 24, 24)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    assert len({a[0, k, 0].tobytes() for k in range(6)}) == 6  # every lighting differs


# --------------------------------------------------------------------------- files


def test_generation_deterministic_and_independent_of_workers(tmp_path):
    first = toynorb_generate.generate_toynorb(tmp_path / "a", **TINY)
    second = toynorb_generate.generate_toynorb(tmp_path / "b", **{**TINY, "workers": 2})
    assert first == second
    for split in ("train", "test"):
        for kind, spec in toynorb_generate.TOYNORB_FILES[split].items():
            content = (tmp_path / "b" / spec.name).read_bytes()
            assert hashlib.md5(content).hexdigest() == first[split][kind]
    assert not list((tmp_path / "a").glob(".*part"))  # no temporary files left


def test_files_round_trip_through_smallnorb_parser(tmp_path):
    folder = tmp_path / "t"
    toynorb_generate.generate_toynorb(folder, **TINY)
    for split, instance in (("train", 4), ("test", 0)):
        dat, cat, info = (_read(folder, split, k) for k in ("dat", "cat", "info"))
        n = 9 * 18 * 2
        assert dat.shape == (n, 2, 16, 16) and dat.dtype == np.uint8
        assert cat.shape == (n,) and (cat == 2).all()
        assert info.shape == (n, 4)
        assert (info[:, 0] == instance).all()
        rows = {tuple(r) for r in info[:, 1:].tolist()}
        assert rows == {(e, a, k) for e in range(9) for a in range(0, 36, 2) for k in (0, 3)}
        assert not (np.diff(info[:, 2]) >= 0).all()  # shuffled order, not sorted
        # each row holds the view its info names
        row = int(np.nonzero((info[:, 1] == 5) & (info[:, 2] == 14) & (info[:, 3] == 3))[0][0])
        mesh = build_object(2, instance)
        expected = render_views(mesh, [(55, 140)], lights=[LIGHTINGS[3]], size=16, supersample=1)
        assert np.array_equal(dat[row], expected[0, 0])


def test_generation_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="azimuths"):
        toynorb_generate.generate_toynorb(tmp_path, **{**TINY, "azimuths": (1,)})
    with pytest.raises(ValueError, match="splits"):
        toynorb_generate.generate_toynorb(tmp_path, **{**TINY, "splits": ("val",)})


@pytest.mark.slow
def test_standard_md5_mismatch_installs_nothing(tmp_path, monkeypatch):
    """With the standard settings, bytes that differ from the recorded MD5s are refused
    and no file is left under a real name."""
    bogus = {s: {k: "0" * 32 for k in ("dat", "cat", "info")} for s in ("train", "test")}
    monkeypatch.setattr(toynorb_generate, "TOYNORB_MD5", bogus)
    standard = {**TINY, "size": 96, "supersample": 3, "lightings": range(6), "categories": range(5)}
    standard["instances"] = {"train": TRAIN_INSTANCES, "test": TEST_INSTANCES}
    monkeypatch.setattr(toynorb_generate, "_render_object", _fake_render)
    with pytest.raises(data.CorruptFileError, match="MD5"):
        toynorb_generate.generate_toynorb(tmp_path / "x", **{**standard, "splits": ("test",)})
    assert list((tmp_path / "x").iterdir()) == []


def _fake_render(job):
    category, instance, elevations, azimuths, lightings, size, _ = job
    shape = (len(elevations), len(azimuths), len(lightings), 2, size, size)
    return category, instance, np.full(shape, category * 10 + instance, np.uint8)


# --------------------------------------------------------------------------- dataset


def test_dataset_splits_disjoint_instances_and_preprocessing(tiny_root):
    root, _ = tiny_root
    train = data.create("toynorb", "train", root=root, **SMALL)
    test = data.create("toynorb", "test", root=root, **SMALL)
    assert train.name == "toynorb" and train.classes == data.smallnorb.SMALLNORB_CLASSES
    assert set(train.info[:, 0].tolist()) == {4} and set(test.info[:, 0].tolist()) == {0}
    assert set(TRAIN_INSTANCES).isdisjoint(TEST_INSTANCES)
    assert sorted(TRAIN_INSTANCES + TEST_INSTANCES) == list(range(10))
    assert train.images.shape == (324, 1, 8, 8) and train.input_size == (4, 4)
    assert "not smallNORB" in train.meta["note"]
    x = data.to_float(train.images[:4])
    y = train.eval_transform(x)
    assert y.shape == (4, 1, 4, 4)
    both = data.create("toynorb", "test", root=root, channels="both", **SMALL)
    assert both.in_channels == 2 and not torch.equal(both.images[:, 0], both.images[:, 1])


def test_viewpoint_splits_select_exact_azimuths_and_elevations(tiny_root):
    root, _ = tiny_root
    for viewpoint, column, familiar in (
        ("azimuth", 2, set(AZIMUTH_FAMILIAR)),
        ("elevation", 1, set(ELEVATION_FAMILIAR)),
    ):
        kw = dict(viewpoint=viewpoint, **SMALL)
        train = data.create("toynorb", "train", root=root, **kw)
        fam = data.create("toynorb", "test_familiar", root=root, **kw)
        nov = data.create("toynorb", "test_novel", root=root, **kw)
        whole = data.create("toynorb", "test", root=root, **kw)
        assert set(train.info[:, column].tolist()) == familiar
        assert set(fam.info[:, column].tolist()) == familiar
        all_codes = set(range(0, 36, 2)) if column == 2 else set(range(9))
        assert set(nov.info[:, column].tolist()) == all_codes - familiar
        assert len(fam) + len(nov) == len(whole) == 324
        per_code = 324 // len(all_codes)
        assert len(nov) == per_code * len(all_codes - familiar)
    assert {6 * a for a in (0, 2, 4, 30, 32, 34)} != set()  # AZIMUTH_FAMILIAR is 300..40 deg
    assert set(AZIMUTH_FAMILIAR) == {30, 32, 34, 0, 2, 4}


def test_corrupt_generated_file_is_refused(tiny_root):
    root, digests = tiny_root
    spec = toynorb_dataset.TOYNORB_FILES["test"]["dat"]
    path = root / "toynorb" / spec.name
    content = bytearray(path.read_bytes())
    content[-7] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(data.CorruptFileError, match=spec.name) as err:
        data.create("toynorb", "test", root=root, **SMALL)
    assert "capsnet data generate toynorb" in str(err.value)
    # verify=False keeps the format checks only
    assert len(data.create("toynorb", "test", root=root, verify=False, **SMALL)) == 324
    path.write_bytes(bytes(content[:-5]))  # truncated
    with pytest.raises(data.CorruptFileError, match="truncated"):
        data.create("toynorb", "test", root=root, verify=False, **SMALL)


def test_corrupt_file_regenerated_with_download(tiny_root, monkeypatch):
    root, digests = tiny_root
    tiny = functools.partial(toynorb_generate.generate_toynorb, **TINY)
    monkeypatch.setattr(
        toynorb_dataset,
        "generate_toynorb",
        lambda folder, workers=None, verify=True, progress=True: tiny(folder),
    )
    path = root / "toynorb" / toynorb_dataset.TOYNORB_FILES["train"]["info"].name
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x07")
    ds = data.create("toynorb", "train", root=root, download=True, **SMALL)
    assert len(ds) == 324
    assert hashlib.md5(path.read_bytes()).hexdigest() == digests["train"]["info"]


def test_missing_files_generated_on_first_use(tmp_path, monkeypatch, capsys):
    digests = toynorb_generate.generate_toynorb(tmp_path / "ref", **TINY)
    specs = {s: toynorb_generate.file_specs(s, digests[s]) for s in ("train", "test")}
    monkeypatch.setattr(toynorb_dataset, "TOYNORB_FILES", specs)
    monkeypatch.setattr(toynorb_dataset, "FULL_SHAPE", (324, 2, 16, 16))
    calls = []

    def tiny(folder, workers=None, verify=True, progress=True):
        calls.append(folder)
        return toynorb_generate.generate_toynorb(folder, **{**TINY, "progress": progress})

    monkeypatch.setattr(toynorb_dataset, "generate_toynorb", tiny)
    root = tmp_path / "fresh"
    with pytest.raises(data.DatasetNotFoundError, match="capsnet data generate toynorb"):
        data.create("toynorb", "train", root=root, generate_missing=False, **SMALL)
    ds = data.create("toynorb", "train", root=root, **{**SMALL, "progress": True})
    assert calls == [root / "toynorb"] and len(ds) == 324
    message = capsys.readouterr().err
    assert "ToyNORB v1: rendering 648 stereo pairs" in message and str(root / "toynorb") in message
    data.create("toynorb", "test", root=root, **SMALL)
    assert len(calls) == 1  # both splits were generated at once


def test_registry_and_recipes_accept_toynorb():
    info = data.dataset_info("toynorb")
    assert info.splits == ("train", "test", "test_familiar", "test_novel")
    assert (info.input_size, info.in_channels, info.num_classes) == ((32, 32), 1, 5)
    assert info.extra["generate"] is toynorb_dataset.generate_files
    from capsnet.config import load_recipe

    cfg = load_recipe("hinton_cnn_smallnorb_azimuth", dataset="toynorb")
    assert cfg.dataset == "toynorb" and cfg.data_kwargs == {"viewpoint": "azimuth"}
    with pytest.raises(ValueError, match="no option"):
        load_recipe("matrix_capsnet_smallnorb_small", dataset="toynorb", data_kwargs={"bad": 1})


def test_data_cli(tiny_root, capsys, monkeypatch):
    from capsnet.cli import main

    root, _ = tiny_root
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "toynorb" in out and "generated" in out
    assert main(["data", "verify", "toynorb", "--root", str(root), "--no-progress"]) == 0
    assert "toynorb test: 324 examples verified" in capsys.readouterr().out
    assert main(["data", "download", "toynorb", "--root", str(root), "--no-progress"]) == 0
    assert "toynorb train: 324 examples verified" in capsys.readouterr().out
    assert main(["data", "generate", "toynorb", "--root", str(root)]) == 0  # present: no work
    assert "already" in capsys.readouterr().out
    assert main(["data", "generate", "mnist", "--root", str(root)]) == 1
    assert "not generated" in capsys.readouterr().err
    spec = toynorb_dataset.TOYNORB_FILES["train"]["cat"]
    (root / "toynorb" / spec.name).write_bytes(b"garbage")
    assert main(["data", "verify", "toynorb", "--root", str(root), "--no-progress"]) == 1
    assert spec.name in capsys.readouterr().err
