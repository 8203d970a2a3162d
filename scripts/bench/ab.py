"""A/B of two trees: kgsupervisor's 0 ms drain and the bare loop beside it, for the tree given.

    <tree>/.venv/bin/python scripts/bench/ab.py TREE WORKERS DOCUMENTS ROUNDS OUT.jsonl

Run it alternately for two checkouts (each with its own `.venv` holding `.[bench]`) and compare
the medians: docs/benchmarks.md's "The attempt history's cost" was measured so, four rounds a
tree at 1 and 2 workers on 1,000 documents.
"""
from __future__ import annotations

import dataclasses
import json
import sys


def main(tree: str, workers: int, documents: int, rounds: int, out: str) -> None:
    sys.path.insert(0, tree + "/scripts")
    from bench import context
    context.QUICK = dataclasses.replace(context.QUICK, documents=documents)
    from bench import drain
    ctx = context.Context.create(True, None, keep=False)
    rows = []
    for _ in range(rounds):
        for name, factory in (("ours", drain.ours(ctx, workers)), ("bare", drain.bare(ctx, workers))):
            row = drain.drain(ctx, name, workers, 0.0, factory)
            rows.append({"tree": tree, "workers": workers, "who": name, "rate": row["rate"],
                         "wall_rate": row["wall_rate"], "exact": row["exact"], "completed": row["completed"]})
    with open(out, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    tree, workers, documents, rounds, out = sys.argv[1:6]
    main(tree, int(workers), int(documents), int(rounds), out)
