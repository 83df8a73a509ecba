"""Five-level human quality grades (Kolors' quality stage), from a sample of a curated output to the
whole pool.

A grading workspace (``t2i grade export --out GDIR``) holds::

    GDIR/batch.parquet          the sampled rows: key, image (a JPEG for grading, long side <= 768),
                                caption, stratum, round, and the signals the sample was drawn on
    GDIR/export.json            where the sample came from (the curated output), how it was drawn
    GDIR/labelstudio/tasks.json       the same rows as a Label Studio import (images as data: URIs)
    GDIR/labelstudio/config.xml       its labeling config: a 1-5 rating with the five levels described
    GDIR/votes.sqlite           every grade given on the built-in page (``t2i grade serve``), stored at once
    GDIR/grades.parquet         ``t2i grade import``: every vote from the page and Label Studio exports

The grades table (``GRADES_SCHEMA``) is one row per vote; an image may collect several.
"""

from __future__ import annotations

import pyarrow as pa

# Kolors' five levels, as graders see them (the page and Label Studio's config show these words).
LEVELS: dict[int, tuple[str, str]] = {
    1: ("unsafe", "pornographic, violent, gory or horrifying content"),
    2: ("artifacts", "watermarks, borders, collages, stickers, heavy text overlays or other artificial traces"),
    3: ("technical faults", "blurred, out of focus, badly exposed, noisy or otherwise technically flawed"),
    4: ("ordinary", "an acceptable, ordinary photo without notable faults or notable aesthetic value"),
    5: ("high aesthetic value", "excellent composition, lighting and subject: a picture worth learning from"),
}

BATCH = "batch.parquet"
EXPORT_META = "export.json"
LABEL_STUDIO = "labelstudio"
VOTES_DB = "votes.sqlite"
GRADES = "grades.parquet"

GRADES_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("grader", pa.string(), nullable=False),
    pa.field("grade", pa.int8(), nullable=False),  # 1..5
    pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("origin", pa.string(), nullable=False),  # "page" or "labelstudio"
])
