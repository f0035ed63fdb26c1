"""Codec benchmark: encode + decode of a Record holding a 1 MiB float32 tensor.

The baseline is one numpy copy of the same bytes, measured in the same run, so the ratio says
how many copies' worth of time a round trip costs on this machine. Goal: ratio <= 3.
"""

import timeit
from collections.abc import Callable

import numpy as np

from tensorline.schemas import ModelRef, Record, decode_record, encode_record

TENSOR_BYTES = 1 << 20
NUMBER = 200  # calls per timing: ~10 ms each, long enough to swamp timer resolution
REPEAT = 15  # timings per case; the minimum is the least-disturbed one
WARMUP = 20  # calls before timing: first-call caches, allocator steady state


def best_us(cases: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Microseconds per call of each case: the minimum over REPEAT timings of NUMBER calls.

    The cases take turns within each round, so a slow spell on the machine hits all of them.
    """
    for fn in cases.values():
        for _ in range(WARMUP):
            fn()
    best = {case: float("inf") for case in cases}
    for _ in range(REPEAT):
        for case, fn in cases.items():
            best[case] = min(best[case], timeit.timeit(fn, number=NUMBER) / NUMBER * 1e6)
    return best


def main() -> None:
    arr = np.random.default_rng(0).random(TENSOR_BYTES // 4, dtype=np.float32).reshape(512, 512)
    record = Record(
        record_id="bench-0",
        source="bench",
        ingest_ts_ms=1_700_000_000_000,
        tensors={"image": arr},
        stage="ingest",
        attributes={"modality": "CT"},
        label="normal",
        model=ModelRef("resnet", "1"),
    )
    message = bytes(encode_record(record))  # as a Kafka consumer receives it
    assert decode_record(message).tensors["image"].tobytes() == arr.tobytes()

    us = best_us(
        {
            "numpy copy (1 MiB)": arr.copy,
            "encode_record": lambda: encode_record(record),
            "decode_record": lambda: decode_record(message),
            "encode + decode": lambda: decode_record(encode_record(record)),
        }
    )
    copy_us = us["numpy copy (1 MiB)"]
    print(f"{'case':<22}{'us':>10}{'x copy':>10}")
    for case, case_us in us.items():
        print(f"{case:<22}{case_us:>10.1f}{case_us / copy_us:>10.2f}")
    print(
        f"bench codec: roundtrip_vs_copy={us['encode + decode'] / copy_us:.2f} "
        f"encode_us={us['encode_record']:.1f} decode_us={us['decode_record']:.1f} "
        f"copy_us={copy_us:.1f}"
    )


if __name__ == "__main__":
    main()
