"""``python -m bench``: run every benchmark, print each table, write bench/results/*.json."""

from __future__ import annotations

import argparse

PARTS = ("decision", "prefixcache", "ingest", "envoy_load", "sustained", "fleet", "remotetok", "redis_modes", "tiers",
         "ttft_real")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("parts", nargs="*", help=f"which parts to run: {', '.join(PARTS)} (default: all)")
    args = parser.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    for part in args.parts or PARTS:
        module = __import__(f"bench.{part}", fromlist=["run"])
        print(f"== {part}")
        module.run()


if __name__ == "__main__":
    main()
