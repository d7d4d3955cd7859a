#!/usr/bin/env python3
"""Writes a CycloneDX 1.5 SBOM (JSON) of tessera-server and tessera-agent from Cargo.lock.

Usage: scripts/sbom.py [OUTPUT]   (default: target/sbom/tessera.cdx.json)

The component list is what the two binaries link: every package reachable from them through
normal and build dependencies in `cargo metadata --locked`, on this platform, with its version,
package URL (pkg:cargo), SPDX licence expression and the SHA-256 that Cargo.lock records. The
dependency graph is included. No network: cargo metadata reads the registry cache.
"""

import datetime
import json
import pathlib
import subprocess
import sys
import uuid

ROOTS = ("tessera-server", "tessera-agent")


def main() -> int:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/sbom/tessera.cdx.json")
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host_triple()],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    checksums = lock_checksums(pathlib.Path(meta["workspace_root"]) / "Cargo.lock")

    roots = [pid for pid, p in packages.items() if p["name"] in ROOTS and p["source"] is None]
    if len(roots) != len(ROOTS):
        print(f"sbom: cannot find {ROOTS} in the workspace", file=sys.stderr)
        return 1
    reachable, edges, stack = set(), {}, list(roots)
    while stack:
        pid = stack.pop()
        if pid in reachable:
            continue
        reachable.add(pid)
        deps = []
        for d in nodes[pid]["deps"]:
            if any(k["kind"] in (None, "build") for k in d["dep_kinds"]):
                deps.append(d["pkg"])
                stack.append(d["pkg"])
        edges[pid] = sorted(set(deps))

    def ref(pid: str) -> str:
        p = packages[pid]
        return f"pkg:cargo/{p['name']}@{p['version']}"

    components = []
    for pid in sorted(reachable, key=lambda i: (packages[i]["name"], packages[i]["version"])):
        p = packages[pid]
        c = {
            "type": "application" if pid in roots else "library",
            "bom-ref": ref(pid),
            "name": p["name"],
            "version": p["version"],
            "purl": ref(pid),
        }
        if p.get("license"):
            c["licenses"] = [{"expression": p["license"]}]
        sha = checksums.get((p["name"], p["version"]))
        if sha:
            c["hashes"] = [{"alg": "SHA-256", "content": sha}]
        if p["source"] is None:
            # Built from this repository (our crates, the patched h2 in third_party/).
            c["properties"] = [{"name": "cargo:source", "value": "path"}]
        components.append(c)

    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "scripts/sbom.py"}]},
            "component": {"type": "application", "bom-ref": "tessera", "name": "tessera"},
        },
        "components": components,
        "dependencies": [{"ref": ref(pid), "dependsOn": [ref(d) for d in edges[pid]]} for pid in sorted(reachable)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(bom, indent=2) + "\n")
    tmp.replace(out)
    print(f"sbom: {len(components)} components -> {out}")
    return 0


def host_triple() -> str:
    v = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in v.splitlines() if line.startswith("host: "))


def lock_checksums(lock: pathlib.Path) -> dict:
    sums, name, version = {}, None, None
    for line in lock.read_text().splitlines():
        if '"' not in line:
            continue
        if line.startswith("name = "):
            name, version = line.split('"')[1], None
        elif line.startswith("version = "):
            version = line.split('"')[1]
        elif line.startswith("checksum = ") and name and version:
            sums[(name, version)] = line.split('"')[1]
    return sums


if __name__ == "__main__":
    sys.exit(main())
