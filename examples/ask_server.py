"""Ask a running `vllm serve` (with vllm-msa's route enabled) a question over a bank.

    python examples/ask_server.py --url http://127.0.0.1:8000 --bank docs \
        --question "Which river flooded the old mill?"
"""

from __future__ import annotations

import argparse
import json

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--bank", default=None, help="bank name (default: the server's)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    body = {"question": args.question, "max_tokens": args.max_tokens,
            "return_selection": True}
    if args.bank:
        body["bank"] = args.bank
    response = httpx.post(f"{args.url}/v1/msa/answer", json=body, timeout=600)
    response.raise_for_status()
    print(json.dumps(response.json(), indent=2))


if __name__ == "__main__":
    main()
