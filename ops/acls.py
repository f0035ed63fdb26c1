"""The pipeline's principals on a [security] cluster and what each may do (`tensorline acls apply`).

`plan` is a pure function of the pipeline file: the ACL bindings (all ALLOW, any host) of every
principal but the admin (a super user needs none):

- a stage: READ its input topic, WRITE its output and the DLQ topic, READ and WRITE its state
  changelog (fusion), READ its consumer group(s) (detection: one per model), WRITE and DESCRIBE
  transactional ids prefixed with each group and a dot (its workers' `<group>.<host>-<slot>`);
- `producer` (`tensorline produce`): WRITE the raw topic and the DLQ (bad files), READ the results
  topic (to count the records sent before);
- `ops` (the commands that only look: lag, dashboard, results, report, topics describe, dlq
  list/show, check): READ and DESCRIBE_CONFIGS on every topic of the pipeline, DESCRIBE its groups.

Kafka's READ and WRITE imply DESCRIBE. Nothing else is allowed: the broker runs with
`allow.everyone.if.no.acl.found=false`. `apply` makes the cluster match the plan: each principal's
SCRAM credentials set (passwords from the environment or the credentials file; missing ones
generated into that file), its missing bindings created and those the plan no longer has deleted,
so applying twice changes nothing the second time.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass, field

from kafka.admin import (ACL, ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern,
                         ResourcePatternFilter, ResourceType)
from kafka.admin._users import UserScramCredentialUpsertion

from tensorline import config
from tensorline.config import ADMIN_PRINCIPAL, OPS_PRINCIPAL, PRODUCER_PRINCIPAL, ConfigError, PipelineConfig
from tensorline.engine import clients
from tensorline.engine.plugins import PER_MODEL_KINDS
from tensorline.producers.publish import RAW

ALLOW = ACLPermissionType.ALLOW
ANY_HOST = "*"


@dataclass(frozen=True, order=True)
class Binding:
    """One ACL: `principal` ("User:<name>") may `operation` on a resource (`resource` type, `name`,
    `pattern` LITERAL or PREFIXED), from any host."""
    principal: str
    resource: str  # TOPIC, GROUP, TRANSACTIONAL_ID
    name: str
    operation: str  # READ, WRITE, DESCRIBE, DESCRIBE_CONFIGS
    pattern: str = "LITERAL"

    def acl(self) -> ACL:
        return ACL(self.principal, ANY_HOST, ACLOperation[self.operation], ALLOW,
                   ResourcePattern(ResourceType[self.resource], self.name, ACLResourcePatternType[self.pattern]))

    @classmethod
    def of(cls, acl: ACL) -> "Binding":
        return cls(acl.principal, acl.resource_pattern.resource_type.name, acl.resource_pattern.resource_name,
                   acl.operation.name, acl.resource_pattern.pattern_type.name)


def principals(cfg: PipelineConfig) -> list[str]:
    """Every principal of the pipeline but the admin: ops, producer, then the stages."""
    return [OPS_PRINCIPAL, PRODUCER_PRINCIPAL, *cfg.stages]


def kafka_principal(cfg: PipelineConfig, principal: str) -> str:
    """"User:<SCRAM user name>" of a principal of the pipeline."""
    return f"User:{(cfg.security or config.SecurityConfig()).user(cfg.name, principal)}"


def groups(cfg: PipelineConfig, stage: str) -> list[str]:
    """The consumer groups a stage's workers join: one per model for per-model stages (detection)."""
    st = cfg.stages[stage]
    if st.kind in PER_MODEL_KINDS:
        return [cfg.group_id(stage, m.name) for m in st.models]
    return [cfg.group_id(stage)]


def plan(cfg: PipelineConfig) -> list[Binding]:
    """The ACL bindings of every principal of the pipeline (the module docstring), sorted."""
    topic = lambda key: cfg.topic(key).name  # noqa: E731
    dlq = topic(cfg.dlq)
    out: set[Binding] = set()
    for name, st in cfg.stages.items():
        user = kafka_principal(cfg, name)
        out |= {Binding(user, "TOPIC", topic(st.input), "READ"), Binding(user, "TOPIC", topic(st.output), "WRITE"),
                Binding(user, "TOPIC", dlq, "WRITE")}
        if st.changelog:
            out |= {Binding(user, "TOPIC", topic(st.changelog), op) for op in ("READ", "WRITE")}
        for group in groups(cfg, name):
            out.add(Binding(user, "GROUP", group, "READ"))
            out |= {Binding(user, "TRANSACTIONAL_ID", f"{group}.", op, "PREFIXED") for op in ("WRITE", "DESCRIBE")}
    producer = kafka_principal(cfg, PRODUCER_PRINCIPAL)
    if RAW in cfg.topics:
        out.add(Binding(producer, "TOPIC", topic(RAW), "WRITE"))
    out.add(Binding(producer, "TOPIC", dlq, "WRITE"))
    if cfg.fusion is not None:
        out.add(Binding(producer, "TOPIC", topic(cfg.fusion.output), "READ"))
    ops = kafka_principal(cfg, OPS_PRINCIPAL)
    out |= {Binding(ops, "TOPIC", t.name, op) for t in cfg.topics.values() for op in ("READ", "DESCRIBE_CONFIGS")}
    out |= {Binding(ops, "GROUP", g, "DESCRIBE") for stage in cfg.stages for g in groups(cfg, stage)}
    return sorted(out)


@dataclass
class Applied:
    """What `apply` did for one principal (no password in it)."""
    principal: str
    user: str
    password_generated: bool = False
    created: list[Binding] = field(default_factory=list)
    deleted: list[Binding] = field(default_factory=list)
    kept: int = 0

    def line(self) -> str:
        made = "password generated, " if self.password_generated else ""
        return (f"{self.principal:12s} User:{self.user}: SCRAM credentials set ({made}{self.kept} ACLs kept, "
                f"{len(self.created)} created, {len(self.deleted)} deleted)")

    def to_dict(self) -> dict:
        return {**asdict(self), "created": [asdict(b) for b in self.created],
                "deleted": [asdict(b) for b in self.deleted]}


def ensure_passwords(cfg: PipelineConfig, names: list[str]) -> list[str]:
    """Generate a password for each principal of `names` that has none (environment or credentials
    file) and append it to the credentials file (created owner-only); return those generated.
    Without a credentials file a missing password is a ConfigError naming its variable."""
    sec = cfg.security or config.SecurityConfig()
    have = config.read_credentials(sec.credentials_file) if sec.credentials_file else {}
    missing = [p for p in names if not os.environ.get(config.password_env(p)) and sec.user(cfg.name, p) not in have]
    if missing and not sec.credentials_file:
        config.password(cfg, missing[0])  # raises, naming the variable
    if missing:
        fd = os.open(sec.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.writelines(f'"{sec.user(cfg.name, p)}" = "{secrets.token_urlsafe(24)}"\n' for p in missing)
    return missing


def apply(cfg: PipelineConfig) -> list[Applied]:
    """Make the cluster's SCRAM users and ACLs of the pipeline's principals match `plan`, as the admin."""
    if cfg.security is None:
        raise ConfigError(cfg.path, "security", "a [security] table (the principals live on a SASL cluster)")
    names = principals(cfg)
    generated = set(ensure_passwords(cfg, names))
    wanted = plan(cfg)
    admin = clients.admin(cfg.as_principal(ADMIN_PRINCIPAL))
    try:
        users = {p: cfg.security.user(cfg.name, p) for p in names}
        failed = {u: e for u, e in admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(users[p], cfg.security.mechanism, config.password(cfg, p))
             for p in names]).items() if e}
        if failed:
            raise RuntimeError("setting SCRAM credentials failed: " + "; ".join(f"{u}: {e}" for u, e in failed.items()))
        results = []
        for p in names:
            principal = kafka_principal(cfg, p)
            mine = {b for b in wanted if b.principal == principal}
            found, _ = admin.describe_acls(ACLFilter(principal, None, ACLOperation.ANY, ACLPermissionType.ANY,
                                                     ResourcePatternFilter(ResourceType.ANY, None,
                                                                           ACLResourcePatternType.ANY)))
            planned = [a for a in found if a.permission_type == ALLOW and a.host == ANY_HOST and Binding.of(a) in mine]
            extra = [a for a in found if a not in planned]  # a DENY or a host-bound one included
            create = sorted(mine - {Binding.of(a) for a in planned})
            if create:
                done = admin.create_acls([b.acl() for b in create])
                if done["failed"]:
                    raise RuntimeError(f"creating ACLs of {principal} failed: {done['failed']}")
            if extra:
                admin.delete_acls(extra)
            results.append(Applied(p, users[p], p in generated, create, sorted(map(Binding.of, extra)),
                                   len(planned)))
        return results
    finally:
        admin.close()


def format_applied(results: list[Applied]) -> str:
    return "\n".join(r.line() for r in results)


def format_plan(bindings: list[Binding]) -> str:
    """One line per binding, by principal: what each may do."""
    return "\n".join(f"{b.principal:32s} {b.operation:16s} {b.resource} {b.name}"
                     f"{' (prefix)' if b.pattern == 'PREFIXED' else ''}" for b in bindings)

