#!/usr/bin/env python3
"""Runs the workspace's test binaries, one or several at a time (scripts/test.sh, Tests step).

`cargo test` runs one test binary after another. Most of Tessera's end-to-end binaries spend
their time waiting on real processes (servers, agents, Envoy, PostgreSQL, timers), so the
machine sits mostly idle while they run. This builds them with `cargo test --no-run`, then
runs up to --jobs binaries at once (default 1, or TESSERA_TEST_JOBS; see main()), the
slowest first (durations of the previous run, kept in target/test-durations.json; a fixed
list on a fresh clone), each the way cargo would
(working directory = its package's, CARGO_MANIFEST_DIR set), and prints each binary's
output whole when it ends, so that outputs do not interleave. Doc tests run last through
cargo. Like `cargo test --no-fail-fast`: every binary runs, and the exit status is 1 when
any failed or ran past --timeout.

    scripts/run-tests.py [--jobs N] [--timeout SECONDS] [-- extra arguments for cargo]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DURATIONS = ROOT / "target" / "test-durations.json"
# Seconds each slow binary took in a fresh-clone .ci/run on this project's 2-core machine
# (2026-12-03): the order on a fresh clone, where target/test-durations.json does not exist yet.
HINTS = {
    "tessera-e2e/netfaults": 99, "tessera-e2e/images": 15, "tessera-e2e/arm64": 14,
    "tessera-e2e/disk": 36, "tessera-e2e/durability": 34, "tessera-e2e/upgrade_live": 27,
    "tessera-e2e/doctor": 25, "tessera-e2e/attacks": 23, "tessera-e2e/istio": 21,
    "tessera-e2e/ha": 18, "tessera-e2e/kubernetes": 16, "tessera-e2e/federation": 12,
}


# Every process this script starts (cargo, each test binary) runs in a process group of its
# own, so that a test binary that runs past the timeout goes with everything it started. Those
# groups do not get the terminal's Ctrl-C: SIGINT and SIGTERM to this script kill them all
# (stop_all).
RUNNING = set()
RUNNING_LOCK = threading.Lock()
STOPPING = threading.Event()


def spawn(cmd, **kwargs):
    """Starts cmd in a process group of its own, known to stop_all."""
    with RUNNING_LOCK:
        if STOPPING.is_set():
            raise OSError("run-tests is stopping")
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        RUNNING.add(proc)
    return proc


def reap(proc):
    with RUNNING_LOCK:
        RUNNING.discard(proc)


def stop_all(signum, _frame):
    STOPPING.set()
    with RUNNING_LOCK:
        for proc in RUNNING:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.write(2, f"\nrun-tests: stopped by signal {signum}; every process it started was killed\n".encode())
    except OSError:
        pass
    os._exit(128 + signum)


def build(cargo_args):
    """Builds every test binary; returns them as dicts (key, exe, cwd, label)."""
    cmd = ["cargo", "test", "--workspace", "--no-run", "--message-format=json-render-diagnostics", *cargo_args]
    proc = spawn(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    binaries = []
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        target = msg["target"]
        manifest = Path(msg["manifest_path"])
        package = msg["package_id"].split("#")[-1].split("@")[0].split("/")[-1]
        kind = target["kind"][0]
        src = os.path.relpath(target["src_path"], ROOT)
        binaries.append({
            "key": f"{package}/{target['name']}" + ("" if kind == "test" else f"[{kind}]"),
            "exe": msg["executable"],
            "cwd": str(manifest.parent),
            "label": f"{kind} {src} ({os.path.relpath(msg['executable'], ROOT)})",
        })
    status = proc.wait()
    reap(proc)
    if status != 0:
        sys.exit(status)
    return binaries


def run_one(binary, test_args, timeout):
    env = dict(os.environ, CARGO_MANIFEST_DIR=binary["cwd"])
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = spawn([binary["exe"], *test_args], cwd=binary["cwd"], env=env,
                         stdout=out, stderr=subprocess.STDOUT)
        except OSError as e:
            return binary, -1, f"run-tests: {binary['key']} could not be started: {e}\n", 0.0
        try:
            status = proc.wait(timeout=timeout)
            note = ""
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = -9
            note = f"\nrun-tests: {binary['key']} ran past {timeout} s and was killed\n"
        finally:
            reap(proc)
        out.seek(0)
        # Test output carries what child processes logged: not always UTF-8.
        return binary, status, out.read().decode("utf-8", errors="replace") + note, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # One at a time by default: with three, two binaries failed in one fresh-clone run of four
    # with "Address already in use" (tessera_test_util::procs::free_port reserves a port by
    # binding port 0 and closing it; another binary's connections can take it before the
    # server binds it). More than one waits for ports outside the ephemeral range.
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("TESSERA_TEST_JOBS", "1")))
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one test binary may take")
    parser.add_argument("cargo_args", nargs="*", help="after --: more arguments for cargo test --no-run")
    args = parser.parse_args()

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    binaries = build(args.cargo_args)
    try:
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        known = {}
    binaries.sort(key=lambda b: -known.get(b["key"], HINTS.get(b["key"], 0)))
    print(f"run-tests: {len(binaries)} test binaries, {args.jobs} at a time", flush=True)

    started = time.monotonic()
    failed, durations = [], dict(known)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, b, [], args.timeout) for b in binaries]
        for future in as_completed(futures):
            binary, status, output, took = future.result()
            durations[binary["key"]] = round(took, 1)
            print(f"     Running {binary['label']}  [{took:.1f} s]", flush=True)
            sys.stdout.write(output)
            sys.stdout.flush()
            if status != 0:
                failed.append(binary["key"])

    doc = spawn(["cargo", "test", "--workspace", "--doc", *args.cargo_args], cwd=ROOT)
    doc_status = doc.wait()
    reap(doc)
    if doc_status != 0:
        failed.append("doc tests")

    try:
        DURATIONS.write_text(json.dumps(durations, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass
    print(f"run-tests: all binaries ran in {time.monotonic() - started:.0f} s", flush=True)
    if failed:
        print("run-tests: failed: " + " ".join(failed), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
