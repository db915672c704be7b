"""The fixed Arrow schemas of the Parquet index (``artifacts/index``).

Fixed rather than inferred so an empty split, an all-ASCII corpus or a pandas upgrade can never change
a column's type under the readers downstream.

``images.parquet``    image_id int64, file_name string, path string (``image_dir / file_name`` exactly as
                      configured, so a relative image_dir stays relative), width int32, height int32
                      (the decoded image as stored, EXIF orientation ignored: the masks' space).
``refs.parquet``      ref_id int64, ann_id int64, image_id int64, split string, category_id int32,
                      category string, bbox list<float64> (COCO xywh, length 4), mask_counts string
                      (compressed COCO RLE counts), mask_height int32, mask_width int32, area float64
                      (pixels of the decoded mask).
``sentences.parquet`` sent_id int64, ref_id int64, image_id int64, split string, text string (REFER's
                      cleaned ``sent``, else ``raw``; unchanged, non-ASCII included).
"""

from __future__ import annotations

import pyarrow as pa

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])

REFS_SCHEMA = pa.schema([
    ("ref_id", pa.int64()),
    ("ann_id", pa.int64()),
    ("image_id", pa.int64()),
    ("split", pa.string()),
    ("category_id", pa.int32()),
    ("category", pa.string()),
    ("bbox", pa.list_(pa.float64())),
    ("mask_counts", pa.string()),
    ("mask_height", pa.int32()),
    ("mask_width", pa.int32()),
    ("area", pa.float64()),
])

SENTENCES_SCHEMA = pa.schema([
    ("sent_id", pa.int64()),
    ("ref_id", pa.int64()),
    ("image_id", pa.int64()),
    ("split", pa.string()),
    ("text", pa.string()),
])

SCHEMAS: dict[str, pa.Schema] = {"images": IMAGES_SCHEMA, "refs": REFS_SCHEMA, "sentences": SENTENCES_SCHEMA}


def table_from_rows(name: str, rows: list[dict]) -> pa.Table:
    """Build table ``name`` from row dicts with its fixed schema (an empty list gives an empty table)."""
    schema = SCHEMAS[name]
    columns = {field.name: [row[field.name] for row in rows] for field in schema}
    return pa.table(columns, schema=schema)
