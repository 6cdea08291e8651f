"""Store keys -> local paths: every escape is refused, plain keys pass."""

from __future__ import annotations

import os

import pytest

from gptoss_cloud.contract.store.keys import UnsafeKeyError, check_key, contained, relative_keys

BAD = ["../x", "a/../../x", "merged/../../../../tmp/x", "/etc/passwd", "a//b", "./a", "a/./b", "a\\..\\b",
       "C:/x", "a\x00b", "a\nb", "", "x" * 1025]


@pytest.mark.parametrize("key", BAD)
def test_bad_keys_are_refused_with_the_key_named(key):
    with pytest.raises(UnsafeKeyError) as e:
        check_key(key, where="manifest m.json")
    assert "manifest m.json" in str(e.value)


@pytest.mark.parametrize("key", ["a", "merged/model-00001-of-00002.safetensors", "ckpt/step-3/__0_0.distcp", "a/b/"])
def test_plain_keys_pass(key, tmp_path):
    assert check_key(key) == key
    assert tmp_path.resolve() in contained(tmp_path, key).parents


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "dest" / "link")
    with pytest.raises(UnsafeKeyError, match="resolves outside"):
        contained(tmp_path / "dest", "link/file")


def test_relative_keys_checks_both_the_key_and_its_remainder():
    assert relative_keys(["run/merged/a", "run/merged/b/c"], "run/merged") == [("run/merged/a", "a"), ("run/merged/b/c", "b/c")]
    with pytest.raises(UnsafeKeyError):
        relative_keys(["run/merged/../../x"], "run/merged")
    with pytest.raises(UnsafeKeyError, match="not under"):
        relative_keys(["other/a"], "run/merged")
