"""``conveyor verify DATA_DIR``: finds flipped bits, torn tails and a damaged state DB.

Method: write a partition with FileLogStore on the real disk, damage files, run the
CLI's main() and read its exit code and output (text and --json).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from storage_helpers import SMALL, make_batch

from conveyor.cli import main
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore
from conveyor.testing.clock import SimClock


async def write_data_dir(data_dir: Path) -> list[str]:
    store = FileLogStore(str(data_dir / "logs"), OsFileSystem(), SimClock())
    await store.open()
    log = await store.create_partition("t", 0, SMALL)
    for index in range(60):
        await log.append(make_batch([b"%04d" % index + b"-" * 90]))
    paths = [segment.log_path for segment in log.segments]
    await store.close()
    connection = sqlite3.connect(data_dir / "state.sqlite3")
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    connection.close()
    return paths


def flip(path: str, position: int) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0x01]))


def tear(path: str) -> None:
    with open(path, "ab") as file:
        file.write(b"\x00" * 30)


async def test_clean_directory_verifies(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    await write_data_dir(tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out


async def test_flipped_bit_and_torn_tail_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    paths = await write_data_dir(tmp_path)
    flip(paths[1], 200)  # inside the second batch of a sealed segment
    tear(paths[-1])  # a torn tail on the active segment
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"damage: {paths[1]} at byte " in out and "corrupt batch" in out
    assert f"damage: {paths[-1]}" in out and "tail" in out
    assert main(["verify", "--json", str(tmp_path)]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["damaged"] is True
    damaged = [finding for finding in document["findings"] if finding["severity"] == "damage"]
    assert {finding["path"] for finding in damaged} == {paths[1], paths[-1]}
    [middle] = [finding for finding in damaged if finding["path"] == paths[1]]
    assert middle["next_offset"] == middle["first_offset"] + 1


async def test_damaged_state_database_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    await write_data_dir(tmp_path)
    (tmp_path / "state.sqlite3").write_bytes(b"not a database at all" * 100)
    assert main(["verify", str(tmp_path)]) == 1
    assert "quick_check" in capsys.readouterr().out
