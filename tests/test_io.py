"""capsnet.io: the one atomic writer (unique temporary names, nothing left behind)."""

import json

import pytest

from capsnet import io


def test_atomic_write_text_and_bytes_leave_only_the_file(tmp_path):
    path = tmp_path / "sub" / "a.txt"  # the folder is created
    assert io.atomic_write(path, "one") == path
    io.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]
    with pytest.raises(TypeError, match="bytes or str"):
        io.atomic_write(path, 3)
    assert path.read_bytes() == b"two" and [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_two_writers_of_one_file_get_different_temporary_files(tmp_path):
    dest = tmp_path / "x.json"
    with io.atomic_path(dest) as first, io.atomic_path(dest) as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.startswith(".x.json.") and second.name.startswith(".x.json.")
        first.write_text("first")
        second.write_text("second")
    # The outer context finishes last, so its content wins; no temporary file is left.
    assert dest.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    dest = tmp_path / "x.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), io.atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]


def test_write_json_round_trip_and_nan(tmp_path):
    path = io.write_json(tmp_path / "r.json", {"a": [1, 2.5], "b": None})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None}
    assert path.read_text() == json.dumps({"a": [1, 2.5], "b": None}, indent=1)
    with pytest.raises(ValueError):
        io.write_json(tmp_path / "n.json", {"x": float("nan")}, allow_nan=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_old_import_locations_are_the_same_helpers():
    from capsnet.checkpoint import atomic_write
    from capsnet.data.sources import atomic_path

    assert atomic_write is io.atomic_write and atomic_path is io.atomic_path
