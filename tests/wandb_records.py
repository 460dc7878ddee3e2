"""Read an offline W&B run file (``run-*.wandb``) without W&B's servers: its history rows and its group.

The file is a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB blocks, records with a 7-byte header:
crc32 4, length 2, type 1 — full/first/middle/last) of protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: too small for a header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            yield buf + chunk
            buf = b""


def read_run(path: Path | str) -> dict:
    """{"group", "id", "name", "tags", "history": [row dicts], "config": {key: value}, "summary": {key: value},
    "metrics": {name: {"step_metric", "summary"}}} of one offline run file (the summary: the last value each key was
    set to; "metrics": the ``define_metric`` declarations)."""
    out: dict = {"group": None, "id": None, "name": None, "tags": [], "history": [], "config": {}, "summary": {},
                 "metrics": {}}  # fmt: skip
    for payload in _payloads(Path(path).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "summary":
            out["summary"].update(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update}
            )
        elif kind == "metric":
            m = rec.metric
            summary = [k for k in ("min", "max", "mean", "last", "best") if getattr(m.summary, k, False)]
            out["metrics"][m.name or m.glob_name] = {"step_metric": m.step_metric, "summary": summary}
        elif kind == "run":
            out["group"] = rec.run.run_group
            out["id"], out["name"], out["tags"] = rec.run.run_id, rec.run.display_name, list(rec.run.tags)
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    return out
