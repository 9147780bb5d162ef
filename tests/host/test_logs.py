"""`--log-format json`: each line an object with the event's fields beside the message."""

from __future__ import annotations

import json
import logging

from constmig.host.logs import JsonLog, fields


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("constmig.agent", logging.WARNING, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_a_line_carries_its_fields_and_the_host():
    line = json.loads(JsonLog("a").format(record("migration of %s ended %s", "kv", "rolled-back", **fields(
        "migration-ended", "kv", migration="ab12", outcome="rolled-back", to=""))))
    assert line["message"] == "migration of kv ended rolled-back" and line["level"] == "warning"
    assert {k: line[k] for k in ("host", "event", "enclave", "migration", "outcome")} == {
        "host": "a", "event": "migration-ended", "enclave": "kv", "migration": "ab12", "outcome": "rolled-back"}
    assert "to" not in line  # empty values are left out


def test_a_line_without_fields_is_still_an_object():
    line = json.loads(JsonLog("b").format(record("root CA loaded from %s", "/ca")))
    assert line["message"] == "root CA loaded from /ca" and line["host"] == "b" and "event" not in line
