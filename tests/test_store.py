"""The artifact store: atomic writes, manifests as done-markers, corruption detection."""
import json

import pytest

from culbot.tasks import _store


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "rows.jsonl"
    _store.atomic_write_text(p, "old\n")

    class Boom:
        def __iter__(self):
            yield {"a": 1}
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        _store.atomic_write_jsonl(p, Boom())
    assert p.read_text() == "old\n"
    assert [x.name for x in tmp_path.iterdir()] == ["rows.jsonl"]  # no temp file left behind


def test_manifest_is_written_last_and_verifies(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("world")
    assert _store.verify(tmp_path) and "no readable manifest.json" in _store.verify(tmp_path)[0]
    m = _store.write_manifest(tmp_path, stage="t", inputs={}, config={}, counts={"n": 2})
    assert set(m.files) == {"a.txt", "sub/b.txt"}
    assert _store.is_complete(tmp_path)
    (tmp_path / "sub" / "b.txt").write_text("tampered")
    assert _store.verify(tmp_path) == [f"{tmp_path / 'sub' / 'b.txt'}: content hash mismatch"]
    (tmp_path / "a.txt").unlink()
    assert f"{tmp_path / 'a.txt'}: missing" in _store.verify(tmp_path)


def test_tree_hash_ignores_manifest_and_depends_on_content(tmp_path):
    (tmp_path / "x").write_text("1")
    h1 = _store.tree_hash(tmp_path)
    _store.write_manifest(tmp_path, stage="t", inputs={}, config={}, counts={})
    assert _store.tree_hash(tmp_path) == h1
    (tmp_path / "x").write_text("2")
    assert _store.tree_hash(tmp_path) != h1


def test_promote_replaces_a_corrupt_final_folder(tmp_path):
    final = tmp_path / "v1"
    final.mkdir()
    (final / "data").write_text("half")  # no manifest: unfinished
    staging = _store.new_staging_dir(tmp_path, "v1")
    (staging / "data").write_text("full")
    _store.write_manifest(staging, stage="t", inputs={}, config={}, counts={})
    _store.promote(staging, final)
    assert (final / "data").read_text() == "full" and _store.is_complete(final)
    assert not staging.exists()


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        _store.read_jsonl(p)


def test_a_manifest_of_another_version_is_not_trusted(tmp_path):
    (tmp_path / "x").write_text("1")
    _store.write_manifest(tmp_path, stage="t", inputs={}, config={}, counts={})
    data = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "version": 99}))
    assert _store.read_manifest(tmp_path) is None
    assert "Manifest version 99 is not the version 2 this culbot reads" in _store.verify(tmp_path)[0]
    assert "manifest.json" in _store.verify(tmp_path)[0]


def test_an_input_handed_over_must_still_hold_the_content_its_hash_names(tmp_path):
    from culbot.tasks.contracts import StageRef

    (tmp_path / "rows.jsonl").write_text("{}\n")
    m = _store.write_manifest(tmp_path, stage="t", inputs={}, config={}, counts={})
    assert _store.read_input(StageRef(path=tmp_path, content_hash=m.content_hash), "x") == (tmp_path, m)
    with pytest.raises(RuntimeError, match=r"holds .* not the 000000000000 it was handed over as"):
        _store.read_input(StageRef(path=tmp_path, content_hash="0" * 64), "format input")
    (tmp_path / "rows.jsonl").write_text("changed\n")
    with pytest.raises(RuntimeError, match="format input: .*content hash mismatch"):
        _store.read_input(tmp_path, "format input")


def test_canonical_json_is_stable():
    assert _store.hash_json({"b": 1, "a": "한"}) == _store.hash_json({"a": "한", "b": 1})
    assert json.loads(_store.canonical_json({"a": "한"})) == {"a": "한"}
