"""Replaying a stage: from a point in its input topic, either in place or into a new version.

The start is a time (offsets-for-times: the first offset whose timestamp is at or after it), an
offset per partition ("P:O"), or the earliest offset. Two modes:

- `reset`: moves the stage's consumer group(s) back to the start offsets; the running pipeline
  then reprocesses everything from there into the live topics. Kafka only lets an empty group's
  offsets move, so it refuses while the group has live members, naming them.
- `into_version`: replays the stage and every stage downstream of it into versioned topics
  (`<topic>.v2`, groups `<group>.v2`, the replayed stages' changelogs and the DLQ versioned too),
  so the live topics and groups are untouched. The stage reads its live input from the start
  offsets to the end offsets fixed when the replay starts (or the offsets of `end`, a time) and
  stops; each downstream stage drains its versioned input once everything upstream has stopped.
  All run in this process, one thread per stage (and model), on the real runtime
  (`engine.worker.run`).
  Where a replayed output no stage reads holds decisions (FusedResult records, as fusion
  writes), the versioned decisions are compared with the live ones (`diff`).

Offsets count transaction markers too (one per partition per transaction), so "records" in a
plan, end minus start, is an upper bound on the records reprocessed.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from typing import Any, Literal, Union

from kafka import TopicPartition
from kafka.admin import OffsetSpec, OffsetTimestamp
from kafka.errors import NoError
from kafka.structs import OffsetAndMetadata

from tensorline.config import ConfigError, PipelineConfig, changelog_topics
from tensorline.engine import clients
from tensorline.engine.plugins import PER_MODEL_KINDS
from tensorline.schemas import FUSED_RESULT, CodecError, decode

EARLIEST = "earliest"
# A start: a time, explicit offsets (partition -> offset), or the earliest offset of each partition.
Start = Union[datetime, Mapping[int, int], Literal["earliest"]]
VERSION = re.compile(r"v\d+")
# How often the replay looks at its worker threads: a replay takes seconds at least.
SUPERVISE_INTERVAL_S = 0.2
# A worker asked to stop (after another failed) finishes its batch in flight; a minute covers a slow model.
STOP_TIMEOUT_S = 60.0


class ReplayError(RuntimeError):
    """A replay that cannot run as asked; the message says why and what to do."""


class GroupActive(ReplayError):
    """The consumer group has live members, so its committed offsets cannot be moved."""


def parse_datetime(text: str) -> datetime:
    """An ISO 8601 time ("2025-03-01T14:00", "...+02:00"); without a zone it is local time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2025-03-01T14:00:00+00:00") from None
    return value if value.tzinfo else value.astimezone()


def parse_offsets(specs: Iterable[str]) -> dict[int, int]:
    """ "P:O" strings (partition:offset) as {partition: offset}."""
    out: dict[int, int] = {}
    for spec in specs:
        m = re.fullmatch(r"(\d+):(\d+)", spec.strip())
        if not m:
            raise ValueError(f"{spec!r} is not PARTITION:OFFSET, e.g. 0:1200")
        out[int(m[1])] = int(m[2])
    return out


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


@dataclass(frozen=True)
class PartitionPlan:
    """One partition of a stage group's input: where the group is and what a replay would read."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here
    start: int
    end: int

    @property
    def records(self) -> int:
        """Offsets from start to end: records plus transaction markers, so an upper bound."""
        return max(0, self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "records": self.records}


def stage_groups(cfg: PipelineConfig, stage: str, model: str | None = None) -> list[tuple[str | None, str]]:
    """(model, consumer group) of a stage: one per model for per-model stages (all of them, or
    `model`), else the stage's single group."""
    if stage not in cfg.stages:
        raise ConfigError(cfg.path, f"stages.{stage}", f"one of the stages {', '.join(cfg.stages)}")
    if cfg.stages[stage].kind not in PER_MODEL_KINDS:
        return [(None, cfg.group_id(stage))]
    if model is not None:
        cfg.model(stage, model)  # raises ConfigError naming the stage's models
        return [(model, cfg.group_id(stage, model))]
    return [(m.name, cfg.group_id(stage, m.name)) for m in cfg.stages[stage].models]


def _partitions(admin, topic: str) -> list[TopicPartition]:
    [described] = admin.describe_topics([topic])
    if described["error_code"] or not described["partitions"]:
        raise ReplayError(f"topic {topic} does not exist (create the pipeline's topics first)")
    return sorted(TopicPartition(topic, p["partition_index"]) for p in described["partitions"])


def _offsets(admin, tps: Iterable[TopicPartition], spec: int) -> dict[TopicPartition, int]:
    """ListOffsets for `spec` (an OffsetSpec or OffsetTimestamp); a time past the last record
    gives -1, which becomes the log-end offset."""
    tps = list(tps)
    found = {tp: o.offset for tp, o in admin.list_partition_offsets({tp: spec for tp in tps}).items()}
    missing = [tp for tp, o in found.items() if o < 0]
    if missing:
        found.update(_offsets(admin, missing, OffsetSpec.LATEST))
    return found


def _starts(admin, tps: list[TopicPartition], start: Start) -> dict[TopicPartition, int]:
    if start == EARLIEST:
        return _offsets(admin, tps, OffsetSpec.EARLIEST)
    if isinstance(start, datetime):
        return _offsets(admin, tps, OffsetTimestamp(_ms(start)))
    if not isinstance(start, Mapping) or not start:
        raise ReplayError(f"a start is a time, partition offsets or {EARLIEST!r}, got {start!r}")
    by_partition = {tp.partition: tp for tp in tps}
    unknown = sorted(set(start) - set(by_partition))
    if unknown:
        raise ReplayError(f"topic {tps[0].topic} has partitions 0-{len(tps) - 1}, not {unknown}")
    chosen = [by_partition[p] for p in sorted(start)]
    earliest, latest = _offsets(admin, chosen, OffsetSpec.EARLIEST), _offsets(admin, chosen, OffsetSpec.LATEST)
    for tp in chosen:
        if not earliest[tp] <= start[tp.partition] <= latest[tp]:
            raise ReplayError(f"offset {start[tp.partition]} is outside {tp.topic}/{tp.partition}, which holds "
                              f"offsets {earliest[tp]} to {latest[tp]}")
    return {tp: start[tp.partition] for tp in chosen}


def _plan(admin, cfg: PipelineConfig, stage: str, groups: list[str], start: Start,
          end: datetime | None) -> list[PartitionPlan]:
    if isinstance(start, datetime) and end is not None and end <= start:
        raise ReplayError(f"the end {end.isoformat()} is not after the start {start.isoformat()}")
    tps = _partitions(admin, cfg.topic(cfg.stages[stage].input).name)
    starts = _starts(admin, tps, start)
    ends = _offsets(admin, starts, OffsetTimestamp(_ms(end)) if end else OffsetSpec.LATEST)
    committed = clients.with_coordinator(lambda: admin.list_group_offsets({g: list(starts) for g in groups}))
    out = []
    for g in groups:
        for tp in starts:
            c = committed.get(g, {}).get(tp)
            out.append(PartitionPlan(g, tp.topic, tp.partition, c.offset if c and c.offset >= 0 else None,
                                     starts[tp], max(starts[tp], ends[tp])))
    return out


def plan(cfg: PipelineConfig, stage: str, model: str | None, start: Start,
         end: datetime | None = None) -> list[PartitionPlan]:
    """Per group and partition of the stage's input: committed, start and end offsets (end: the
    log-end offset now, or the first offset at or after `end`), and the offsets in between."""
    admin = clients.admin(cfg)
    try:
        return _plan(admin, cfg, stage, [g for _, g in stage_groups(cfg, stage, model)], start, end)
    finally:
        admin.close()


def format_plan(plans: list[PartitionPlan]) -> str:
    lines = [f"{'GROUP':<32}{'PARTITION':>10}{'COMMITTED':>12}{'START':>10}{'END':>10}{'RECORDS':>10}"]
    for p in plans:
        committed = "-" if p.committed is None else str(p.committed)
        lines.append(f"{p.group:<32}{p.partition:>10}{committed:>12}{p.start:>10}{p.end:>10}{p.records:>10}")
    lines.append(f"{'total':<32}{'':>42}{sum(p.records for p in plans):>10}")
    lines.append("RECORDS = END - START; transaction markers take offsets too, so it is an upper bound.")
    return "\n".join(lines)


def _refuse_live(admin, groups: list[str]) -> None:
    """GroupActive naming the members of any of `groups` that has some."""
    busy = []
    for group, d in clients.with_coordinator(lambda: admin.describe_groups(groups)).items():
        if d.get("members"):
            members = ", ".join(f"{m['client_id']} ({m['client_host'].lstrip('/')})" for m in d["members"])
            busy.append(f"group {group} has {len(d['members'])} live member(s): {members}")
    if busy:
        raise GroupActive("; ".join(busy) + ". Stop the stage's workers first, or replay into a version "
                          "(--into-version) while they run.")


def _commit_offsets(admin, group: str, offsets: Mapping[TopicPartition, int]) -> None:
    result = admin.alter_group_offsets(group, {tp: OffsetAndMetadata(o, "", None) for tp, o in offsets.items()})
    failed = {f"{tp.topic}/{tp.partition}": e.__name__ for tp, e in result.items() if e is not NoError}
    if failed:
        raise ReplayError(f"group {group}: the broker refused the new offsets {failed} "
                          "(did a worker join meanwhile? it must be stopped)")


def reset(cfg: PipelineConfig, stage: str, model: str | None, start: Start) -> list[PartitionPlan]:
    """Move the stage's group(s) (one model's with `model`, else every model's) to the start
    offsets; refuses (GroupActive) while any of them has live members. Returns the plan carried
    out: each partition's committed offset before the reset and its new one (start)."""
    groups = [g for _, g in stage_groups(cfg, stage, model)]
    admin = clients.admin(cfg)
    try:
        _refuse_live(admin, groups)
        plans = _plan(admin, cfg, stage, groups, start, None)
        for g in groups:
            _commit_offsets(admin, g, {TopicPartition(p.topic, p.partition): p.start for p in plans if p.group == g})
        return plans
    finally:
        admin.close()


# -- into a version ------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionedPipeline(PipelineConfig):
    """The pipeline as a versioned replay sees it: some topics renamed, every group versioned."""

    version: str = ""

    def group_id(self, stage: str, model: str | None = None) -> str:
        return f"{super().group_id(stage, model)}.{self.version}"


def downstream(cfg: PipelineConfig, stage: str) -> list[str]:
    """The stage and every stage fed by it, directly or not, upstream ones first."""
    chain, i = [stage], 0
    while i < len(chain):
        output = cfg.stages[chain[i]].output
        chain += [s for s, c in cfg.stages.items() if c.input == output and s not in chain]
        i += 1
    return chain


def versioned(cfg: PipelineConfig, stage: str, version: str) -> tuple[VersionedPipeline, list[str], list[str]]:
    """The versioned pipeline, the stages replayed, and the keys of the topics renamed: the
    replayed stages' outputs and changelogs, and the DLQ."""
    if not VERSION.fullmatch(version):
        raise ReplayError(f"a version is v followed by a number (v2), got {version!r}")
    stage_groups(cfg, stage)
    chain = downstream(cfg, stage)
    changelogs = changelog_topics(cfg)
    keys = list(dict.fromkeys([cfg.stages[s].output for s in chain] + [changelogs[s] for s in chain if s in changelogs]
                              + [cfg.dlq]))
    topics_ = {k: replace(t, name=f"{t.name}.{version}") if k in keys else t for k, t in cfg.topics.items()}
    base = {f.name: getattr(cfg, f.name) for f in fields(PipelineConfig)}
    return VersionedPipeline(**{**base, "topics": topics_}, version=version), chain, keys


@dataclass
class _Run:
    """One worker thread of the replay."""

    stage: str
    model: str | None
    stop: threading.Event
    thread: threading.Thread | None = None
    stats: Any = None
    error: BaseException | None = None


def _run_workers(vcfg: VersionedPipeline, chain: list[str], bounds: Mapping[tuple[str, int], int]) -> list[_Run]:
    """The chain's workers in threads: the first bounded by `bounds`, each later one drained once
    every stage writing its input has stopped. Raises ReplayError if a worker fails."""
    from tensorline.engine import worker

    drains = {s: threading.Event() for s in chain[1:]}
    upstream = {s: [u for u in chain if vcfg.stages[u].output == vcfg.stages[s].input] for s in chain[1:]}
    runs: list[_Run] = []
    for s in chain:
        for model, _ in stage_groups(vcfg, s):
            run = _Run(s, model, threading.Event())
            bound = {"end_offsets": bounds} if s == chain[0] else {"drain": drains[s]}

            def target(run: _Run = run, bound: dict = bound) -> None:
                try:
                    run.stats = worker.run(vcfg, run.stage, model=run.model, device=vcfg.stages[run.stage].devices[0],
                                           stop=run.stop, metrics_port=None, **bound)
                except BaseException as e:  # reported by the supervising thread
                    run.error = e

            run.thread = threading.Thread(target=target, name=f"replay-{s}-{model or ''}", daemon=True)
            runs.append(run)
    for run in runs:
        run.thread.start()
    try:
        while any(r.thread.is_alive() for r in runs):
            _raise_failed(runs)
            for s, event in drains.items():
                if not event.is_set() and not any(r.thread.is_alive() for r in runs if r.stage in upstream[s]):
                    event.set()
            time.sleep(SUPERVISE_INTERVAL_S)
    except BaseException:
        for r in runs:
            r.stop.set()
        for r in runs:
            r.thread.join(STOP_TIMEOUT_S)
        raise
    _raise_failed(runs)
    return runs


def _raise_failed(runs: list[_Run]) -> None:
    failed = next((r for r in runs if r.error is not None), None)
    if failed:
        name = failed.stage + (f"/{failed.model}" if failed.model else "")
        raise ReplayError(f"replay worker {name} failed: {failed.error!r}") from failed.error


def into_version(cfg: PipelineConfig, stage: str, version: str, start: Start,
                 end: datetime | None = None) -> dict[str, Any]:
    """Replay `stage` and everything downstream into `version`'s topics and groups; live topics and
    groups are not touched. Returns the plan, the topics written, per-worker counts, and the diff
    of decisions against the live ones when a replayed output holds decisions (else None)."""
    vcfg, chain, keys = versioned(cfg, stage, version)
    new_topics = {cfg.topic(k).name: vcfg.topic(k).name for k in keys}
    vgroups = [g for s in chain for _, g in stage_groups(vcfg, s)]
    admin = clients.admin(cfg)
    try:
        exists = sorted(set(new_topics.values()) & set(admin.list_topics()))
        if exists:
            raise ReplayError(f"version {version} exists already (topics {', '.join(exists)}): choose another "
                              "version, or delete these topics first")
        plans = _plan(admin, cfg, stage, [g for _, g in stage_groups(cfg, stage)], start, end)
        _refuse_live(admin, vgroups)
        stale = [g for g in vgroups if g in {d["group_id"] for d in clients.with_coordinator(admin.list_groups)}]
        if stale:  # left by a deleted version: their offsets would skip records of the new topics
            clients.with_coordinator(lambda: admin.delete_groups(stale))
        tps = _partitions(admin, cfg.topic(cfg.stages[stage].input).name)
        log_end = _offsets(admin, tps, OffsetSpec.LATEST)
        bounds = {tp: (log_end[tp], log_end[tp]) for tp in tps}  # partitions not replayed: nothing to read
        bounds.update({TopicPartition(p.topic, p.partition): (p.start, p.end) for p in plans})
        clients.create_topics(replace(vcfg, topics={k: vcfg.topics[k] for k in keys}))
        for _, group in stage_groups(vcfg, stage):
            _commit_offsets(admin, group, {tp: s for tp, (s, _) in bounds.items()})
    finally:
        admin.close()
    runs = _run_workers(vcfg, chain, {(tp.topic, tp.partition): e for tp, (_, e) in bounds.items()})
    result: dict[str, Any] = {
        "version": version, "stages": chain, "topics": new_topics, "groups": vgroups,
        "plan": [p.to_dict() for p in plans],
        "workers": [{"stage": r.stage, "model": r.model, "records_in": r.stats.records_in,
                     "records_out": r.stats.records_out, "dead_letters": r.stats.dead_letters} for r in runs],
        "diff": None,
    }
    for key in _final_outputs(cfg, chain):
        new = _decisions(vcfg, vcfg.topic(key).name)
        if new:
            covered = _record_ids(cfg, cfg.topic(cfg.stages[stage].input).name,
                                  {tp.partition: b for tp, b in bounds.items()})
            result["diff"] = diff(cfg.topic(key).name, vcfg.topic(key).name, _decisions(cfg, cfg.topic(key).name),
                                  new, covered)
            break
    return result


def _final_outputs(cfg: PipelineConfig, chain: list[str]) -> list[str]:
    """The keys of the chain's outputs that no stage of the pipeline reads (its results)."""
    inputs = {s.input for s in cfg.stages.values()}
    return [k for k in dict.fromkeys(cfg.stages[s].output for s in chain) if k not in inputs]


def _record_ids(cfg: PipelineConfig, topic: str, bounds: Mapping[int, tuple[int, int]]) -> set[str]:
    """The record ids in `topic` from start to end offset per partition: every tensorline message
    (Record, Detection, FusedResult) carries one."""
    ids = set()
    read = {p: b for p, b in bounds.items() if b[1] > b[0]}
    for rec in clients.read_range(cfg, topic, partitions=read, start={p: s for p, (s, _) in read.items()},
                                  end={p: e for p, (_, e) in read.items()}):
        try:
            ids.add(decode(rec.value)[1]["record_id"])
        except CodecError:  # a bad record went to the DLQ in the replay as it did live
            continue
    return ids


def _decisions(cfg: PipelineConfig, topic: str) -> dict[str, str]:
    """record id -> the latest decision among the FusedResult records of `topic` (a reset replay
    may have repeated one); other records hold no decision."""
    out = {}
    for rec in clients.read_range(cfg, topic):
        try:
            name, datum = decode(rec.value)
        except CodecError:
            continue
        if name == FUSED_RESULT:
            out[datum["record_id"]] = datum["decision"]
    return out


def diff(live_topic: str, new_topic: str, live: Mapping[str, str], new: Mapping[str, str],
         covered: set[str] | None = None) -> dict[str, Any]:
    """Decisions (record id -> decision) on the live topic against the versioned one. `covered`:
    the record ids the replay read; live decisions on other records are not counted as missing."""
    both = live.keys() & new.keys()
    changed = Counter(f"{live[r]}->{new[r]}" for r in both if live[r] != new[r])
    only_live = (live.keys() & covered if covered is not None else live.keys()) - new.keys()
    return {"live_topic": live_topic, "versioned_topic": new_topic, "compared": len(both),
            "changed": sum(changed.values()), "unchanged": len(both) - sum(changed.values()),
            "transitions": dict(sorted(changed.items())), "only_live": len(only_live),
            "only_versioned": len(new.keys() - live.keys())}


def format_version(result: dict[str, Any]) -> str:
    """An into-version result as text."""
    lines = [f"replayed {', '.join(result['stages'])} into {result['version']}"]
    lines += [f"  {live} -> {new}" for live, new in result["topics"].items()]
    for w in result["workers"]:
        name = w["stage"] + (f"/{w['model']}" if w["model"] else "")
        lines.append(f"  {name:<24} in {w['records_in']:>8}  out {w['records_out']:>8}  dead letters {w['dead_letters']}")
    d = result["diff"]
    if d:
        moves = ", ".join(f"{k}: {v}" for k, v in d["transitions"].items()) or "none"
        lines.append(f"fused decisions, {d['live_topic']} vs {d['versioned_topic']}: {d['compared']} records in both, "
                     f"{d['changed']} changed ({moves}), {d['only_live']} only live, "
                     f"{d['only_versioned']} only in {result['version']}")
    return "\n".join(lines)
