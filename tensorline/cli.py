"""The `tensorline` command: parses arguments and calls library code, nothing more."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorline import config, logs

DEFAULT_PIPELINE = "pipeline.toml"


def _pipeline(args: argparse.Namespace, principal: str = config.ADMIN_PRINCIPAL) -> config.PipelineConfig:
    """The pipeline file, its clients acting as `principal` on a [security] cluster: each command
    takes the least it needs (`ops` where it only reads, `producer` to produce, a worker its stage)."""
    cfg = config.load(args.config).as_principal(principal)
    _schema_registry(cfg)
    return cfg


def _schema_registry(cfg: config.PipelineConfig, writes: dict[str, str] | None = None) -> None:
    """With `[schema_registry] url`: register what this command writes (subject -> schema name) and
    read every id through the registry (nothing is asked before an id is met); without, the
    built-in ids. A registry that is down or refuses a schema raises RegistryError."""
    if cfg.schema_registry.url:
        from tensorline.schemas.registry_client import connect

        connect(cfg.schema_registry.url, writes or {}, timeout_s=cfg.schema_registry.timeout_ms / 1000)


def cmd_broker(args: argparse.Namespace) -> int:
    from tensorline.ops import broker

    data_dir = Path(args.data_dir) if args.data_dir else None
    if args.action == "fetch":
        print(broker.fetch())
        return 0
    if args.node is not None and args.action != "stop":
        raise SystemExit("tensorline broker: --node is for stop (start starts every node not running)")
    if args.nodes is not None and args.action != "start":
        raise SystemExit("tensorline broker: --nodes is for start (stop and status find every node of the data dir)")
    if args.secure and args.action != "start":
        raise SystemExit("tensorline broker: --secure is for start (a data dir first started so stays secure)")
    if args.action == "start":
        st = broker.start(data_dir, args.port, nodes=args.nodes, secure=args.secure)
    elif args.action == "stop":
        st = broker.stop(data_dir, node=args.node)
    else:
        st = broker.status(data_dir)
    if args.json:
        print(st.to_json())
    elif st.nodes:
        print(f"cluster of {len(st.nodes)} nodes, {st.nodes_running} running (data {st.data_dir})")
        for n in st.nodes:
            print(f"  node {n.node_id} at {n.bootstrap}: " +
                  (f"running (pid {n.pid}, log {n.log})" if n.running else "not running"))
    elif st.running:
        print(f"broker running at {st.bootstrap} (pid {st.pid}, data {st.data_dir}, log {st.log})")
    else:
        print(f"broker not running (data {st.data_dir})")
    if st.security and not args.json:
        print(f"  {st.security['protocol']} with {st.security['mechanism']}; CA {st.security['ssl_cafile']}; "
              f"user {st.security['admin']}'s password in {st.security['credentials_file']}")
    if args.action == "stop":
        return 0
    # A cluster with a node down still serves, but status says so by its exit code.
    return 0 if st.running and st.nodes_running == max(1, len(st.nodes)) else 1


def cmd_topics(args: argparse.Namespace) -> int:
    from tensorline.engine import clients

    from tensorline.ops import topics

    cfg = _pipeline(args, config.ADMIN_PRINCIPAL if args.action == "create" else config.OPS_PRINCIPAL)
    created = clients.create_topics(cfg) if args.action == "create" else []
    states, warnings = topics.describe(cfg)
    for t in states:
        mark = "created" if t.name in created else ("missing" if t.actual_partitions is None else "exists")
        records = ",".join(map(str, t.records)) if t.records is not None else "-"
        print(f"{t.name:40s} partitions={t.actual_partitions or '-'}/{t.partitions} retention.ms={t.retention_ms} "
              f"cleanup.policy={t.cleanup_policy} max.message.bytes={t.max_message_bytes} "
              f"records={records} {mark}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import json

    from tensorline.engine.plugins import pin_device
    from tensorline.ops import check

    pin_device("cpu")  # models load to be looked at, not served: no GPU memory taken
    report = check.check(args.config, topics=not args.no_topics)
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from tensorline.engine import worker

    cfg = _pipeline(args, args.stage)
    if args.stage not in cfg.stages:
        raise config.ConfigError(cfg.path, f"stages.{args.stage}", f"one of the stages {', '.join(cfg.stages)}")
    config.require_files(cfg, args.stage, args.model)
    if args.workers is None and args.devices is None:
        from tensorline.engine.errors import FATAL_EXIT_CODE, Fatal
        from tensorline.schemas.registry_client import RegistryError
        from tensorline.schemas.subjects import stage_subjects

        try:  # the stage registers what it writes under its output topic's subject, before it reads
            _schema_registry(cfg, stage_subjects(cfg, args.stage))
        except RegistryError as e:
            print(f"tensorline run {args.stage}: stopped by a fatal error: {e}", file=sys.stderr)
            return FATAL_EXIT_CODE
        try:
            worker.run(cfg, args.stage, model=args.model, device=args.device, metrics_port=args.metrics_port,
                       metrics_host=args.metrics_host)
        except Fatal as e:
            print(f"tensorline run {args.stage}: stopped by a fatal error: {e}", file=sys.stderr)
            return FATAL_EXIT_CODE
        return 0
    from tensorline.ops import supervisor

    devices = tuple(args.devices.split(",")) if args.devices else None
    specs = supervisor.specs(cfg, args.stage, model=args.model, workers=args.workers, devices=devices)
    return supervisor.Supervisor(args.config, specs).run_forever(keep_going=args.keep_going)


def cmd_up(args: argparse.Namespace) -> int:
    from tensorline.ops import supervisor

    cfg = _pipeline(args)
    config.require_files(cfg)
    return supervisor.Supervisor(args.config, supervisor.pipeline_specs(cfg)).run_forever(keep_going=args.keep_going)


def cmd_produce(args: argparse.Namespace) -> int:
    import signal

    from tensorline.producers import publish
    from tensorline.schemas.subjects import producer_subjects

    cfg = _pipeline(args, config.PRODUCER_PRINCIPAL)
    _schema_registry(cfg, producer_subjects(cfg, publish.RAW))
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    summary = publish.produce(cfg, args.sources, rate=args.rate, watch=args.watch, limit=args.limit,
                              state=publish.state_file(cfg, args.sources), stop=lambda: bool(stopping),
                              check_results_s=publish.RESULTS_READ_S if args.check_results is None
                              else args.check_results, key=args.key)
    print("\n".join([summary.line(), *summary.notes]))
    return 0


def cmd_lag(args: argparse.Namespace) -> int:
    import json
    import time

    from tensorline.ops import lag

    cfg = _pipeline(args, config.OPS_PRINCIPAL)
    history = lag.History(lag.history_file(cfg))
    while True:
        lags = lag.measure(cfg, stuck_after_s=args.stuck_after, history=history)
        if args.json:
            print(json.dumps({"stages": [g.to_dict() for g in lags]}), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(lag.format_table(lags), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_replay(args: argparse.Namespace) -> int:
    import json

    from tensorline.ops import replay

    cfg = _pipeline(args, config.OPS_PRINCIPAL if args.dry_run else config.ADMIN_PRINCIPAL)
    start = (args.from_datetime or (replay.parse_offsets(args.from_offset) if args.from_offset else replay.EARLIEST))
    if args.to_datetime and not (args.into_version or args.dry_run):
        raise config.ConfigError(cfg.path, "--to-datetime", "--into-version or --dry-run with it (a reset has no end)")
    if args.dry_run:
        plans = replay.plan(cfg, args.stage, args.model, start, args.to_datetime)
        print(json.dumps([p.to_dict() for p in plans]) if args.json else replay.format_plan(plans))
    elif args.into_version:
        result = replay.into_version(cfg, args.stage, args.into_version, start, args.to_datetime)
        print(json.dumps(result, default=str) if args.json else replay.format_version(result))
    else:
        plans = replay.reset(cfg, args.stage, args.model, start)
        print(json.dumps([p.to_dict() for p in plans]) if args.json else replay.format_plan(plans))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    import json

    from tensorline.ops import dlq

    cfg = _pipeline(args, config.ADMIN_PRINCIPAL if args.action == "redrive" else config.OPS_PRINCIPAL)
    if args.action == "list":
        rows = dlq.counts(cfg)
        print(json.dumps(rows) if args.json else dlq.format_counts(rows))
    elif args.action == "show":
        rows = dlq.show(cfg, reason=args.reason, stage=args.stage, limit=args.limit)
        print(json.dumps(rows) if args.json else dlq.format_letters(rows))
    else:
        result = dlq.redrive(cfg, reason=args.reason, stage=args.stage)
        print(json.dumps(result) if args.json else dlq.format_redrive(result))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from tensorline.ops import dashboard

    dashboard.serve(_pipeline(args, config.OPS_PRINCIPAL), host=args.host, port=args.port)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from tensorline.ops import registry
    from tensorline.schemas.subjects import served_subjects

    cfg = _pipeline(args) if Path(args.config).exists() or args.config != DEFAULT_PIPELINE else None
    registry.serve(served_subjects(cfg), host=args.host, port=args.port)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    import json

    from tensorline.ops import registry

    cfg = _pipeline(args)
    url = args.url or cfg.schema_registry.url
    if not url:
        raise config.ConfigError(cfg.path, "schema_registry.url", "a registry to compare with (or --url URL)")
    verdicts = registry.check(cfg, url, ask_registry=not args.local_only,
                              timeout_s=cfg.schema_registry.timeout_ms / 1000)
    if args.json:
        print(json.dumps([v.__dict__ for v in verdicts]))
    else:
        print("\n".join(v.line() for v in verdicts))
    return 1 if any(v.status == "error" for v in verdicts) else 0


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from tensorline.ops import report

    rep = report.build(_pipeline(args, config.OPS_PRINCIPAL))
    print(json.dumps(rep) if args.json else report.format_table(rep))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from contextlib import closing

    from tensorline.ops import results

    cfg = _pipeline(args, config.OPS_PRINCIPAL)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    models = cfg.fusion.expected_models if cfg.fusion else ()
    with closing(results.rows(cfg, record_id=args.id, source=args.source, limit=args.limit,
                              follow=args.follow)) as rows:
        for line in results.lines(rows, fmt, classes=cfg.classes, models=models):
            print(line, flush=args.follow)
    return 0


def cmd_acls(args: argparse.Namespace) -> int:
    import json

    from tensorline.ops import acls

    cfg = _pipeline(args)
    if args.action == "plan":
        bindings = acls.plan(cfg)
        print(json.dumps([b.__dict__ for b in bindings]) if args.json else acls.format_plan(bindings))
        return 0
    applied = acls.apply(cfg)
    print(json.dumps([a.to_dict() for a in applied]) if args.json else acls.format_applied(applied))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from tensorline.engine.plugins import quiet_tensorflow
    from tensorline.ops import train

    quiet_tensorflow()  # TensorFlow runs in this process

    if args.seeds is None:
        result = train.train(_pipeline(args), seed=args.seed, limit=args.limit, show=not args.json)
        if args.json:
            print(json.dumps({"summary": result["summary"], "fusion": result["fusion"],
                              "models": {n: c["scores"] for n, c in result["models"].items()}}))
        return 0
    result = train.train_seeds(_pipeline(args), args.seeds, seed=args.seed, limit=args.limit, show=not args.json)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tensorline.engine.plugins import quiet_tensorflow
    from tensorline.ops import demo

    quiet_tensorflow()  # TensorFlow trains in this process; the workers pin their own devices
    from tensorline.schemas.subjects import producer_subjects

    cfg = _pipeline(args)  # the demo produces in this process
    _schema_registry(cfg, producer_subjects(cfg))
    return demo.main(args.config, json_out=args.json, limit=args.limit)


def _count(text: str) -> int:
    """A non-negative integer argument."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count of 0 or more, got {n}")
    return n


def _positive(text: str) -> int:
    """A positive integer argument."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorline", description="A Kafka-native streaming pipeline for multi-model inference.")
    parser.add_argument("--log-level", help="debug, info, warning or error (default: info; the demo: warning, "
                                            "its workers' logs are in files)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", default=DEFAULT_PIPELINE, help="pipeline file (default: %(default)s)")
        return p

    b = sub.add_parser("broker", help="the local Kafka broker (KRaft): one node, or a cluster of --nodes N")
    b.add_argument("action", choices=["start", "stop", "status", "fetch"])
    b.add_argument("--data-dir", help="broker data folder (default: $TENSORLINE_BROKER_DIR or .tensorline/broker)")
    b.add_argument("--port", type=int, help="listener port on 127.0.0.1 (default: 9092; a cluster's nodes: "
                                            "this one and the ports after it)")
    b.add_argument("--nodes", type=int, help="start: a local cluster of N nodes, each broker and controller "
                                             "(default: what the data dir holds, else 1)")
    b.add_argument("--node", type=int, help="stop: only this node of the cluster (its id, 1 to N)")
    b.add_argument("--secure", action="store_true",
                   help="start: SASL_SSL with SCRAM-SHA-512, a local CA, an admin user and ACLs enforced "
                        "(grant the pipeline's principals theirs with `tensorline acls apply`)")
    b.add_argument("--json", action="store_true", help="print the status as JSON")
    b.set_defaults(func=cmd_broker)

    t = with_config(sub.add_parser("topics", help="create (idempotent) or describe the pipeline's topics"))
    t.add_argument("action", choices=["create", "describe"])
    t.set_defaults(func=cmd_topics)

    ck = with_config(sub.add_parser("check", help="check the pipeline file, its models' shapes, the stacker and "
                                                   "(with a broker) the topics, without starting a worker"))
    ck.add_argument("--json", action="store_true", help="print one JSON object")
    ck.add_argument("--no-topics", action="store_true", help="leave the broker alone: do not check the topics")
    ck.set_defaults(func=cmd_check)

    r = with_config(sub.add_parser("run", help="run one worker of a stage until stopped"))
    r.add_argument("stage", help="a stage of the pipeline file")
    r.add_argument("--model", help="the stage's model to serve (stages with several models)")
    r.add_argument("--device", default="cpu", help="cpu or gpu:N (default: %(default)s)")
    r.add_argument("--workers", type=int, help="supervise N worker processes (default: one, in this process)")
    r.add_argument("--devices", help="comma-separated devices for the workers, round-robin (e.g. gpu:0,gpu:1)")
    r.add_argument("--keep-going", action="store_true",
                   help="with --workers: keep supervising when one model's workers are all given up "
                        "(default: stop and exit 1)")
    r.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus /metrics port (default 0: a free port, written to the state dir)")
    r.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics binds to (default: %(default)s; 0.0.0.0 in containers)")
    r.set_defaults(func=cmd_run)

    up = with_config(sub.add_parser("up", help="start every stage's workers as the pipeline file gives them"))
    up.add_argument("--keep-going", action="store_true",
                    help="keep the other stages running when every worker of a stage is given up "
                         "(crash loop or fatal error; default: stop the pipeline and exit 1)")
    up.set_defaults(func=cmd_up)

    pr = with_config(sub.add_parser("produce", help="publish DICOM, NIfTI, PNG/JPEG, .npy/.npz files to the raw topic"))
    pr.add_argument("sources", nargs="+", help="files or folders")
    pr.add_argument("--rate", type=float, help="at most this many records per second")
    pr.add_argument("--watch", action="store_true", help="keep watching the folders for new files")
    pr.add_argument("--limit", type=int, help="stop after this many records")
    pr.add_argument("--check-results", type=float, metavar="SECONDS",
                    help="read the results topic for at most this long at start, to count the records "
                         "whose id was sent before (default: 10; 0: do not read it)")
    pr.add_argument("--key", choices=config.PRODUCER_KEY_CHOICES,
                    help="what the records are keyed by, hence partitioned: record_id spreads them over every "
                         "partition; study keeps each study (volume, archive) in order on one partition "
                         "(default: the pipeline file's producer.key, else record_id)")
    pr.set_defaults(func=cmd_produce)

    lg = with_config(sub.add_parser("lag", help="consumer lag per stage and partition (offsets and seconds)"))
    lg.add_argument("--json", action="store_true", help="print JSON")
    lg.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 2)")
    lg.add_argument("--stuck-after", type=float, default=120.0,
                    help="flag a partition whose committed offset has not moved for this long while behind "
                         "(default: %(default)s s)")
    lg.set_defaults(func=cmd_lag)

    from tensorline.ops.replay import parse_datetime

    rl = with_config(sub.add_parser("replay", help="reprocess a stage from a time or offsets (reset, or into a version)"))
    rl.add_argument("stage")
    rl.add_argument("--model", help="one model's group of a per-model stage (default: all of them)")
    where = rl.add_mutually_exclusive_group(required=True)
    where.add_argument("--from-datetime", type=parse_datetime, help="ISO 8601 time (local unless it says its zone)")
    where.add_argument("--from-offset", nargs="+", metavar="P:O", help="partition:offset pairs")
    where.add_argument("--to-earliest", action="store_true", help="from the earliest retained record")
    rl.add_argument("--to-datetime", type=parse_datetime, help="end of the replay (with --into-version or --dry-run)")
    rl.add_argument("--dry-run", action="store_true", help="print per partition what would be reprocessed")
    rl.add_argument("--into-version", metavar="vN",
                    help="replay into versioned topics (e.g. detections.v2 -> results.v2), live ones untouched")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=cmd_replay)

    dq = with_config(sub.add_parser("dlq", help="inspect the dead-letter topic and send fixed records back"))
    dq.add_argument("action", choices=["list", "show", "redrive"])
    dq.add_argument("--reason", help="only this reason (error class or bad-file reason)")
    dq.add_argument("--stage", help="only dead letters of this stage")
    dq.add_argument("--limit", type=int, help="show at most N")
    dq.add_argument("--json", action="store_true")
    dq.set_defaults(func=cmd_dlq)

    db = with_config(sub.add_parser("dashboard", help="a live ops page: lag, throughput, latency, DLQ, workers"))
    db.add_argument("--port", type=int, default=8050, help="port (default: %(default)s; 0 picks a free one)")
    db.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: %(default)s; anything else exposes it, unauthenticated)")
    db.set_defaults(func=cmd_dashboard)

    rg = with_config(sub.add_parser("registry", help="serve the built-in schemas over the Confluent Schema "
                                                     "Registry REST API, for kcat and Confluent's deserializers"))
    rg.add_argument("action", choices=["serve"])
    rg.add_argument("--port", type=int, default=8081, help="port (default: %(default)s; 0 picks a free one)")
    rg.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: %(default)s; anything else exposes it, unauthenticated)")
    rg.set_defaults(func=cmd_registry)

    sc = with_config(sub.add_parser("schemas", help="check this version's schemas against a registry's latest "
                                                    "versions (BACKWARD) before anything is registered"))
    sc.add_argument("action", choices=["check"])
    sc.add_argument("--url", help="the registry (default: the pipeline file's schema_registry.url)")
    sc.add_argument("--local-only", action="store_true",
                    help="only this version's own rule check, not the registry's compatibility endpoint")
    sc.add_argument("--json", action="store_true", help="print JSON")
    sc.set_defaults(func=cmd_schemas)

    ac = with_config(sub.add_parser("acls", help="on a SASL cluster: the pipeline's principals (one per stage, "
                                                 "ops, producer), their SCRAM credentials and ACLs"))
    ac.add_argument("action", choices=["apply", "plan"],
                    help="apply: set credentials (generating missing passwords into security.credentials_file) "
                         "and make the ACLs match the plan (idempotent); plan: print what each principal may do")
    ac.add_argument("--json", action="store_true", help="print JSON (no password in it)")
    ac.set_defaults(func=cmd_acls)

    rp = with_config(sub.add_parser("report", help="precision, recall, F1 per class for each model and the fused result"))
    rp.add_argument("--json", action="store_true", help="print one JSON object")
    rp.set_defaults(func=cmd_report)

    rs = with_config(sub.add_parser("results", help="what happened to each record: its fused decision, scores and "
                                                    "latency, or its dead letters' stage and reason"))
    rs.add_argument("--follow", action="store_true", help="then print new results and dead letters until Ctrl-C")
    rs.add_argument("--id", help="only this record id")
    rs.add_argument("--source", metavar="PATH",
                    help="only records of this file, or of files under this folder (a path as given to produce, "
                         "or its last components: img.png)")
    rs.add_argument("--limit", type=_count, metavar="N", help="only the N most recent rows (then, with --follow, "
                                                              "every new one)")
    shape = rs.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="one JSON object per line")
    shape.add_argument("--csv", action="store_true", help="CSV, with a header line")
    rs.set_defaults(func=cmd_results)

    tr = with_config(sub.add_parser("train", help="train the demo models named in the pipeline file"))
    tr.add_argument("--seed", type=int, default=7, help="seed of the demo set and the models (default: %(default)s)")
    tr.add_argument("--seeds", type=_positive, metavar="K",
                    help="train K times, model seeds SEED..SEED+K-1 on the same demo set, each into a scratch "
                         "folder (the pipeline's model files are left alone); print each model's and the fused "
                         "test macro-F1 per seed and over all, with the fusion each seed chose")
    tr.add_argument("--limit", type=_positive, metavar="N", help="at most N patches per split (a quick run)")
    tr.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    tr.set_defaults(func=cmd_train)

    d = with_config(sub.add_parser("demo", help="run the demo end to end on a local broker"))
    d.add_argument("--json", action="store_true", help="end with one line holding the report as JSON")
    d.add_argument("--limit", type=int, help="send only the first N test images")
    d.set_defaults(func=cmd_demo, default_log_level="warning")  # its own lines say what it does
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(level=args.log_level or getattr(args, "default_log_level", "info"))
    try:
        return args.func(args)
    except (config.ConfigError, RuntimeError) as e:
        logs.get().error(str(e), error=type(e).__name__)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
