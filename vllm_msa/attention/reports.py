"""Reporting selections: the documents each router layer selected, for requests that asked
(`msa_return_selection`), once per layer, as the connector sends them back."""

from __future__ import annotations

import math
from typing import Any

from .requests import MemoryRequest


def selection_reports(requests: dict[str, MemoryRequest]) -> dict[str, dict[str, Any]]:
    """Selections made since the last call, for requests that asked for them."""
    reports = {}
    for req_id, request in requests.items():
        if not request.options.return_selection:
            continue
        new = set(request.selections) - request.reported
        if not new:
            continue
        request.reported |= new
        reports[req_id] = {"bank": request.options.bank, "layers": {
            str(layer): {"doc_ids": request.selections[layer].doc_ids.tolist(),
                         "scores": [s if math.isfinite(s) else None for s in
                                    request.selections[layer].scores.tolist()]}
            for layer in sorted(new)}}
    return reports
