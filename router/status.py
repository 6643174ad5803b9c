"""What the router reports about itself and its workers (GET /status).

The handoff log keeps, for every disaggregated request, how many bytes of KV cache
its prefill instance sent to its decode instance and how long that took (from the
prefill instance's HandoffDone), as totals and as the latest records.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from typing import Any

from google.protobuf.message import Message


@dataclass(frozen=True)
class HandoffRecord:
    request_id: str
    prefill_id: str
    decode_id: str
    kv_bytes: int
    seconds: float


class HandoffLog:
    def __init__(self, max_records: int = 1024) -> None:
        self._records: collections.deque[HandoffRecord] = collections.deque(maxlen=max_records)
        self.num_handoffs = 0
        self.kv_bytes = 0
        self.seconds = 0.0

    def add(self, record: HandoffRecord) -> None:
        self._records.append(record)
        self.num_handoffs += 1
        self.kv_bytes += record.kv_bytes
        self.seconds += record.seconds

    def recent(self) -> list[HandoffRecord]:
        """The latest records, oldest first."""
        return list(self._records)

    def summary(self, num_recent: int = 10) -> dict[str, Any]:
        n = self.num_handoffs
        return {
            "num_handoffs": n,
            "kv_bytes_total": self.kv_bytes,
            "seconds_total": self.seconds,
            "kv_bytes_per_request": self.kv_bytes / n if n else 0.0,
            "seconds_per_request": self.seconds / n if n else 0.0,
            "recent": [asdict(r) for r in self.recent()[-num_recent:]],
        }


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field of a proto message, set or not, with 64-bit integers kept as numbers
    (json_format writes them as strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            out[field.name] = (
                [message_to_dict(v) for v in value] if field.is_repeated else message_to_dict(value)
            )
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out
