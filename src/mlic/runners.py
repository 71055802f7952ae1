"""Where `preprocess`'s shard tasks run: local worker processes, or Ray (a local instance or a cluster).

Both run the same function on the same tasks (`tfrecords.write_shard` over `tfrecords.plan_split`'s
tasks), so they write the same shards byte for byte and the same manifests: the engine decides
only where the work happens. A task is a whole shard (a few hundred images, written to a temp
file and renamed), so a retried task is idempotent and the driver only collects hashes.

Ray rather than Apache Beam: Ray 2.60 installs beside TensorFlow 2.21 with no downgrades (Beam
2.77 pins protobuf < 7 and pillow < 13, older than what TensorFlow and mlic use), starts a local
instance in seconds, and the same code runs on a cluster by giving its address. A shard is a
natural Ray task; Ray Data's record-level operators would add a shuffle to rebuild the shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from mlic import tfrecords
from mlic.errors import UserError

log = logging.getLogger(__name__)

RUNNERS = ("local", "ray")
# The object store holds only tasks (file names) and results (hashes): Ray's default, 30 % of the
# machine's memory, would be reserved for nothing.
_LOCAL_OBJECT_STORE_BYTES = 128 * 2**20


class RunnerUnavailable(UserError):
    """The configured runner cannot start (its package is not installed, its cluster unreachable)."""


def run_shard_tasks(tasks: list[tfrecords.ShardTask], runner: str, workers: int,
                    ray_address: str | None = None) -> Iterator[tfrecords.ShardResult]:
    """Yield a result per task, in completion order, from the chosen runner.

    local: `workers` processes (1: this process). ray: a local Ray instance with `workers` CPUs
    when `ray_address` is None, else the cluster at `ray_address` ("auto", "ray://head:10001").
    """
    if runner == "local":
        with tfrecords.worker_pool(workers) as pool:
            yield from _progress(tfrecords.run_tasks(tasks, pool), len(tasks))
    elif runner == "ray":
        yield from _progress(_run_ray(tasks, workers, ray_address), len(tasks))
    else:
        raise ValueError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")


def _progress(results: Iterator[tfrecords.ShardResult], total: int) -> Iterator[tfrecords.ShardResult]:
    """Pass results through, logging about every tenth of the shards (and the last)."""
    step, start = max(1, total // 10), time.perf_counter()
    for done, result in enumerate(results, 1):
        if done % step == 0 or done == total:
            log.info("%d/%d shards written (%.0f s)", done, total, time.perf_counter() - start)
        yield result


def _run_ray(tasks: list[tfrecords.ShardTask], workers: int, address: str | None) -> Iterator[tfrecords.ShardResult]:
    try:
        import ray
    except ImportError:
        raise RunnerUnavailable("preprocess.runner is ray but Ray is not installed: "
                                "pip install -e '.[ray]' (or set preprocess.runner: local)") from None
    if not ray.is_initialized():
        if address:
            # A cluster's workers import mlic from this checkout (shipped with the job), so they run
            # the code this commit holds; the output folder must be on storage they all see.
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"py_modules": [str(Path(tfrecords.__file__).parent)]})
        else:
            ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
        owned = True
    else:
        owned = False  # a caller's Ray session (a notebook, a test): use it, leave it running
    try:
        log.info("ray: %s CPUs in the cluster", int(ray.cluster_resources().get("CPU", 0)))
        # max_retries: a lost worker's shard is written again, to the same bytes (temp + rename)
        write = ray.remote(num_cpus=1, max_retries=3)(tfrecords.write_shard)
        pending = [write.remote(t) for t in sorted(tasks, key=lambda t: -len(t.records))]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if owned:
            ray.shutdown()


def describe(runner: str, workers: int, ray_address: str | None) -> str:
    """How the shards are being written, for the stage's log line."""
    if runner == "ray":
        return f"ray ({ray_address})" if ray_address else f"ray (a local instance, {workers} CPUs)"
    return f"local ({workers} worker{'s' if workers != 1 else ''})"

