"""Ask a running `vllm serve` (with vllm-msa's route enabled) a question over a bank.

    python examples/ask_server.py --url http://127.0.0.1:8000 --bank docs \
        --question "Which river flooded the old mill?" [--stream]

The server answers with Memory Interleave; `--stream` prints its server-sent events as they
arrive (each step's text, the documents it appended, then the result).
"""

from __future__ import annotations

import argparse
import json

import httpx
import summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--bank", default=None, help="bank name (default: the server's)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--summary", default=None,
                        help="also append a short readable account of the answer to this file")
    args = parser.parse_args()
    body = {"question": args.question, "max_tokens": args.max_tokens,
            "return_selection": True, "stream": args.stream}
    if args.bank:
        body["bank"] = args.bank
    url = f"{args.url}/v1/msa/answer"
    if not args.stream:
        response = httpx.post(url, json=body, timeout=600)
        if response.is_error:  # the server says why (an unknown bank, a bad option, ...)
            raise SystemExit(f"{response.status_code}: {response.text}")
        print(json.dumps(response.json(), indent=2))
        summary.write(args.summary, summary.summarize(response.json(),
                                                      f"vllm serve ({url})"))
        return
    with httpx.stream("POST", url, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                if event["type"] == "delta":
                    print(event["text"], end="", flush=True)
                elif event["type"] == "step":
                    print(f"\n[round {event['round']} {event['phase']}: {event['outcome']}, "
                          f"documents {event['doc_ids']}]")
                else:
                    print(json.dumps({"answer": event["answer"],
                                      "stopped_by": event["stopped_by"],
                                      "retrieved_doc_ids": event["retrieved_doc_ids"]}))


if __name__ == "__main__":
    main()
