"""The agent's log lines as data: `--log-format json` writes one object per line with the event's fields
(event, enclave, host, migration id where known, outcome...) beside the message, so a log collector can
select a migration's lines without parsing prose. The text format stays one human line per event."""

from __future__ import annotations

import json
import logging
from typing import Any


def fields(event: str, enclave: str | None = None, **more: Any) -> dict[str, Any]:
    """`extra=` for a log call: the fields its JSON line carries (empty values left out)."""
    found = {"event": event, "enclave": enclave, **more}
    return {"fields": {k: v for k, v in found.items() if v not in (None, "")}}


class JsonLog(logging.Formatter):
    """One JSON object per record: time, level, logger, host, message, and the record's fields."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": record.created, "level": record.levelname.lower(), "logger": record.name,
                "host": self.host, "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)
