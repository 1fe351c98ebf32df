#!/usr/bin/env python3
"""Run with: bench/heaptrack_breakdown.py BASE.stacks LOADED.stacks CONNECTIONS (bench/heaptrack.sh does)

Per-connection live heap by owner, from two heaptrack collapsed-stack files (heaptrack_print
--flamegraph-cost-type leaked -F): one with no client, one with CONNECTIONS idle clients.

Each stack's bytes go to an owner, the nearest crate to the allocation that manages
connections (evo-realtime, socketioxide, engineioxide, hyper, axum/tower), shown with the
library that made the allocation for it (`engineioxide via tokio` is its packet channel and
the tasks it spawns). Frames that heaptrack could not name (inlined code, shown as
addresses) end the search at the task boundary: such stacks are "unnamed spawner". The
largest sites follow, with their first named frames, for the table in BENCHMARKS.md.
"""
import collections
import re
import sys

OWNERS = [
    ("evo_realtime", "evo-realtime (ours)"),
    ("socketioxide", "socketioxide"),
    ("engineioxide", "engineioxide"),
    ("hyper", "hyper"),
    ("axum", "axum/tower"),
    ("tower", "axum/tower"),
]
LIBRARIES = [
    ("tokio_tungstenite", "tungstenite"),
    ("tungstenite", "tungstenite"),
    ("tokio", "tokio"),
    ("http", "http"),
    ("bytes", "bytes"),
    ("hashbrown", "hashbrown"),
    ("smallvec", "smallvec"),
    ("futures", "futures"),
]
# Where a task's own stack begins: frames above it belong to whoever polls, not who spawned.
TASK_BOUNDARY = re.compile(r"tokio::runtime::task::(core::Core.*::poll|raw::poll|harness)")


def crate(frame, table):
    name = frame.lstrip("_<&* ").replace("$LT$", "<").lstrip("<")
    for prefix, label in table:
        if name.startswith(prefix + "::") or name.startswith(prefix + ".."):
            return label
    return None


def classify(stack):
    frames = stack.split(";")  # root first
    library = None
    for frame in reversed(frames):  # from the allocation outwards
        owner = crate(frame, OWNERS)
        if owner:
            return owner if library in (None, owner) else f"{owner} via {library}"
        if TASK_BOUNDARY.search(frame):
            break
        library = library or crate(frame, LIBRARIES)
    return f"unnamed spawner via {library}" if library else "unnamed"


def site(stack, frames=3):
    named = [f for f in reversed(stack.split(";")) if not f.startswith("0x")]
    short = [re.sub(r"::h[0-9a-f]{16}$", "", f).replace("$LT$", "<").replace("$GT$", ">")
             .replace("$C$", ",").replace("$u20$", " ")[:70] for f in named[:frames]]
    return " <- ".join(short)


def load(path):
    stacks = collections.Counter()
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, cost = line.rstrip("\n").rpartition(" ")
        if cost.isdigit():
            stacks[stack] += int(cost)
    return stacks


def main():
    base, loaded, connections = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
    per_stack = {k: (loaded[k] - base[k]) / connections for k in set(base) | set(loaded)}
    owners = collections.Counter()
    for stack, per in per_stack.items():
        owners[classify(stack)] += per
    total = sum(per_stack.values())
    print(f"live heap per connection over {connections} connections: {total:,.0f} B")
    print(f"{'owner (via the library that allocated)':<44} {'B/connection':>12} {'share':>7}")
    for owner, per in owners.most_common():
        if abs(per) >= 1:
            print(f"{owner:<44} {per:>12,.0f} {per / total:>7.1%}")
    print("\nlargest sites (B/connection; first named frames, allocation first)")
    for stack, per in sorted(per_stack.items(), key=lambda kv: -kv[1])[:16]:
        print(f"{per:>8,.0f}  {site(stack)}")


if __name__ == "__main__":
    main()
