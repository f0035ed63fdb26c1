"""Kafka's key partitioning as the sink computes it: the Java client's hash and partition for
every key (kafka-python's DefaultPartitioner is the reference)."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from tensorline.engine.partitioner import _words, murmur2, partition_for_key

# Utils.murmur2 of these keys, from Kafka's own UtilsTest (signed 32-bit, as Java returns it).
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_the_hash_is_the_java_clients():
    signed = {k: h - (1 << 32) if h >= 1 << 31 else h for k, h in ((k, murmur2(k)) for k in JAVA_VECTORS)}
    assert signed == JAVA_VECTORS


@given(st.binary(max_size=300))
def test_the_hash_is_kafka_pythons_for_any_key(key):
    assert murmur2(key) == kafka_python_murmur2(key)
    assert murmur2(bytearray(key)) == murmur2(memoryview(key)) == murmur2(key)


@given(st.binary(max_size=64), st.integers(1, 10_000))
def test_the_partition_is_the_default_partitioners(key, partitions):
    assert partition_for_key(key, partitions) == (kafka_python_murmur2(key) & 0x7FFFFFFF) % partitions


def test_a_key_of_any_length_is_hashed_alike_and_the_readers_kept_are_bounded():
    """Keys come from clients we do not control: lengths up to the message limit, each its own."""
    for n in (64 * 1024 + 3, *range(1000, 1400)):
        key = os.urandom(n)
        assert murmur2(key) == kafka_python_murmur2(key)
    assert _words.cache_info().currsize <= _words.cache_info().maxsize
