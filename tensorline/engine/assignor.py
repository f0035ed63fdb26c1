"""Capacity-aware partition assignment: a stage's partitions shared among its workers in proportion
to what each can process, moving as few partitions as possible at each rebalance.

`assign` is the placement, a pure function. `CapacityAssignor` carries it onto Kafka's group
protocol: each member advertises its capacity in the subscription's user data, the group leader
places the partitions, and moves are staged the KIP-429 COOPERATIVE way (a partition is revoked by
its owner in one rebalance and assigned to its new owner in the follow-up one). A member whose
measured capacity has moved away from the one it advertised asks the group to place again
(`CapacityAssignor.watch`): nothing else would, as long as no member joins or leaves.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from fractions import Fraction
from typing import Any, TypeVar

from kafka.coordinator.assignors.abstract import AbstractPartitionAssignor, RebalanceProtocol
from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription
from kafka.structs import TopicPartition

from tensorline import logs

P = TypeVar("P", bound=Hashable)  # a partition: TopicPartition, or any sortable (topic, partition)
M = TypeVar("M", bound=str)  # a member id

# The user data's own version: a newer one is read with this format (fields are only ever added),
# the rule Kafka applies to the consumer protocol itself.
USER_DATA_VERSION = 1
# Subscription schema 1 added OwnedPartitions (KIP-429), 2 added GenerationId: the leader learns
# what each member owns, and which of two claims on a partition is stale, from Kafka's own fields.
SUBSCRIPTION_VERSION = 2
# "Records/s over the last minutes": a sample two minutes old weighs half as much as a new one.
DEFAULT_HALF_LIFE_S = 120.0
# Less processing time than this is noise (the first batches also pay model warm-up): until then a
# worker advertises no measured capacity and the leader gives it the mean of the others.
MIN_MEASURED_BUSY_S = 5.0
# A member compares what it measures with what it advertised this often (a few heartbeats)...
REMEASURE_EVERY_S = 5.0
# ...and asks the group to place again when it first has a measurement, or when the measurement
# is this much higher or lower than the advertised one: well above the drift of a rate averaged
# over minutes of batches, and a worker a quarter slower than it said is overloaded by as much.
REMEASURE_CHANGE = 0.25
# Not sooner than this after its last join, whatever the measurement says: every rebalance pauses
# the whole group for a round trip or two, and the rate needs new batches to move anyway.
MIN_REJOIN_INTERVAL_S = 30.0

# A leftover partition stays with its owner unless another member's remainder (how far its exact
# share is above its floor) is larger by more than a tenth of a partition: a margin for the noise
# of measured capacities, not a reason to keep a worse split. Before, owners came first whatever
# the remainders: a 3:1 pair measured a hair under 3x stayed at 5:3 of 8 (the fast one's 0.99 of
# a partition lost to the slow one's 0.01), and 148 vs 58 records/s stayed at 8:4 of 12, not 9:3
# (whose slowest member finishes a backlog 12% sooner).
STICKY_REMAINDER = Fraction(1, 10)


class BadUserData(ValueError):
    """A member's subscription user data is missing or is not this assignor's encoding."""


# -- placement (pure) ----------------------------------------------------------------------------

def _weight(capacity: float) -> Fraction:
    """The capacity as an exact rational; NaN, infinite, zero and negative all weigh nothing."""
    try:
        c = float(capacity)
    except (TypeError, ValueError):
        return Fraction(0)
    return Fraction(c) if math.isfinite(c) and c > 0 else Fraction(0)


def quotas(n_partitions: int, capacities: Mapping[M, float], owned: Mapping[M, int]) -> dict[M, int]:
    """How many partitions each member gets: the floor or ceiling of its exact proportional share.

    The ceilings left over after the floors go by largest remainder (the fraction of a partition
    above the floor), a member that already owns more than its floor counting STICKY_REMAINDER
    more (its ceiling saves a move), then to such a member, then by member id. All capacities
    invalid or zero: equal shares.
    """
    members = sorted(capacities)
    weights = {m: _weight(capacities[m]) for m in members}
    total = sum(weights.values())
    if total == 0:
        weights, total = {m: Fraction(1) for m in members}, Fraction(len(members))
    exact = {m: n_partitions * weights[m] / total for m in members}
    quota = {m: math.floor(exact[m]) for m in members}
    extra = n_partitions - sum(quota.values())
    fractional = [m for m in members if exact[m] != quota[m]]
    keeps = {m: owned.get(m, 0) > quota[m] for m in members}
    fractional.sort(key=lambda m: (-(exact[m] - quota[m] + (STICKY_REMAINDER if keeps[m] else 0)), not keeps[m], m))
    for m in fractional[:extra]:
        quota[m] += 1
    return quota


def assign(partitions: Iterable[P], capacities: Mapping[M, float],
           previous: Mapping[M, Iterable[P]]) -> dict[M, list[P]]:
    """Every partition to exactly one member, each member's count within one of its proportional
    share, previous owners keeping their partitions up to their new quota.

    Only a member's excess over its quota and the partitions nobody current owns (new, or owned
    by a member that left) move. A partition claimed by several members stays with the first by
    member id; claims on unknown partitions and by unknown members are ignored. Deterministic.
    """
    members = sorted(capacities)
    pool = sorted(set(partitions))
    if not members:
        return {}
    known, claims = set(pool), {}
    for m in members:
        mine = sorted(p for p in set(previous.get(m, ())) if p in known and p not in claims)
        claims.update((p, m) for p in mine)
    owned: dict[M, list[P]] = {m: [] for m in members}
    for p, m in sorted(claims.items()):
        owned[m].append(p)
    quota = quotas(len(pool), capacities, {m: len(owned[m]) for m in members})
    result = {m: owned[m][:quota[m]] for m in members}
    kept = {p for ps in result.values() for p in ps}
    free = [p for p in pool if p not in kept]
    # Deal the free partitions round-robin over the members still short, so consecutive
    # partitions (and topics) spread out instead of filling one member at a time.
    short = {m: quota[m] - len(result[m]) for m in members}
    order = [m for r in range(max(short.values(), default=0)) for m in members if short[m] > r]
    for p, m in zip(free, order, strict=True):
        result[m].append(p)
    return {m: sorted(ps) for m, ps in result.items()}


def withhold_moves(target: Mapping[M, Iterable[P]], owners: Mapping[P, M]) -> dict[M, list[P]]:
    """The first COOPERATIVE round towards `target`: a partition another current member still owns
    is left out, so its owner revokes it now and the follow-up rebalance hands it over."""
    return {m: sorted(p for p in ps if owners.get(p, m) == m or owners[p] not in target)
            for m, ps in target.items()}


# -- user data -----------------------------------------------------------------------------------

def encode_user_data(capacity: float | None) -> bytes:
    """The subscription user data: this member's capacity, None while it is not known yet."""
    if capacity is not None and not (math.isfinite(capacity) and capacity >= 0):
        capacity = None
    return json.dumps({"v": USER_DATA_VERSION, "capacity": capacity}, separators=(",", ":")).encode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a capacity")


def decode_user_data(data: bytes | bytearray | memoryview | None) -> float | None:
    """A member's advertised capacity (None: not known yet); BadUserData if missing or foreign."""
    if not data:
        raise BadUserData("no user data")
    try:
        body = json.loads(bytes(data), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadUserData(f"not JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("v"), int) or body["v"] < USER_DATA_VERSION:
        raise BadUserData(f"not tensorline-capacity user data version >= {USER_DATA_VERSION}")
    capacity = body.get("capacity")
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int | float):
        raise BadUserData(f"capacity {capacity!r} is not a number")
    return float(capacity)


def _encode_assignment_user_data(pending: bool) -> bytes:
    return json.dumps({"v": USER_DATA_VERSION, "pending": pending}, separators=(",", ":")).encode()


def _pending(data: bytes | bytearray | memoryview | None) -> bool:
    try:
        return bool(json.loads(bytes(data or b"{}")).get("pending", False))
    except (ValueError, AttributeError):
        return False


# -- measured capacity ---------------------------------------------------------------------------

class Throughput:
    """Records per second of processing time, exponentially weighted over wall-clock time.

    Processing time, not wall time: a worker given few partitions idles, and its rate per wall
    second would shrink its share further at every rebalance.
    """

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S, min_busy_s: float = MIN_MEASURED_BUSY_S):
        self.half_life_s, self.min_busy_s = half_life_s, min_busy_s
        self._records = self._busy = 0.0
        self._at: float | None = None
        self._lock = threading.Lock()

    def observe(self, records: int, busy_s: float, *, now: float | None = None) -> None:
        """Count `records` processed in `busy_s` seconds of processing."""
        if records < 0 or not busy_s >= 0 or not math.isfinite(busy_s):
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._at is not None:
                decay = 0.5 ** (max(0.0, now - self._at) / self.half_life_s)
                self._records, self._busy = self._records * decay, self._busy * decay
            self._records += records
            self._busy += busy_s
            self._at = now

    def rate(self) -> float | None:
        """Records/s of processing, or None while too little has been processed to tell (or when
        nothing was: busy time without a record is a frozen or failing worker, not a capacity of 0,
        which would leave it without partitions, and so without a chance to measure, for good)."""
        with self._lock:
            return self._records / self._busy if self._busy >= self.min_busy_s and self._records > 0 else None


# -- the group protocol --------------------------------------------------------------------------

class CapacityAssignor(AbstractPartitionAssignor):
    """Partitions in proportion to capacity, sticky, COOPERATIVE (KIP-429).

    Pass an instance: ``partition_assignment_strategy=[CapacityAssignor(2.0)]`` (kafka-python uses
    an instance as is and instantiates a class). The capacity is the `declared` one if given, else
    the measured `Throughput` (fed by `observe`, or pulled from `measure` at each join), else
    unknown, and the leader gives an unknown member the mean of the others. Declare capacities on
    all members of a group or on none: a weight and a records/s rate are not comparable.

    COOPERATIVE works in this kafka-python: the coordinator revokes what a member lost and rejoins
    by itself; the assignor only has to leave moving partitions out of the first round, as its
    CooperativeStickyAssignor does. The capacities of that round are advertised again in the
    follow-up (the leader marks the assignment "pending"), so the follow-up only completes moves.

    A group rebalances only when a member joins or leaves, so a measured capacity would wait for
    one: `watch` makes the member rejoin once its measurement is new or has moved (`remeasured`).
    """

    name = "tensorline-capacity"
    version = SUBSCRIPTION_VERSION

    def __init__(self, capacity: float | None = None, *, measure: Callable[[], tuple[int, float]] | None = None,
                 half_life_s: float = DEFAULT_HALF_LIFE_S, min_rejoin_interval_s: float = MIN_REJOIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, log: Any = None):
        if capacity is not None and not (math.isfinite(capacity) and capacity >= 0):
            raise ValueError(f"capacity must be a finite number >= 0, not {capacity!r}")
        self.declared = capacity
        self.throughput = Throughput(half_life_s)
        # Cumulative (records, processing seconds) counters, e.g. the runtime's Stats; sampled at
        # each join, the difference since the last sample is observed.
        self.measure = measure
        self.log = log or logs.get("tensorline.assignor")
        self.owned: list[TopicPartition] = []
        self.generation = -1
        self._measured_until: tuple[int, float] = (0, 0.0)
        self._sampling = threading.Lock()  # sampled at joins and by the watch thread
        self._advertised: float | None = None
        self._joined_at: float | None = None  # when this member last sent its subscription
        self._hold = False  # a cooperative move is half done: advertise the same capacity again
        self.min_rejoin_interval_s, self.clock = min_rejoin_interval_s, clock

    def supported_protocols(self) -> list[RebalanceProtocol]:
        return [RebalanceProtocol.COOPERATIVE]

    def observe(self, records: int, busy_s: float) -> None:
        """Count `records` processed in `busy_s` seconds; used from the next join on."""
        self.throughput.observe(records, busy_s)

    @property
    def capacity(self) -> float | None:
        """What this member advertises at its next join (unless a cooperative move is pending)."""
        return self.declared if self.declared is not None else self.throughput.rate()

    def _sample(self) -> None:
        if self.measure is None:
            return
        with self._sampling:
            records, busy = self.measure()
            last_records, last_busy = self._measured_until
            if records >= last_records and busy >= last_busy:
                self.throughput.observe(records - last_records, busy - last_busy)
            self._measured_until = (records, busy)

    def remeasured(self) -> bool:
        """Whether the group should place its partitions again for this member's sake: it has a
        measured capacity and advertised none at its last join, or what it measures now differs
        from what it advertised by more than REMEASURE_CHANGE (and that join is at least
        `min_rejoin_interval_s` old). Never for a declared capacity, nor while a cooperative move
        is half done (the follow-up round comes by itself)."""
        if self.declared is not None or self._hold or self._joined_at is None:
            return False
        self._sample()
        measured = self.throughput.rate()
        if measured is None:
            return False
        if self._advertised is None:
            return True
        if self.clock() - self._joined_at < self.min_rejoin_interval_s:
            return False
        return abs(measured - self._advertised) > REMEASURE_CHANGE * self._advertised

    def watch(self, consumer: Any, stop: threading.Event, every_s: float = REMEASURE_EVERY_S) -> threading.Thread:
        """Every `every_s` until `stop` is set, ask `consumer` (the KafkaConsumer this assignor
        serves) to rejoin its group when `remeasured` says so; it rejoins at its next poll, where
        every member advertises what it measures then."""
        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    if self.remeasured():
                        self.log.info("measured capacity moved: rejoining the group", advertised=self._advertised,
                                      measured=round(self.throughput.rate() or 0.0, 3))
                        request_rejoin(consumer)
                except Exception:  # e.g. a kafka-python without the coordinator request_rejoin reaches
                    self.log.exception("capacity watch failed: a measured capacity now waits for the next join")
                    return

        thread = threading.Thread(target=loop, name="capacity-watch", daemon=True)
        thread.start()
        return thread

    # -- member side --
    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolSubscription:
        self._sample()
        self._joined_at = self.clock()
        if not self._hold:
            self._advertised = self.capacity
        by_topic: dict[str, list[int]] = defaultdict(list)
        for tp in self.owned:
            by_topic[tp.topic].append(tp.partition)
        owned = [ConsumerProtocolSubscription.TopicPartition(topic=t, partitions=sorted(ps))
                 for t, ps in sorted(by_topic.items())]
        return ConsumerProtocolSubscription(version=self.version, topics=sorted(topics),
                                            user_data=encode_user_data(self._advertised),
                                            owned_partitions=owned, generation_id=self.generation)

    def on_assignment(self, assignment: ConsumerProtocolAssignment, generation: int) -> None:
        self.owned = assignment.partitions()
        self.generation = generation
        self._hold = _pending(assignment.user_data)

    # -- leader side --
    def assign(self, cluster: Any, members: list[Any]) -> dict[str, ConsumerProtocolAssignment]:
        """Decode every member's subscription, place the partitions, stage the moves."""
        subscription = {m.member_id: m.metadata for m in members}
        capacities = self._capacities(subscription)
        owners = self._owners(subscription)

        subscribers: dict[str, set[str]] = defaultdict(set)
        for member_id, sub in subscription.items():
            for topic in sub.topics:
                subscribers[topic].add(member_id)
        # Topics with the same subscribers are placed together, so each member's total is
        # proportional, not just its share of each topic.
        topic_groups: dict[frozenset[str], list[TopicPartition]] = defaultdict(list)
        for topic, ids in sorted(subscribers.items()):
            numbers = cluster.partitions_for_topic(topic)
            if numbers is None:
                self.log.warning("no partition metadata for topic; not assigned", topic=topic)
                continue
            topic_groups[frozenset(ids)].extend(TopicPartition(topic, p) for p in sorted(numbers))

        target: dict[str, list[TopicPartition]] = {m: [] for m in subscription}
        for ids, tps in topic_groups.items():
            previous: dict[str, list[TopicPartition]] = defaultdict(list)
            for tp in tps:
                if tp in owners and owners[tp] in ids:
                    previous[owners[tp]].append(tp)
            for member_id, got in assign(tps, {m: capacities[m] for m in ids}, previous).items():
                target[member_id].extend(got)

        first_round = withhold_moves(target, owners)
        pending = first_round != {m: sorted(ps) for m, ps in target.items()}
        self.log.info("partitions assigned", pending_moves=pending,
                      members={m: {"capacity": round(capacities[m], 3), "partitions": len(target[m]),
                                   "now": len(first_round[m])} for m in sorted(target)})
        user_data = _encode_assignment_user_data(pending)
        return {m: ConsumerProtocolAssignment(0, _by_topic(first_round[m]), user_data) for m in subscription}

    def _capacities(self, subscription: Mapping[str, Any]) -> dict[str, float]:
        """Each member's capacity; a member with missing or foreign user data, or none measured
        yet, gets the mean of the others (all unknown: equal)."""
        known: dict[str, float] = {}
        for member_id, sub in sorted(subscription.items()):
            try:
                capacity = decode_user_data(sub.user_data)
            except BadUserData as e:
                self.log.warning("member's capacity unreadable; using the mean of the others",
                                 member_id=member_id, reason=str(e))
                continue
            if capacity is not None:
                known[member_id] = max(0.0, capacity) if math.isfinite(capacity) else 0.0
        mean = sum(known.values()) / len(known) if known else 1.0
        return {m: known.get(m, mean) for m in subscription}

    @staticmethod
    def _owners(subscription: Mapping[str, Any]) -> dict[TopicPartition, str]:
        """Who owns each partition now; of two claims, the newer generation's wins (the other
        member was thrown out of the group and does not know yet), then the lower member id."""
        owners: dict[TopicPartition, str] = {}
        claimants = sorted(subscription, key=lambda m: (-getattr(subscription[m], "generation_id", -1), m))
        for member_id in claimants:
            for owned in getattr(subscription[member_id], "owned_partitions", None) or ():
                for p in owned.partitions:
                    owners.setdefault(TopicPartition(owned.topic, p), member_id)
        return owners


def request_rejoin(consumer: Any) -> None:
    """Make a KafkaConsumer rejoin its group at its next poll, as the Java client's
    enforceRebalance (KIP-568) does. kafka-python 3.0 has no public call for it; its coordinator's
    request_rejoin only sets the flag that poll acts on, so any thread may call it."""
    consumer._coordinator.request_rejoin()


def _by_topic(tps: Iterable[TopicPartition]) -> list[tuple[str, list[int]]]:
    by_topic: dict[str, list[int]] = defaultdict(list)
    for tp in tps:
        by_topic[tp.topic].append(tp.partition)
    return sorted((t, sorted(ps)) for t, ps in by_topic.items())
