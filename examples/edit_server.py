"""Edit a bank that a running `vllm serve` (with vllm-msa's routes enabled) serves.

    export VLLM_MSA_ADMIN_KEY=...                      # the server's admin key
    python examples/edit_server.py --bank docs show
    python examples/edit_server.py --bank docs add --id 9001 --text "The mill flooded in 1821."
    python examples/edit_server.py --bank docs add --file more_docs.jsonl
    python examples/edit_server.py --bank docs replace --id 9001 --text "A corrected text."
    python examples/edit_server.py --bank docs remove --id 9001

Each edit returns once it is on disk and every worker routes over it: the next question can
select an added document and never a removed one.
"""

from __future__ import annotations

import argparse
import json
import os

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--bank", required=True)
    parser.add_argument("--key", default=os.environ.get("VLLM_MSA_ADMIN_KEY"),
                        help="the admin key (default: $VLLM_MSA_ADMIN_KEY)")
    parser.add_argument("action", choices=("show", "add", "replace", "remove"))
    parser.add_argument("--id", type=int)
    parser.add_argument("--text")
    parser.add_argument("--file", help="add: a DOCS.jsonl of {\"id\", \"text\"} lines")
    args = parser.parse_args()
    base = f"{args.url}/v1/msa/banks/{args.bank}"
    headers = {"X-MSA-Admin-Key": args.key} if args.key else {}
    if args.action == "show":
        response = httpx.get(base, timeout=60)
    elif args.action == "add":
        if args.file:
            with open(args.file) as f:
                documents = [json.loads(line) for line in f if line.strip()]
        else:
            documents = [{"id": args.id, "text": args.text}]
        response = httpx.post(f"{base}/documents", json={"documents": documents},
                              headers=headers, timeout=600)
    elif args.action == "replace":
        response = httpx.put(f"{base}/documents/{args.id}", json={"text": args.text},
                             headers=headers, timeout=600)
    else:
        response = httpx.delete(f"{base}/documents/{args.id}", headers=headers, timeout=60)
    if response.is_error:  # the server says why (no key, unknown id, too long, ...)
        raise SystemExit(f"{response.status_code}: {response.text}")
    print(json.dumps(response.json(), indent=2))


if __name__ == "__main__":
    main()
