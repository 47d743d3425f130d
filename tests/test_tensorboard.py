"""TensorBoard event files: TensorBoard's own reader finds in every run dir the same numbers as
metrics.jsonl, tag by tag and step by step."""

import struct

import numpy as np
import pytest

from pufferfish_jax.train.metrics import TENSORBOARD_DIR, read_metrics, scalar_tags
from pufferfish_jax.train.tensorboard import crc32c, record_bytes


def test_crc32c_matches_the_castagnoli_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the published check value of CRC-32C
    record = record_bytes(b"event")
    assert struct.unpack("<Q", record[:8])[0] == 5 and record[12:17] == b"event" and len(record) == 8 + 4 + 5 + 4


@pytest.mark.slow  # the shared trained run, and TensorBoard's reader (seconds to import)
def test_tensorboard_reads_the_scalars_of_metrics_jsonl(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(trained_run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    accumulator.Reload()
    got = {(tag, e.step): e.value for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)}
    expected = {}
    for record in read_metrics(trained_run / "metrics.jsonl"):
        fields = {k: v for k, v in record.items() if k != "event"}
        for tag, value in scalar_tags(record["event"], fields).items():
            expected[(tag, int(fields.get("step", 0)))] = np.float32(value)
    wanted = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/memory_bytes",
              "eval/val_loss", "eval/val_bpb"}
    assert wanted <= {tag for tag, _ in got}
    assert got.keys() == expected.keys()
    assert all(got[key] == expected[key] for key in expected)
    assert {step for tag, step in got if tag == "train/loss"} == {4, 8}  # train.log_every=4 over 8 steps
