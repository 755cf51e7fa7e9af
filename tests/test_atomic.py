"""Files replaced whole: the new content or the old, never a part (a kill mid-write: tests/test_checkpoint.py)."""
import pytest

from clip_hvt.atomic import atomic_write, partial_path


def test_the_file_is_replaced_only_when_the_block_completes(tmp_path):
    path = tmp_path / "sub" / "sizes.json"
    with atomic_write(path, "w") as f:
        f.write('{"a.tar": 1}')
        assert not path.exists()  # written beside it, hidden, until the block ends
    assert path.read_text() == '{"a.tar": 1}'
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "w") as f:
            f.write('{"a.tar": 2, "b')
            raise KeyboardInterrupt
    assert path.read_text() == '{"a.tar": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["sizes.json"]  # no partial left
    assert partial_path(path) == str(tmp_path / "sub" / ".sizes.json.partial")
