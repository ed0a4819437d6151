"""Benchmark tulliusd against Celery (MongoDB transport) and RQ, in one go, and print a table.

What is measured (see README.md in this folder for how to run it):

1. no-op drain throughput through one daemon with 4 workers (N tasks queued
   while no daemon runs, then one starts; (N - 1) / (last body start - first));
2. pickup latency, queue call -> ``run()`` body starts, on an idle daemon,
   one task at a time (p50/p99);
3. how long after its deadline a timed-out task's process (and a child it
   started) is gone, measured against two deadlines: body start + timeout
   (a lower bound of the daemon's own deadline, which starts at dispatch)
   and claim time + timeout;
4. database round trips per task: the daemon talks to FerretDB through a
   counting TCP proxy while it drains N tasks; every request message is
   counted by command name (replies are one per request);
5. the same throughput and pickup figures for Celery and RQ
   (``compare_celery_rq.py``).

FerretDB is built and started with the integration tests' harness
(``tests/integration/ferretdb_server.py``), in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import bench_tasks  # noqa: E402
import pymongo  # noqa: E402
from compare_celery_rq import (  # noqa: E402
    bench_env,
    drain_rate,
    measure_pickup,
    percentile,
    run_celery,
    run_rq,
    stop_process,
    wait_lines,
)
from fault_tasks import proc_stat  # noqa: E402
from ferretdb_server import FerretDBServer, build_ferretdb  # noqa: E402

from tullius.api import insert_queued  # noqa: E402
from tullius.document import TERMINAL  # noqa: E402
from tullius.runtime.mongo_store import MongoStore  # noqa: E402
from tullius.task import to_spec  # noqa: E402

_HEADER = struct.Struct("<iiii")
_MONITORING = frozenset(
    {"hello", "ismaster", "isMaster", "ping", "buildinfo", "buildInfo", "endSessions"}
)


# --- a counting proxy -------------------------------------------------------------------------


class CountingProxy:
    """Relay 127.0.0.1:<port> to FerretDB, counting client requests by command name.

    The fault-injecting proxy of the tests does not count, and FerretDB's
    ``serverStatus`` has no reliable per-command counters, hence this small
    relay.  One thread per connection; counting is the only extra work.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        buf = bytearray()
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in sel.select():
                        src: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = src.recv(256 * 1024)
                        if not data:
                            return
                        if src is client:
                            buf += data
                            self._count(buf)
                            upstream.sendall(data)
                        else:
                            client.sendall(data)
            except OSError:
                return
            finally:
                client.close()
                upstream.close()

    def _count(self, buf: bytearray) -> None:
        while len(buf) >= 16:
            length, _, _, op_code = _HEADER.unpack_from(buf)
            if len(buf) < length:
                return
            name = f"op{op_code}"
            if op_code == 2013 and length > 26 and buf[20] == 0:  # OP_MSG, body section first
                end = buf.index(b"\0", 26)
                name = buf[26:end].decode("utf-8", "replace")
            with self._lock:
                self.counts[name] += 1
            del buf[:length]

    def close(self) -> None:
        self._stop = True
        self._listener.close()


# --- tulliusd ---------------------------------------------------------------------------------


class Daemon:
    """One ``tulliusd`` subprocess with 4 workers on one band."""

    def __init__(
        self, uri: str, database: str, workdir: Path, *, workers: int = 4, poll: float | None = None
    ) -> None:
        cmd = [
            "tulliusd",
            "--mongodb-uri",
            uri,
            "--database",
            database,
            "--processes",
            f"{workers}:0-10",
            "--lease",
            "30",
            "--server-name",
            f"bench-{database}",
            "--grace",
            "5",
        ]
        if poll is not None:
            cmd += ["--poll-interval", str(poll)]
        self.out = workdir / f"tulliusd-{database}.out"
        with open(self.out, "w") as sink:
            self.proc = subprocess.Popen(
                cmd, cwd=BENCH_DIR, env=bench_env(), stdout=sink, stderr=subprocess.STDOUT
            )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"tulliusd exited with {self.proc.returncode}: {self.out.read_text()[-2000:]}"
            )

    def stop(self) -> None:
        stop_process(self.proc, grace=30)


def queue_noops(store: MongoStore, log: Path, keys: list[str]) -> None:
    specs = [to_spec(bench_tasks.BenchNoop(log=str(log), key=key)) for key in keys]
    insert_queued(store, specs, now=datetime.now(UTC), new_id=lambda: uuid.uuid4().hex)


def wait_settled(store: MongoStore, count: int, timeout: float) -> None:
    terminal = [s.value for s in TERMINAL]
    deadline = time.monotonic() + timeout
    while store.finished.count_documents({"status": {"$in": terminal}}) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} tasks settled within {timeout}s")
        time.sleep(0.05)


def tullius_throughput(
    client: Any, uri: str, workdir: Path, tasks: int, poll: float | None, round_no: int = 0
) -> float:
    database = f"bench_tput_{round_no}"
    store = MongoStore(client[database])
    store.ensure_indexes()
    log = workdir / f"tullius-tput-{round_no}.log"
    queue_noops(store, log, [f"t{i}" for i in range(tasks)])
    daemon = Daemon(uri, database, workdir, poll=poll)
    try:
        rows = wait_lines(log, tasks, 600, "tullius throughput", daemon.check)
        wait_settled(store, tasks, 120)
    finally:
        daemon.stop()
    return drain_rate(rows)


def _gone(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def tullius_pickup_and_timeout(
    client: Any, uri: str, workdir: Path, samples: int, kills: int, poll: float | None
) -> tuple[list[float], list[dict[str, float]]]:
    db = client["bench_idle"]
    store = MongoStore(db)
    store.ensure_indexes()
    log = workdir / "tullius-pickup.log"
    daemon = Daemon(uri, "bench_idle", workdir, poll=poll)
    try:
        queue_noops(store, log, ["warmup"])
        wait_lines(log, 1, 120, "tullius warm-up", daemon.check)
        time.sleep(0.5)  # let the warm-up's verdict be recorded: the daemon is idle again
        latencies = measure_pickup(
            lambda key: queue_noops(store, log, [key]), log, samples, daemon.check
        )
        kill_log = workdir / "tullius-timeout.log"
        results = []
        for i in range(kills):
            [task_id] = insert_queued(
                store,
                [to_spec(bench_tasks.BenchTimeout(log=str(kill_log), key=f"k{i}"))],
                now=datetime.now(UTC),
                new_id=lambda: uuid.uuid4().hex,
            )
            rows = wait_lines(kill_log, i + 1, 120, f"timeout sample {i}", daemon.check)
            _, body_at, extra = rows[i]
            pid, child = (int(x) for x in extra.split())
            gone: dict[int, float] = {}
            deadline = time.monotonic() + 60
            while len(gone) < 2 and time.monotonic() < deadline:
                now = time.time()
                for p in (pid, child):
                    if p not in gone and _gone(p):
                        gone[p] = now
                time.sleep(0.0005)
            if len(gone) < 2:
                raise RuntimeError(
                    f"timed-out task {task_id}: processes {pid}/{child} still alive 60 s later"
                )
            run_record = store.records_for(task_id).find_one({"_id": f"{task_id}:run"})
            claim_at = run_record["at"].replace(tzinfo=UTC).timestamp() if run_record else body_at
            timeout = bench_tasks.TIMEOUT_SECONDS
            results.append(
                {
                    "worker_after_body_deadline": gone[pid] - (body_at + timeout),
                    "child_after_body_deadline": gone[child] - (body_at + timeout),
                    "worker_after_claim_deadline": gone[pid] - (claim_at + timeout),
                }
            )
            wait_settled(store, 1 + samples + i + 1, 120)  # its failure is handled before the next
    finally:
        daemon.stop()
    return latencies, results


def tullius_round_trips(
    server: FerretDBServer, client: Any, workdir: Path, tasks: int, poll: float | None
) -> dict[str, Any]:
    proxy = CountingProxy((server.host, server.port))
    store = MongoStore(client["bench_rt"])
    store.ensure_indexes()
    log = workdir / "tullius-rt.log"
    daemon = Daemon(proxy.uri, "bench_rt", workdir, poll=poll)
    try:
        queue_noops(store, log, ["warmup"])
        wait_lines(log, 1, 120, "round-trip warm-up", daemon.check)
        wait_settled(store, 1, 60)
        idle_from, idle_t0 = proxy.snapshot(), time.monotonic()
        time.sleep(2.0)  # an idle window of known length, to report the idle polling rate
        idle = proxy.snapshot() - idle_from
        idle_rate = sum(c for n, c in idle.items() if n not in _MONITORING) / (
            time.monotonic() - idle_t0
        )
        before = proxy.snapshot()
        queue_noops(store, log, [f"t{i}" for i in range(tasks)])  # direct: not counted
        wait_settled(store, tasks + 1, 600)
        spent = proxy.snapshot() - before
    finally:
        daemon.stop()
        proxy.close()
    work = {n: c for n, c in spent.items() if n not in _MONITORING}
    total = sum(work.values())
    return {
        "per_task": total / tasks,
        "idle_per_second": idle_rate,
        "by_command": {n: c / tasks for n, c in sorted(work.items(), key=lambda kv: -kv[1])},
    }


# --- report -----------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def merge_round(others: dict[str, dict[str, Any]], name: str, result: dict[str, Any]) -> None:
    """Add one round's figures: throughputs are listed, pickups kept from the first round."""
    merged = others.setdefault(name, {"throughputs": []})
    if result.get("throughput"):
        merged["throughputs"].append(result["throughput"])
    for key in ("pickup", "settings", "error"):
        if result.get(key) and key not in merged:
            merged[key] = result[key]


def report(
    args: argparse.Namespace,
    uri: str,
    t_rates: list[float],
    t_pickup: list[float],
    kills: list[dict[str, float]],
    rt: dict[str, Any],
    others: dict[str, dict[str, Any]],
) -> None:
    """Print the comparison table, the Tullius-only figures, and the issue's goals."""
    t50 = percentile(t_pickup, 50)
    t_rate = statistics.median(t_rates)
    print()
    print(f"=== Tullius benchmark: {os.cpu_count()} CPUs, FerretDB at {uri}, ")
    print(
        f"    {args.tasks} tasks per throughput run, {args.rounds} round(s) "
        f"(median, then range), {args.samples} pickup samples ==="
    )
    head = f"{'system':28} {'no-op tasks/s':>13} {'range':>9} {'pickup p50':>11} {'pickup p99':>11}"
    print(f"{head}   tullius tput / theirs, their p50 / tullius p50")
    rows = [("tullius", {"throughputs": t_rates, "pickup": t_pickup}), *others.items()]
    for name, res in rows:
        rates = res.get("throughputs") or []
        rate = statistics.median(rates) if rates else None
        spread = f"{min(rates):.0f}-{max(rates):.0f}" if rates else "-"
        pickup = res.get("pickup")
        p50 = percentile(pickup, 50) if pickup else None
        p99 = percentile(pickup, 99) if pickup else None
        ratio = ""
        if name != "tullius":
            ratio = f"x{t_rate / rate:.2f}" if rate else "-"
            ratio += f", x{p50 / t50:.2f}" if p50 else ", -"
        rate_s = f"{rate:13.0f}" if rate else f"{'-':>13}"
        print(f"{name:28} {rate_s} {spread:>9} {ms(p50):>11} {ms(p99):>11}   {ratio}")
        if res.get("error"):
            print(f"    error: {res['error']}")
    poll = "its default poll interval" if args.poll is None else f"--poll-interval {args.poll}"
    print(f"    tullius: tulliusd --processes 4:0-10, {poll}")
    for name, res in others.items():
        if res.get("settings"):
            print(f"    {name}: {res['settings']}")
    print()
    w = [k["worker_after_body_deadline"] for k in kills]
    c = [k["child_after_body_deadline"] for k in kills]
    wc = [k["worker_after_claim_deadline"] for k in kills]
    print(f"timeout kill ({len(kills)} tasks, timeout {bench_tasks.TIMEOUT_SECONDS}s):")
    for label, values in (
        ("task process gone after body start + timeout", w),
        ("its child process gone after the same       ", c),
        ("task process gone after claim + timeout     ", wc),
    ):
        print(f"    {label}: p50 {ms(percentile(values, 50))}, max {ms(max(values))}")
    print(f"database round trips per no-op task ({args.rt_tasks} tasks drained):")
    print(f"    {rt['per_task']:.1f} (every command while draining, polling included)")
    print(f"    idle daemon: {rt['idle_per_second']:.0f} commands/s (polling, heartbeats, sweeps)")
    print("    by command: " + ", ".join(f"{n} {v:.2f}" for n, v in rt["by_command"].items()))
    beaten = [
        statistics.median(r["throughputs"]) if r["throughputs"] else 0 for r in others.values()
    ]
    goals = [
        ("pickup p50 < 20 ms", t50 < 0.020),
        ("timeout kill within 100 ms of the deadline", max(w) < 0.100),
        ("throughput ahead of both", all(b < t_rate for b in beaten) if beaten else None),
    ]
    verdicts = {True: "met", False: "NOT met", None: "n/a"}
    print("goals: " + "; ".join(f"{g}: {verdicts[ok]}" for g, ok in goals))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500, help="tasks per throughput run")
    parser.add_argument("--samples", type=int, default=100, help="pickup latency samples")
    parser.add_argument("--kills", type=int, default=10, help="timeout samples")
    parser.add_argument("--rt-tasks", type=int, default=300, help="tasks for round-trip counting")
    parser.add_argument(
        "--poll", type=float, default=None, help="tulliusd --poll-interval (default: its own)"
    )
    parser.add_argument(
        "--celery-poll", type=float, default=0.01, help="kombu MongoDB polling_interval"
    )
    parser.add_argument("--skip-others", action="store_true", help="measure Tullius only")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="throughput runs per system, interleaved (the table gives the median and range)",
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="tullius-bench-"))
    print(f"workdir {workdir}; building/starting FerretDB ...", flush=True)
    server = FerretDBServer(build_ferretdb(), workdir / "ferretdb", log_level="warn")
    server.start(timeout=120)
    client: Any = pymongo.MongoClient(server.uri, tz_aware=True)
    try:
        t_rates: list[float] = []
        others: dict[str, dict[str, Any]] = {}
        for round_no in range(args.rounds):
            # Interleaved, so that a change in the machine's load hits every system alike.
            print(f"round {round_no + 1}/{args.rounds}: tullius throughput ...", flush=True)
            t_rates.append(
                tullius_throughput(client, server.uri, workdir, args.tasks, args.poll, round_no)
            )
            if args.skip_others:
                continue
            print(f"round {round_no + 1}/{args.rounds}: celery ...", flush=True)
            merge_round(
                others,
                "celery (mongodb transport)",
                run_celery(
                    server.uri,
                    workdir / f"celery-{round_no}",
                    tasks=args.tasks,
                    samples=args.samples if round_no == 0 else 1,
                    poll=args.celery_poll,
                ),
            )
            print(f"round {round_no + 1}/{args.rounds}: rq ...", flush=True)
            merge_round(
                others,
                "rq (redis)",
                run_rq(
                    workdir / f"rq-{round_no}",
                    tasks=args.tasks,
                    samples=args.samples if round_no == 0 else 1,
                ),
            )
        print("tullius: pickup latency and timeout kills ...", flush=True)
        t_pickup, kills = tullius_pickup_and_timeout(
            client, server.uri, workdir, args.samples, args.kills, args.poll
        )
        print("tullius: round trips ...", flush=True)
        rt = tullius_round_trips(server, client, workdir, args.rt_tasks, args.poll)
    finally:
        client.close()
        server.stop()

    report(args, server.uri, t_rates, t_pickup, kills, rt, others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
