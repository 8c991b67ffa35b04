"""Deterministic short ids: the same content always gives the same 8 hex digits (run names, search and job ids)."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def short_hash(obj: Any) -> str:
    """8 hex digits of the sha256 of `obj` as canonical JSON (sorted keys; non-JSON values by their str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]
