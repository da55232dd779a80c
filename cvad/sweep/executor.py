"""The sweep's executor: Ray runs the trials, as many at once as the cluster has room for.

It knows Ray and nothing of Optuna or MLflow: the loop (``cvad.sweep.runner``) hands it a trial's
run config and gets back a ``TrialOutput`` (or the trial's error), plus the per-step reports the
workers stream through a queue kept on the driver's node.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from cvad.sweep.reports import StepReport, TrialStarted, send
from cvad.sweep.spec import Resources
from cvad.sweep.study import SweepError

if TYPE_CHECKING:
    from ray import ObjectRef

    from cvad.sweep.worker import TrialOutput


def error_text(exc: BaseException) -> str:
    """The root error of a (possibly Ray-wrapped) exception, as ``Type: message``."""
    import ray.exceptions

    cause = exc
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[-1] if message else ''}".strip()


def import_trial_code() -> None:
    """Ray warm-up task: the imports every trial needs."""
    import cvad.sweep.worker  # noqa: F401


def run_trial_remote(config: dict, number: int, events: Any, threads: int, feature_cache: bool) -> TrialOutput:
    """Ray entry point (module level so that workers import it by name); each attempt first says where it runs."""
    from cvad.sweep.worker import run_trial_for_sweep, worker_name

    send(events, TrialStarted(number, worker_name()))
    return run_trial_for_sweep(config, number, events, threads=threads, feature_cache=feature_cache)


class RayExecutor:
    """Trials in Ray workers reserving ``resources`` each; ``say`` receives what it reports."""

    def __init__(self, resources: Resources, feature_cache: bool, address: str | None, say) -> None:
        self.resources, self.feature_cache, self.say = resources, feature_cache, say
        self.timings: dict[str, float] = {}
        self.ray = self.start(address)
        self.events = self.progress_queue()
        self.remote = self.ray.remote(run_trial_remote).options(
            num_cpus=resources.cpus_per_trial,
            num_gpus=resources.gpus_per_trial,
            max_retries=1,  # a lost node reruns its trial once elsewhere; exceptions are not retried
            retry_exceptions=False,
        )

    def start(self, address: str | None):
        """Join the Ray cluster (or start a local one) and warm one worker per trial slot."""
        import ray

        started = time.perf_counter()
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            if address:
                try:
                    ray.init(address=address, **kwargs)
                except ConnectionError as exc:
                    raise SweepError(
                        f"cannot join the Ray cluster at {address} ({exc}); start it (ray start --head), check "
                        "RAY_AUTH_TOKEN, or drop --address / RAY_ADDRESS to run on this machine"
                    ) from None
            else:
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)  # never a cluster left running here
        self.timings["ray_start"] = time.perf_counter() - started
        resources = ray.cluster_resources()
        self.say(f"Ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        started = time.perf_counter()
        # Workers import torch and cvad once, here, rather than inside the first trials' time.
        warm = ray.remote(import_trial_code).options(num_cpus=self.resources.cpus_per_trial)
        ray.get([warm.remote() for _ in range(self.capacity(ray))])
        self.timings["workers_ready"] = time.perf_counter() - started
        return ray

    def capacity(self, ray=None) -> int:
        """Trials that can run at once: submitting more would only queue them inside Ray."""
        available = (ray or self.ray).cluster_resources()
        fits = int(available.get("CPU", 0) // self.resources.cpus_per_trial)
        if self.resources.gpus_per_trial > 0:
            fits = min(fits, int(available.get("GPU", 0) // self.resources.gpus_per_trial))
        return max(1, min(fits, self.resources.max_concurrent or fits))

    def progress_queue(self):
        """The workers' progress channel, kept on the driver's node so that losing a worker node spares it."""
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Hard: a soft preference lets Ray put it on any node (seen on a head with no CPUs), and a lost worker
        # node then took the progress of every running trial with it. The driver always has a node of its own.
        here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=False)
        return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def launch(self, config: dict, number: int) -> ObjectRef:
        threads = max(1, int(self.resources.cpus_per_trial))
        return self.remote.remote(
            config=config, number=number, events=self.events, threads=threads, feature_cache=self.feature_cache
        )

    def wait(self, refs: list[ObjectRef], timeout: float = 0.5) -> list[ObjectRef]:
        """The refs that finished (at most one), after waiting up to ``timeout`` seconds."""
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        return ready

    def result(self, ref: ObjectRef) -> TrialOutput:
        """What the trial returned; raises its error."""
        return self.ray.get(ref)

    def cancel(self, ref: ObjectRef) -> None:
        self.ray.cancel(ref, force=True)

    def reports(self) -> list[TrialStarted | StepReport]:
        """What the workers sent since the last call; a lost channel is replaced (and says so)."""
        try:
            return self.events.get_nowait_batch(self.events.qsize())
        except self.ray.exceptions.RayActorError:
            self.say("the progress channel was lost; running trials' per-step metrics come from their records")
            self.events = self.progress_queue()
            return []
