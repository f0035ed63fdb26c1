"""The committed-offset history from `__consumer_offsets`: parsing hand-built records, and commits
read back from the real broker (plain and transactional, aborted ones left out)."""

from __future__ import annotations

import struct
import time

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from tensorline.engine import clients
from tensorline.ops import offsets


def string(s: str) -> bytes:
    return struct.pack(">h", len(s.encode())) + s.encode()


def commit_key(group: str, topic: str, partition: int, version: int = 1) -> bytes:
    return struct.pack(">h", version) + string(group) + string(topic) + struct.pack(">i", partition)


def test_parse_offset_commit_keys_and_every_value_version():
    # Value v1: offset, metadata, commit and expire timestamps; v3: offset, leader epoch, metadata, timestamp.
    v1 = struct.pack(">hq", 1, 1116) + string("") + struct.pack(">qq", 1, 2)
    v3 = struct.pack(">hqi", 3, 906, 0) + string("m") + struct.pack(">q", 1)
    assert offsets.parse(commit_key("g", "t", 1, version=0), v1) == offsets.OffsetCommit("g", "t", 1, 1116)
    assert offsets.parse(commit_key("g", "t", 1), v3) == offsets.OffsetCommit("g", "t", 1, 906)


def test_parse_skips_group_metadata_kip848_records_and_tombstones():
    assert offsets.parse(struct.pack(">h", 2) + string("g"), b"\x00\x03anything") is None
    assert offsets.parse(struct.pack(">h", 5) + string("g") + string("member"), b"\x00\x00") is None
    assert offsets.parse(commit_key("g", "t", 0), None) is None


def test_parse_names_a_truncated_record():
    with pytest.raises(offsets.BadOffsetsRecord, match="string of length 9"):
        offsets.parse(struct.pack(">h", 1) + struct.pack(">h", 9) + b"g", struct.pack(">hq", 1, 0))
    with pytest.raises(offsets.BadOffsetsRecord):
        offsets.parse(commit_key("g", "t", 0), b"\x00\x01\x00")


def test_history_keeps_log_order_per_partition_and_regressions_name_each_step_back():
    commits = [offsets.OffsetCommit("g", "t", 1, o) for o in (906, 1116, 906, 1200)]
    commits += [offsets.OffsetCommit("g", "t", 0, 5), offsets.OffsetCommit("h", "t", 1, 1)]
    hist = offsets.history_of(commits, groups=["g"])
    assert hist == {("g", "t", 1): [906, 1116, 906, 1200], ("g", "t", 0): [5]}
    [back] = offsets.regressions(hist)
    assert (back.group, back.partition, back.previous, back.offset, back.index) == ("g", 1, 1116, 906, 2)
    assert "committed offset 1116 then 906" in str(back)
    assert offsets.regressions({("g", "t", 0): [1, 1, 2]}) == []  # the same offset again is no step back


@pytest.mark.broker
def test_history_reads_back_commits_from_the_broker_without_aborted_transactions(pipeline, namespace):
    topic = pipeline.topic("raw").name
    group = f"{namespace}.g"
    consumer = clients.consumer(pipeline, group, topic)
    producer = clients.producer(pipeline, transactional_id=f"{namespace}.tx")
    try:
        deadline = time.monotonic() + 60
        while not consumer.assignment():
            assert time.monotonic() < deadline, "the consumer never joined its group"
            consumer.poll(timeout_ms=200)
        tp = TopicPartition(topic, 1)
        for o in (5, 9, 3):
            consumer.commit({tp: OffsetAndMetadata(o, "", -1)})
        producer.init_transactions()
        for o, commit in ((12, True), (7, False), (14, True)):
            producer.begin_transaction()
            producer.send_offsets_to_transaction({tp: OffsetAndMetadata(o, "", -1)}, consumer.group_metadata())
            producer.commit_transaction() if commit else producer.abort_transaction()
    finally:
        producer.close()
        consumer.close()
    hist = offsets.history(pipeline, [group])
    assert hist == {(group, topic, 1): [5, 9, 3, 12, 14]}
    assert [(r.previous, r.offset) for r in offsets.regressions(hist)] == [(9, 3)]
    assert (group, topic, 1) not in offsets.history(pipeline, [f"{namespace}.other"])
