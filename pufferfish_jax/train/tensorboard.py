"""TensorBoard event files, written directly: scalar summaries in TFRecord framing.

The format is small and stable: each record is a length, its masked CRC-32C, an `Event` protocol
buffer and that buffer's masked CRC-32C; a scalar is `Event{wall_time, step, summary{value{tag,
simple_value}}}`. Writing it here costs ~60 lines and no dependency, where tensorboardX imports
torch whenever torch is installed (3.8 s at every start, measured) and tensorboard's own writer
takes a second to import and a dozen packages; the tests read the files back with TensorBoard's
own EventAccumulator. Every record is flushed at once, like metrics.jsonl, so a crash loses nothing.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, *, scalars: dict[str, float] | None = None,
                file_version: str | None = None) -> bytes:
    """An `Event` message: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    message = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        message += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        message += _field(5, values)
    return message


def record_bytes(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


class EventWriter:
    """One events file in `logdir` (a new one per process, as TensorBoard expects; it reads every
    file of a folder as one run)."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.0"
        self._file = open(logdir / name, "ab")
        self._write(event_bytes(now, 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(record_bytes(event))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        if values:
            self._write(event_bytes(time.time() if wall_time is None else wall_time, step, scalars=values))

    def close(self) -> None:
        self._file.close()
