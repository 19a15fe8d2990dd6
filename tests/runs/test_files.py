"""Atomic writes (nctools/runs/files.py): a failed write keeps the old file and leaves no
temporary file behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nctools.errors import RunError
from tests.helpers import no_temp_files
from nctools.runs import files


def test_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    files.atomic_write_text(path, "old")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(RunError) as info:
        files.atomic_write_text(path, "new")
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old" and no_temp_files(tmp_path)
