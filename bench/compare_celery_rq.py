"""What a user would pick instead of Tullius, measured the same way: Celery and RQ.

* Celery 5 with kombu's MongoDB transport, against the benchmark's FerretDB,
  one worker with ``-c 4`` (prefork), results disabled.
* RQ on a local ``redis-server`` (Debian's package), four ``rq worker``
  processes (RQ's default worker forks a work horse per job).

Both run the same task body as Tullius (``bench_plain.plain_noop``: append one
time-stamped line to a log), and both are measured like Tullius:

* drain throughput: N tasks are queued while no worker runs, then the
  workers start; rate = (N - 1) / (last body start - first body start);
* pickup latency: on an idle worker, one task at a time, from just before the
  enqueue call to the body's time stamp.

Used by ``daemon_bench.py``; runnable alone with ``--mongodb-uri`` for Celery.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


# --- shared measuring helpers ------------------------------------------------------------------


def read_log(log: Path) -> list[tuple[str, float, str]]:
    """The ``(key, time, extra)`` lines the task bodies appended."""
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2:
            rows.append((parts[0], float(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def wait_lines(
    log: Path, count: int, timeout: float, what: str, alive: Callable[[], None] | None = None
) -> list[tuple[str, float, str]]:
    """Poll ``log`` until it has ``count`` lines; raise naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        rows = read_log(log)
        if len(rows) >= count:
            return rows
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {len(rows)} of {count} task bodies ran within {timeout}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.005 if count - len(rows) <= 1 else 0.05)


def drain_rate(rows: list[tuple[str, float, str]]) -> float:
    times = sorted(t for _, t, _ in rows)
    span = times[-1] - times[0]
    return (len(times) - 1) / span if span > 0 else float("inf")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure_pickup(
    enqueue: Callable[[str], None], log: Path, samples: int, alive: Callable[[], None] | None = None
) -> list[float]:
    """Latencies (seconds) of ``samples`` single tasks queued on an idle worker."""
    rng = random.Random(12)
    latencies = []
    base = len(read_log(log))
    for i in range(samples):
        key = f"pickup{i}"
        time.sleep(rng.uniform(0.005, 0.05))  # decorrelate from any poll period
        sent = time.time()
        enqueue(key)
        rows = wait_lines(log, base + i + 1, 60, f"pickup sample {i}", alive)
        started = next(t for k, t, _ in rows if k == key)
        latencies.append(started - sent)
    return latencies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], grace: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _checker(procs: list[subprocess.Popen[Any]], name: str, out: Path) -> Callable[[], None]:
    def check() -> None:
        for proc in procs:
            if proc.poll() is not None:
                tail = out.read_text()[-2000:] if out.exists() else ""
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode}; output ends:\n{tail}"
                )

    return check


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    return env


# --- Celery -----------------------------------------------------------------------------------


def run_celery(
    mongodb_uri: str, workdir: Path, *, tasks: int, samples: int, poll: float
) -> dict[str, Any]:
    """Celery with the MongoDB transport against ``mongodb_uri``; returns figures or an error."""
    workdir.mkdir(parents=True, exist_ok=True)
    database = f"celery_bench_{os.getpid()}"
    broker = mongodb_uri.rstrip("/") + "/" + database
    env = bench_env()
    env.update(BENCH_CELERY_BROKER=broker, BENCH_CELERY_POLL=str(poll))
    os.environ.update(BENCH_CELERY_BROKER=broker, BENCH_CELERY_POLL=str(poll))
    sys.path.insert(0, str(BENCH_DIR))
    try:
        from celery_bench_app import app, noop
    except Exception as error:  # report any import/setup problem as the result
        return {"error": f"{type(error).__name__}: {error}"}
    app.conf.broker_url = broker
    app.conf.broker_transport_options = {"polling_interval": poll}

    result: dict[str, Any] = {
        "settings": f"celery worker -c 4 (prefork), MongoDB transport, polling_interval={poll}s"
    }
    log = workdir / "celery.log"
    out = workdir / "celery-worker.out"
    try:
        for i in range(tasks):  # queued before any worker runs
            noop.delay(str(log), f"t{i}")
    except Exception as error:  # the transport's own error is the finding
        return {"error": f"queueing failed: {type(error).__name__}: {error}"}
    cmd = [
        "celery",
        "-A",
        "celery_bench_app",
        "worker",
        "-c",
        "4",
        "-P",
        "prefork",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
    ]
    with open(out, "w") as sink:
        worker = subprocess.Popen(
            cmd,
            cwd=BENCH_DIR,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    alive = _checker([worker], "celery worker", out)
    try:
        rows = wait_lines(log, tasks, 600, "celery throughput", alive)
        result["throughput"] = drain_rate(rows)
        pickup_log = workdir / "celery-pickup.log"
        result["pickup"] = measure_pickup(
            lambda key: noop.delay(str(pickup_log), key), pickup_log, samples, alive
        )
    except (TimeoutError, RuntimeError) as error:
        result["error"] = str(error)
    finally:
        stop_process(worker)
        try:
            import pymongo

            pymongo.MongoClient(mongodb_uri).drop_database(database)
        except Exception:  # cleanup only; the figures are already taken
            pass
    return result


# --- RQ ---------------------------------------------------------------------------------------


def run_rq(workdir: Path, *, tasks: int, samples: int, workers: int = 4) -> dict[str, Any]:
    """RQ on a private ``redis-server``; returns figures or an error."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = shutil.which("redis-server")
    if server is None:
        return {"error": "redis-server is not installed (apt-get install -y redis-server)"}
    try:
        import redis
        from rq import Queue
    except ImportError as error:
        return {"error": f"{error}; pip install rq redis"}
    port = free_port()
    redis_proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    conn = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or redis_proc.poll() is not None:
                stop_process(redis_proc)
                return {"error": f"redis-server on port {port} did not answer within 30s"}
            time.sleep(0.05)
    sys.path.insert(0, str(BENCH_DIR))
    from bench_plain import plain_noop

    queue = Queue("bench", connection=conn)
    log = workdir / "rq.log"
    result: dict[str, Any] = {
        "settings": f"{workers} x rq worker (fork per job), redis-server {port}"
    }
    for i in range(tasks):
        queue.enqueue(plain_noop, str(log), f"t{i}")
    out = workdir / "rq-workers.out"
    procs = []
    with open(out, "w") as sink:
        for n in range(workers):
            procs.append(
                subprocess.Popen(
                    [
                        "rq",
                        "worker",
                        "--url",
                        url,
                        "--name",
                        f"bench-{os.getpid()}-{n}",
                        "-q",
                        "bench",
                    ],
                    cwd=BENCH_DIR,
                    env=bench_env(),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    alive = _checker(procs, "rq worker", out)
    try:
        rows = wait_lines(log, tasks, 600, "rq throughput", alive)
        result["throughput"] = drain_rate(rows)
        pickup_log = workdir / "rq-pickup.log"
        result["pickup"] = measure_pickup(
            lambda key: queue.enqueue(plain_noop, str(pickup_log), key), pickup_log, samples, alive
        )
    except (TimeoutError, RuntimeError) as error:
        result["error"] = str(error)
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(redis_proc)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Celery (MongoDB transport) and RQ no-op figures")
    parser.add_argument(
        "--mongodb-uri", help="MongoDB/FerretDB for Celery's transport (Celery skipped without it)"
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--celery-poll", type=float, default=0.02)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tullius-bench-compare"))
    args = parser.parse_args(argv)
    if args.mongodb_uri:
        print(
            "celery:",
            summarize(
                run_celery(
                    args.mongodb_uri,
                    args.workdir / "celery",
                    tasks=args.tasks,
                    samples=args.samples,
                    poll=args.celery_poll,
                )
            ),
        )
    print("rq:", summarize(run_rq(args.workdir / "rq", tasks=args.tasks, samples=args.samples)))
    return 0


def summarize(result: dict[str, Any]) -> str:
    parts = []
    if "throughput" in result:
        parts.append(f"{result['throughput']:.0f} tasks/s")
    if "pickup" in result:
        p50, p99 = (percentile(result["pickup"], p) * 1000 for p in (50, 99))
        parts.append(f"pickup p50 {p50:.1f} ms p99 {p99:.1f} ms")
    if "error" in result:
        parts.append(f"ERROR: {result['error']}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
