"""Tests for vaedraw.outputs: output paths are checked before any work, several outputs say what was written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vaedraw.errors import EXIT_OUTPUT, EXIT_USAGE, OutputError, VaedrawError
from vaedraw.outputs import check_output, show, write_outputs


def test_a_new_file_in_a_writable_or_missing_folder_is_accepted(tmp_path):
    assert check_output(tmp_path / "a.png") == tmp_path / "a.png"
    assert check_output(tmp_path / "new" / "deeper" / "a.png")  # the writer creates the folders
    (tmp_path / "old.png").write_bytes(b"x")
    assert check_output(tmp_path / "old.png")  # a regular file is replaced (atomically, by the writer)
    assert check_output(tmp_path / "UPPER.PNG")
    assert check_output(tmp_path / "a.gif", (".gif",), "--gif")


@pytest.mark.parametrize("name,kinds", [("a.jpg", (".png",)), ("a", (".png",)), ("a.png.bak", (".png",)),
                                        ("a.png", (".gif",)), ("a.txt", (".npz",))])
def test_an_unknown_extension_is_a_usage_error_naming_the_option_and_the_allowed_kinds(tmp_path, name, kinds):
    with pytest.raises(VaedrawError) as e:
        check_output(tmp_path / name, kinds, "--thing")
    assert e.value.exit_code == EXIT_USAGE and not isinstance(e.value, OutputError)
    assert "--thing" in str(e.value) and kinds[0] in str(e.value)
    assert not (tmp_path / name).exists()


def _refused(path: Path, kinds=(".png",)) -> str:
    with pytest.raises(OutputError) as e:
        check_output(path, kinds)
    assert e.value.exit_code == EXIT_OUTPUT
    return str(e.value)


def test_a_folder_is_never_replaced(tmp_path):
    (tmp_path / "pics.png").mkdir()
    assert "is a folder" in _refused(tmp_path / "pics.png")
    assert (tmp_path / "pics.png").is_dir()


def test_a_symbolic_link_is_refused_whether_or_not_its_target_exists(tmp_path):
    target = tmp_path / "target.png"
    target.write_bytes(b"keep")
    (tmp_path / "link.png").symlink_to(target)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert "symbolic link" in _refused(tmp_path / "link.png")
    assert "symbolic link" in _refused(tmp_path / "dangling.png")
    assert target.read_bytes() == b"keep"


def test_a_pipe_or_a_device_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert "not a regular file" in _refused(tmp_path / "pipe.png")
    if os.path.exists("/dev/null"):
        with pytest.raises(VaedrawError):  # /dev/null has no extension: refused for that first
            check_output("/dev/null")
        assert "not a regular file" in _refused(Path("/dev/null"), kinds=("",))


def test_a_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    message = _refused(tmp_path / "file" / "a.png")
    assert str(tmp_path / "file") in message


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root may write anywhere: ask the permission question as an ordinary user's kernel answers it
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder and mode & os.W_OK
                            else real_access(p, mode, **kw))
    try:
        assert "no permission" in _refused(folder / "a.png")
        assert "no permission" in _refused(folder / "sub" / "a.png")  # the folder the writer would create
    finally:
        folder.chmod(0o755)


def test_paths_are_shown_printable_even_when_not_utf8():
    name = os.fsdecode(b"/tmp/caf\xe9\n.png")  # Latin-1 bytes and a newline in a file name
    text = show(name)
    text.encode("utf-8")  # printable on any UTF-8 terminal: no lone surrogates
    assert "\n" not in text and "\ufffd" in text and text.endswith(".png")
    assert show(Path("plain/a.png")) == "plain/a.png"


def test_write_outputs_says_what_was_written_when_a_later_one_fails(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.npz", tmp_path / "c.gif"

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device", str(b))

    with pytest.raises(OutputError) as e:
        write_outputs([(a, lambda: a.write_bytes(b"png"), "grid"), (b, fail, "array"),
                       (c, lambda: c.write_bytes(b"gif"), "animation")])
    message = str(e.value)
    assert f"written: grid {a}" in message and f"not written: array {b}, animation {c}" in message
    assert "No space" in message
    assert a.exists() and not c.exists()  # it stops at the failure


def test_write_outputs_lets_a_first_failure_through_unchanged(tmp_path):
    def fail():
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "a.png"))

    with pytest.raises(OSError) as e:  # nothing was written: the plain error says it all (main maps it)
        write_outputs([(tmp_path / "a.png", fail, "grid")])
    assert e.value.errno == errno.EROFS


def test_atomic_writes_never_replace_a_folder_a_link_or_a_pipe(tmp_path):
    """The same rule holds below the command line: every atomic write (pictures, arrays, checkpoints)."""
    from vaedraw.checkpoint import atomic_write_text

    target = tmp_path / "target.json"
    target.write_text("keep")
    (tmp_path / "link.json").symlink_to(target)
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "pipe.json")
    for name in ("link.json", "dir.json", "pipe.json"):
        with pytest.raises(OutputError):
            atomic_write_text(tmp_path / name, "new")
    assert target.read_text() == "keep" and (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "dir.json").is_dir() and not any((tmp_path / "dir.json").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "link.json", "pipe.json", "target.json"]
    atomic_write_text(target, "new")  # a regular file is replaced
    assert target.read_text() == "new"
