"""Arrow schemas of the three row kinds: an input pair, a kept row, a reject row.

Signal columns are not listed here: each signal declares its own fields, and the kept and
reject schemas are assembled from the enabled signals, so a new signal needs no edit here.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

INPUT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        # Set when the source could not give this row whole (missing image, bad caption
        # bytes, unreadable tar member); such a row goes straight to rejects/.
        pa.field("source_error", pa.string()),
        # Source-specific extras as JSON text (img2dataset's .json sidecar, say).
        pa.field("meta", pa.string()),
    ]
)

KEPT_BASE = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("meta", pa.string()),
    pa.field("bucket_width", pa.int32()),
    pa.field("bucket_height", pa.int32()),
]

REJECT_BASE = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    # What identifies the row to a reader, so a reject can be judged without the source; after
    # the older columns, as readers of outputs that predate them match columns by name.
    pa.field("caption", pa.string()),
    pa.field("meta", pa.string()),
]


def _nullable(fields: Iterable[pa.Field]) -> list[pa.Field]:
    return [f.with_nullable(True) for f in fields]


def kept_schema(signal_fields: Iterable[pa.Field]) -> pa.Schema:
    return pa.schema(KEPT_BASE + _nullable(signal_fields))


def reject_schema(signal_fields: Iterable[pa.Field]) -> pa.Schema:
    """Reject rows carry every signal column, null where it was never computed."""
    return pa.schema(REJECT_BASE + _nullable(signal_fields))
