"""A short, readable account of an answer over a bank, for the quick start: the question, the
answer, and the documents each router layer picked, round by round.

Both examples print results in the one selection shape the plugin uses everywhere
(`{"bank": NAME, "layers": {"<layer>": {"doc_ids": [...], "scores": [...]}}}`); this only
reads it.
"""

from __future__ import annotations

from typing import Any


def layer_line(selection: dict[str, Any] | None) -> str:
    """'layer 2: 5, 11, 3 | layer 3: ...' (best first), or a dash without a selection."""
    layers = (selection or {}).get("layers") or {}
    if not layers:
        return "-"
    return " | ".join(f"layer {layer}: {', '.join(map(str, s['doc_ids']))}"
                      for layer, s in layers.items())


def _short(text: str, width: int = 72) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def summarize(result: dict[str, Any], how: str) -> str:
    """`result`: a Memory Interleave result (`InterleaveResult.to_json()`, or the HTTP
    route's JSON), or a single request's {"question", "text", "selection"}."""
    lines = [f"{how}", f"  question   {result['question']}",
             f"  answer     {_short((result.get('answer') or result.get('text') or '').strip())}"]
    steps = result.get("steps")
    if steps is None:
        lines.append(f"  documents  {layer_line(result.get('selection'))}")
    for step in steps or ():
        if step.get("selection"):
            lines.append(f"  round {step['round']} ({step['phase']}): documents picked, "
                         f"{layer_line(step['selection'])}")
        if step.get("doc_ids"):
            lines.append(f"  round {step['round']}: the model asked for documents "
                         f"{', '.join(map(str, step['doc_ids']))}")
    return "\n".join(lines)


def write(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(text + "\n")
