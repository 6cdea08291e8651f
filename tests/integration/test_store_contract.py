"""One store contract, two backends: every test here runs on a temp folder and on the moto S3 server.

What a caller may rely on whichever store it was given: a key and a folder are deleted and listed the
same way (with or without a trailing slash, never reaching a sibling that shares the prefix), writes
overwrite, a missing key is StoreNotFound everywhere, a read past the end is short, and a delete
takes away the publish marker (manifest.json) before the files it vouches for.
"""

from __future__ import annotations

import os

import pytest
from gptoss_cloud.contract.store import objects as store_mod
from gptoss_cloud.contract.store.objects import PUBLISH_MARKER, S3Store, StoreNotFound, open_store


@pytest.fixture(params=["local", "s3"])
def st(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_bucket"))


def _fill(st, keys):
    for k in keys:
        st.write_bytes(k, k.encode())


def test_single_object_delete_removes_that_object_only(st):
    _fill(st, ["a/b.txt", "a/b.txt2", "a/c.txt"])
    assert st.delete("a/b.txt") == 1
    assert not st.exists("a/b.txt")
    with pytest.raises(StoreNotFound):
        st.read_bytes("a/b.txt")
    assert st.list("a") == ["a/b.txt2", "a/c.txt"]  # a key sharing the name as a prefix stays


def test_prefix_delete_with_and_without_slash_spares_siblings(st):
    _fill(st, ["ck/step-1/x", "ck/step-1/sub/y", "ck/step-10/x", "ck/step-1-old/x"])
    assert st.delete("ck/step-1") == 2
    assert st.list("ck") == ["ck/step-1-old/x", "ck/step-10/x"]
    assert st.delete("ck/step-10/") == 1
    assert st.list("ck/") == ["ck/step-1-old/x"]
    assert st.delete("ck/nothing-here") == 0 and st.delete("ck/nothing-here/") == 0


def test_list_with_and_without_trailing_slash(st):
    _fill(st, ["d/one", "d/two/three", "d-sibling/four", "dx"])
    assert st.list("d") == st.list("d/") == ["d/one", "d/two/three"]
    assert st.list("d/one") == ["d/one"]  # a key lists as itself
    assert st.list("d/tw") == []  # a partial name is not a folder
    assert st.list("") == ["d-sibling/four", "d/one", "d/two/three", "dx"]
    assert st.child("d").list("") == ["one", "two/three"]


def test_overwrite_by_write_and_upload(st, tmp_path):
    st.write_bytes("o/k", b"first")
    st.write_bytes("o/k", b"second, longer")
    assert st.read_bytes("o/k") == b"second, longer"
    src = tmp_path / "src.bin"
    src.write_bytes(b"third")
    st.upload_file(src, "o/k")
    assert st.read_bytes("o/k") == b"third" and st.list("o") == ["o/k"]


def test_missing_key_is_not_found_everywhere(st, tmp_path):
    with pytest.raises(StoreNotFound, match="missing"):
        st.read_bytes("no/missing")
    with pytest.raises(StoreNotFound, match="missing"):
        st.read_range("no/missing", 0, 10)
    dest = tmp_path / "dl" / "missing"
    with pytest.raises(StoreNotFound, match="missing"):
        st.download_file("no/missing", dest)
    assert not dest.exists() and not list((tmp_path / "dl").glob("*"))  # no half download left behind
    assert not st.exists("no/missing") and not st.exists("no") and st.list("no") == []


def test_exists_for_keys_and_folders(st):
    _fill(st, ["e/f/g"])
    assert st.exists("e/f/g") and st.exists("e/f") and st.exists("e") and st.exists("e/")
    assert not st.exists("e/f/g/h") and not st.exists("e/f/gg") and not st.exists("e/x")


def test_read_range(st):
    data = os.urandom(1000)
    st.write_bytes("r/blob", data)
    assert st.read_range("r/blob", 0, 10) == data[:10]
    assert st.read_range("r/blob", 990, 100) == data[990:]  # short at the end
    assert st.read_range("r/blob", 1000, 10) == b"" and st.read_range("r/blob", 5000, 10) == b""
    assert st.read_range("r/blob", 3, 0) == b""


def test_download_round_trip_and_upload_of_many(st, tmp_path):
    src = tmp_path / "s.bin"
    src.write_bytes(os.urandom(3000))
    store_mod.upload_files(st, [(src, "u/a.bin"), (src, "u/b/c.bin")])
    st.download_file("u/b/c.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert st.list("u") == ["u/a.bin", "u/b/c.bin"]


def test_delete_removes_the_publish_marker_first(st, monkeypatch):
    """A reader listing the folder mid-delete must never see a manifest whose files are gone."""
    _fill(st, [f"p/step-3/{PUBLISH_MARKER}", "p/step-3/__0_0.distcp", "p/step-3/_parts/rank-0.json",
               f"p/step-3/nested/{PUBLISH_MARKER}", "p/step-3/z"])
    seen = []

    def markers_left() -> list[str]:
        return [k for k in st.list("p") if k.endswith(PUBLISH_MARKER)]

    if isinstance(st, S3Store):
        real = st.client.delete_objects

        def spy(**kw):
            keys = [o["Key"] for o in kw["Delete"]["Objects"]]
            if any(not k.endswith(PUBLISH_MARKER) for k in keys):
                seen.append(markers_left())
            return real(**kw)

        monkeypatch.setattr(st.client, "delete_objects", spy)
    else:
        real = store_mod.shutil.rmtree

        def spy(path, *a, **kw):
            seen.append(markers_left())
            return real(path, *a, **kw)

        monkeypatch.setattr(store_mod.shutil, "rmtree", spy)
    assert st.delete("p/step-3") == 5
    assert seen and all(s == [] for s in seen), seen
    assert st.list("p") == []
