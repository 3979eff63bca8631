"""Path checks made before anything is opened: regular files only, outputs in existing folders."""

from __future__ import annotations

import os

import pytest

from harness.errors import UsageError
from harness.paths import check_input_file, check_output_dir, check_output_file, open_input_file

needs_mkfifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_a_regular_file_passes(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("{}\n")
    assert check_input_file(f) == f
    with open_input_file(f) as fh:
        assert fh.read() == b"{}\n"
    assert check_output_file(f) == f
    assert check_output_file(tmp_path / "new.html") == tmp_path / "new.html"


@needs_mkfifo
def test_a_fifo_is_refused_without_blocking(fifo):
    # Opening a FIFO for reading blocks until a writer comes; these return at once.
    with pytest.raises(UsageError, match=r"pipe: is a FIFO \(named pipe\), not a regular file"):
        check_input_file(fifo)
    with pytest.raises(UsageError, match="is a FIFO"):
        open_input_file(fifo)
    with pytest.raises(UsageError, match=r"^-o: .*pipe: is a FIFO \(named pipe\); give the path"):
        check_output_file(fifo, "-o")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_refused():
    with pytest.raises(UsageError, match="^/dev/zero: is a device, not a regular file$"):
        check_input_file("/dev/zero")
    with pytest.raises(UsageError, match="^/dev/null: is a device"):
        check_output_file("/dev/null")


def test_a_missing_folder_is_not_made(tmp_path):
    out = tmp_path / "absent" / "r.html"
    with pytest.raises(UsageError, match=f"the folder {tmp_path / 'absent'} does not exist"):
        check_output_file(out, "--out")
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("check", [check_input_file, check_output_file, check_output_dir])
def test_an_empty_path_is_refused(check):
    with pytest.raises(UsageError, match="^--out: the path is empty$"):
        check("", "--out")


def test_inputs_that_are_not_files(tmp_path):
    with pytest.raises(UsageError, match="absent.jsonl: no such file$"):
        check_input_file(tmp_path / "absent.jsonl")
    with pytest.raises(UsageError, match="is a directory, not a regular file"):
        check_input_file(tmp_path)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 11)
    with pytest.raises(UsageError, match="is 11 bytes, more than the 10 this reader takes"):
        check_input_file(big, max_bytes=10)


def test_overwrite_needs_force(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"m.gguf: already exists \(pass --force to replace it\)"):
        check_output_file(f, overwrite=False)
    with pytest.raises(UsageError, match="is a directory"):
        check_output_file(tmp_path)


def test_output_dir_is_made_unless_a_file_is_there(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UsageError, match="^--out-dir: .*file: is not a directory$"):
        check_output_dir(f, "--out-dir")


def test_an_output_that_is_also_an_input_is_refused(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(
        UsageError, match=r"^-o: .*m.gguf: is also '.*m.gguf', which this command reads or writes"
    ):
        check_output_file(tmp_path / "." / "m.gguf", "-o", inputs=[None, model])
    assert model.read_bytes() == b"GGUF"
    assert check_output_file(tmp_path / "t.jsonl", inputs=[model]) == tmp_path / "t.jsonl"
