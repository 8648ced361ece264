#!/usr/bin/env python3
"""Checks that the workspace's crates depend on each other only downward, as
docs/architecture.md draws them, and that the lower layers stay free of HTTP servers and
I/O. Reads `cargo metadata` (the resolved graph, normal dependencies only: dev- and
build-dependencies are not part of a crate's layer). Exits 1 naming every violation."""

import json
import subprocess
import sys

# Which workspace crates each workspace crate may depend on (directly or not). A crate
# missing here is a new crate: it must be placed in the table before it can land.
ALLOWED = {
    "tessera-spec": set(),
    "tessera-config": set(),
    "tessera-trust": {"tessera-spec"},
    "tessera-access": {"tessera-spec"},
    # Renders pages from what it is handed: no other crate of ours, no server, no I/O.
    "tessera-ui": set(),
    "tessera-store": {"tessera-spec"},
    "tessera-registry": {"tessera-spec", "tessera-store"},
    "tessera-client": {"tessera-spec", "tessera-config"},
    "tessera-federation": {
        "tessera-spec", "tessera-config", "tessera-store", "tessera-registry", "tessera-client", "tessera-trust",
    },
    "tessera-http": {
        "tessera-spec", "tessera-config", "tessera-store", "tessera-registry", "tessera-client",
        "tessera-federation", "tessera-access", "tessera-trust", "tessera-ui",
    },
    "tessera": {
        "tessera-spec", "tessera-config", "tessera-store", "tessera-registry", "tessera-client",
        "tessera-federation", "tessera-access", "tessera-http", "tessera-trust", "tessera-ui",
    },
    "tessera-testkit": {"tessera-spec"},
    # The harness also measures the metadata store on its own (the database's write ceiling).
    "tessera-bench": {"tessera-spec", "tessera-testkit", "tessera-store"},
}

# Outside crates a layer must never pull in, even through another crate.
# (hyper-util and tower-http also serve reqwest's client side, so axum is what marks a server.)
HTTP_SERVER = {"axum"}
IO = {"tokio", "mio", "reqwest", "hyper", "rusqlite", "libsqlite3-sys", "socket2", "object_store"}
FORBIDDEN = {
    "tessera-spec": HTTP_SERVER | IO,
    "tessera-config": HTTP_SERVER | IO,
    "tessera-trust": HTTP_SERVER | IO,
    "tessera-ui": HTTP_SERVER | IO,
    "tessera-access": HTTP_SERVER,
    "tessera-store": HTTP_SERVER,
    "tessera-registry": HTTP_SERVER,
    "tessera-client": HTTP_SERVER,
    "tessera-federation": HTTP_SERVER,
}


def main() -> int:
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    names = {p["id"]: p["name"] for p in meta["packages"]}
    members = {names[m] for m in meta["workspace_members"]}
    normal = {}
    for node in meta["resolve"]["nodes"]:
        normal[node["id"]] = [
            d["pkg"] for d in node["deps"]
            if any(k.get("kind") is None for k in d["dep_kinds"])
        ]
    ids = {names[i]: i for i in normal if names[i] in members}

    def closure(start):
        seen, todo = set(), [start]
        while todo:
            for dep in normal[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return {names[i] for i in seen}

    problems = []
    for crate in sorted(members):
        if crate not in ALLOWED:
            problems.append(f"{crate}: not placed in .ci/layers.py (ALLOWED)")
            continue
        reached = closure(ids[crate])
        for dep in sorted((reached & members) - ALLOWED[crate]):
            problems.append(f"{crate} depends on {dep}, which is not below it")
        for dep in sorted(reached & FORBIDDEN.get(crate, set())):
            problems.append(f"{crate} depends on {dep}, which its layer must not use")
    for p in problems:
        print(f"layering: {p}", file=sys.stderr)
    if not problems:
        print(f"layering: {len(members)} crates depend only downward")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
