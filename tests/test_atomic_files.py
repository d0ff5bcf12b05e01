"""Files and folders written whole, and the owner's rule for the temporaries they leave."""

import errno
import os

import pytest

from llama_mimi_tt.atomic_files import (
    new_folder,
    place_folder,
    remove_temporaries,
    replacing,
    temporary_path,
    write_json,
)
from llama_mimi_tt.errors import UserError


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "cache.json"
    write_json(path, {"shards": 3})
    with pytest.raises(UserError, match=rf"cannot write {path}: No space left on device"):
        with replacing(path) as tmp:
            tmp.write_text('{"shards": ')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == '{\n  "shards": 3\n}\n'
    assert os.listdir(tmp_path) == ["cache.json"]


def test_a_temporary_removed_by_the_owner_is_a_clear_error(tmp_path):
    path = tmp_path / "shard-00001-of-00002.parquet"
    with pytest.raises(UserError, match=r"was removed before it could be renamed to .*shard-00001"):
        with replacing(path) as tmp:
            tmp.write_bytes(b"rows")
            assert remove_temporaries(path) == 1  # the owner, starting meanwhile
    assert os.listdir(tmp_path) == []


def test_temporary_names_are_hidden_unique_and_removed_only_for_their_path(tmp_path):
    a, b = temporary_path(tmp_path / "shard-1"), temporary_path(tmp_path / "shard-1")
    assert a != b and a.name.startswith(".shard-1.tmp-") and b.parent == tmp_path
    a.write_bytes(b"x")
    (b / "dcp").mkdir(parents=True)
    other = temporary_path(tmp_path / "shard-10")
    other.write_bytes(b"y")
    assert remove_temporaries(tmp_path / "shard-1") == 2
    assert os.listdir(tmp_path) == [other.name]
    ranks = temporary_path(tmp_path / "step_6", writer="ranks")
    assert ranks.name == ".step_6.tmp-ranks"
    ranks.mkdir()
    assert remove_temporaries(tmp_path / "step_*") == 1 and not ranks.exists()


def test_folders_appear_whole_and_an_existing_one_is_kept_or_replaced(tmp_path):
    path = tmp_path / "index"
    with new_folder(path) as tmp:
        (tmp / "meta.json").write_text("ours")
    assert (path / "meta.json").read_text() == "ours"
    with new_folder(path) as tmp:  # a racing builder: the first one stays
        (tmp / "meta.json").write_text("late")
    assert (path / "meta.json").read_text() == "ours"
    step = tmp_path / "step_6"
    (step / "dcp").mkdir(parents=True)  # an incomplete folder of an older run
    tmp = temporary_path(step, writer="ranks")
    tmp.mkdir()
    (tmp / "recipe_state.json").write_text("{}")
    assert place_folder(tmp, step, keep_existing=False)
    assert sorted(os.listdir(step)) == ["recipe_state.json"]
    assert sorted(os.listdir(tmp_path)) == ["index", "step_6"]
