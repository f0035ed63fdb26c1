"""structlog set-up, composed once at start-up: JSON lines off a TTY, readable console on a TTY.

Lines about a record carry record_id, stage, topic, partition and offset through bound loggers
(``log.bind(stage=..., topic=...)``). Values under secret-looking keys are masked before rendering.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SECRET_MARKERS = ("password", "secret", "token", "sasl_oauth")


def _redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Mask secret values, also inside nested dicts such as a Kafka client config."""
    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: ("***" if any(m in k.lower() for m in _SECRET_MARKERS) and v is not None
                    else clean(v) if isinstance(v, dict) else v) for k, v in d.items()}
    return clean(event)


class _Stderr:
    """Whatever sys.stderr is at write time (tests and daemons swap it; a bound stream may close)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog for the process; ``json=None`` picks JSON unless stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=False,
    )
    # kafka-python logs through the standard library; keep its warnings, drop its chatter.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # Its event loop warns whenever a task runs over 100 ms, which a busy 2-core host always does.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


class ReportedIsDebug(logging.Filter):
    """kafka-python logs as ERROR or WARNING some failures that are no failure of ours, or that
    tensorline reports itself; such a record is lowered to DEBUG (shown at --log-level debug):

    - `Cancelled`: what a client fails in flight when it closes its own connection (a client's
      close(), an idle or bootstrap connection dropped), "Metadata refresh: failed Cancelled",
      "Error sending HeartbeatRequest ... [Cancelled]" on every normal shutdown;
    - `SaslAuthenticationFailedError`: tensorline raises it as one AuthenticationFailed naming
      the principal and the bootstrap (engine.clients), instead of four lines without them;
    - the transport's "socket disconnected": the "Abort (...)" line that follows names it again.
    A lost connection carries its own error."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kafka.errors import Cancelled, SaslAuthenticationFailedError

        args = record.args.values() if isinstance(record.args, dict) else (record.args or ())
        exc = record.exc_info[1] if record.exc_info else None
        reported = (record.msg == "%s: socket disconnected"
                    or any(isinstance(a, (Cancelled, SaslAuthenticationFailedError)) for a in (*args, exc)))
        if record.levelno <= logging.DEBUG or not reported:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_close(prefix: str = "kafka") -> None:
    """Put ReportedIsDebug on every logger under `prefix` that exists (a filter applies only to
    records of its own logger, so each gets one; call after importing the client library)."""
    names = [n for n in logging.Logger.manager.loggerDict if n == prefix or n.startswith(prefix + ".")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ReportedIsDebug) for f in logger.filters):
            logger.addFilter(ReportedIsDebug())


def get(name: str = "tensorline", **context: Any) -> structlog.stdlib.BoundLogger:
    """A bound logger carrying `context` on every line."""
    return structlog.get_logger(name).bind(**context)
