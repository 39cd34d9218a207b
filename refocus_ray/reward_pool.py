"""The reward pool: scorer actors that every env runner calls, batched, cached and restartable.

Controller/worker split: `RewardPool` (the client, used by env runners, evaluation and the
driver) sends each video's requests to its home actor (a hash of the video), so identical
requests meet the same actor's cache and a GRPO group (G requests on one video) stays in one
engine batch and has its frames decoded once, unless the home actor is a group ahead of the
least-loaded one (`reference.route_by_load`): then an engine would idle while another has a
queue, which costs more than a cache miss; `ScorerActor` (the worker) owns one backend (a vLLM engine on a
GPU or, here, on pinned CPU cores) and micro-batches: requests from all callers queue up while
the engine runs, and the next engine call takes all of them (up to `max_batch`). A caller
answered less than `max_wait_ms` ago is expected back: the next engine call waits for it (at
most that long), so callers in a loop share engine calls, and a lone caller never waits.

Fault tolerance comes from Ray: actors are created with `max_restarts=-1` and
`max_task_retries=-1`, so a dead actor is restarted and the calls in flight to it are retried;
the caller only sees a delay. The vLLM engine runs in the actor's own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so killing an actor leaves no engine process behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import ray

from refocus_ray.scoring import ReferenceConfig, ScoreRequest, make_backend


def request_key(req: ScoreRequest, model_id: str) -> str:
    """(video, sorted frames, question, options, model): what makes two requests identical."""
    blob = json.dumps([req.video, sorted(req.frames), req.question, list(req.options), model_id])
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _Stats:
    requests: int = 0
    cache_hits: int = 0
    batches: int = 0
    batched_requests: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    # where scored requests spend their time (cumulative seconds; per-request means in summary)
    queue_wait_s: float = 0.0  # arrival -> taken into an engine batch (incl. batching window)
    fetch_s: float = 0.0  # frames from the FrameStore (decord decode on a miss)
    engine_s: float = 0.0  # the engine call: processor + prefill of the whole batch
    frames_decoded: int = 0

    def summary(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms[-5000:] or [0.0])
        dt = max(time.time() - self.started, 1e-9)
        n = max(self.batched_requests, 1)
        return {
            "requests": self.requests, "requests_per_s": self.requests / dt,
            "cache_hit_rate": self.cache_hits / max(self.requests, 1),
            "mean_batch_size": self.batched_requests / max(self.batches, 1),
            "engine_calls": self.batches, "scored": self.batched_requests,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "queue_wait_s": self.queue_wait_s, "fetch_s": self.fetch_s,
            "engine_s": self.engine_s, "frames_decoded": self.frames_decoded,
            "queue_wait_ms_per_request": 1e3 * self.queue_wait_s / n,
            "fetch_ms_per_request": 1e3 * self.fetch_s / n,
            "engine_ms_per_request": 1e3 * self.engine_s / n,
        }


class ScorerActor:
    """One reference-model backend behind an async, micro-batching queue."""

    def __init__(self, cfg: dict[str, Any], cache_size: int = 200_000) -> None:
        self.cfg = ReferenceConfig(**cfg)
        if self.cfg.cpu_cores:
            os.sched_setaffinity(0, self.cfg.cpu_cores)
        self.backend = make_backend(self.cfg)
        self.model_id = self.backend.model_id
        self.cache: OrderedDict[str, list[float]] = OrderedDict()
        self.cache_size = cache_size
        self.inflight: dict[str, asyncio.Future] = {}
        self.queue: list[tuple[str, ScoreRequest]] = []
        self.arrived: dict[str, float] = {}  # key -> when it was queued (queue-wait stats)
        self.owner: dict[str, str] = {}  # queued key -> the caller that sent it
        self.answered: dict[str, float] = {}  # caller -> when its last batch was answered
        self.running = 0  # requests in the engine call under way
        self.wake: asyncio.Event | None = None
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.stats = _Stats()
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def ready(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "restarted": self.restarted}

    async def score(self, requests: list[ScoreRequest], caller: str = "") -> list[list[float]]:
        """Option scores per request; `caller` (a thread of some process) lets the batcher
        wait for callers that are about to send their next call."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self.wake is None:
            self.wake = asyncio.Event()
            loop.create_task(self._batcher())
        futs = []
        for req in requests:
            key = request_key(req, self.model_id)
            self.stats.requests += 1
            if key in self.cache:
                self.stats.cache_hits += 1
                self.cache.move_to_end(key)
                fut = loop.create_future()
                fut.set_result(self.cache[key])
            elif key in self.inflight:  # the same request is already queued: share its answer
                self.stats.cache_hits += 1
                fut = self.inflight[key]
            else:
                fut = self.inflight[key] = loop.create_future()
                self.queue.append((key, req))
                self.arrived[key] = time.perf_counter()
                self.owner[key] = caller
            futs.append(fut)
        self.wake.set()
        out = await asyncio.gather(*futs)
        self.stats.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return list(out)

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._wait_for_callers()
            batch, self.queue = self.queue[: self.cfg.max_batch], self.queue[self.cfg.max_batch:]
            now = time.perf_counter()
            self.stats.queue_wait_s += sum(now - self.arrived.pop(k, now) for k, _ in batch)
            self.running = len(batch)
            try:
                results = await loop.run_in_executor(self.executor, self._score_batch, batch)
            finally:
                self.running = 0
            self.stats.batches += 1
            self.stats.batched_requests += len(batch)
            now = time.perf_counter()
            for (key, _), z in zip(batch, results):
                self.answered[self.owner.pop(key, "")] = now
                fut = self.inflight.pop(key)
                if isinstance(z, Exception):
                    fut.set_exception(z)
                else:
                    self.cache[key] = z
                    fut.set_result(z)
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)

    async def _wait_for_callers(self) -> None:
        """Hold the next engine call while a caller answered less than `max_wait_ms` ago has
        nothing queued: callers in a loop (env runners, benchmark threads) then share one
        engine call instead of alternating. A fixed batching window did the same but also made
        a lone caller wait `max_wait_ms` on every call, with the engine idle."""
        window = self.cfg.max_wait_ms / 1e3
        while len(self.queue) < self.cfg.max_batch:
            now = time.perf_counter()
            self.answered = {c: t for c, t in self.answered.items() if now - t < window}
            queued = {self.owner.get(k, "") for k, _ in self.queue}
            left = [t + window - now for c, t in self.answered.items() if c not in queued]
            if not left:
                return
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(left))
            except TimeoutError:
                return

    def _score_batch(self, batch: list[tuple[str, ScoreRequest]]) -> list[Any]:
        """One engine call; if it fails, score one by one so only the bad request fails."""
        reqs = [r for _, r in batch]
        store = getattr(self.backend, "store", None)
        f0, d0 = (store.seconds, store.decoded) if store else (0.0, 0)
        t0 = time.perf_counter()
        try:
            return self.backend.score(reqs)
        except Exception as e:  # noqa: BLE001 -- isolate the bad request below
            if len(reqs) == 1:
                return [e]
        finally:  # the call's time, split into frame fetching and the engine
            fetch = store.seconds - f0 if store else 0.0
            self.stats.fetch_s += fetch
            self.stats.engine_s += time.perf_counter() - t0 - fetch
            self.stats.frames_decoded += store.decoded - d0 if store else 0
        out: list[Any] = []
        for r in reqs:
            try:
                out.extend(self.backend.score([r]))
            except Exception as e:  # noqa: BLE001 -- the caller of this request hears why
                out.append(e)
        return out

    async def load(self) -> int:
        """Requests queued or in the engine, from every caller (what `RewardPool.route` balances)."""
        return len(self.queue) + self.running

    def prefetch(self, requests: list[ScoreRequest]) -> int:
        """Decode the frames of `requests` into the backend's frame store without scoring
        (benchmarks separate decoding from the engine; rollouts may warm the next videos)."""
        store = getattr(self.backend, "store", None)
        for r in requests if store is not None else []:
            store.get(r.video, r.frames)
        return len(requests)

    def get_stats(self) -> dict[str, Any]:
        return {**self.stats.summary(), "restarted": self.restarted, "pid": os.getpid()}


def actor_options(cfg: ReferenceConfig) -> dict[str, Any]:
    """Resources and restart policy of one scorer actor, from config."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    for key in ("VLLM_HOST_IP", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        if key in os.environ:
            env[key] = os.environ[key]
    if cfg.cpu_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cfg.cpu_cores))
        env["OMP_NUM_THREADS"] = str(len(cfg.cpu_cores))
    opts: dict[str, Any] = {
        "num_cpus": cfg.num_cpus_per_actor, "num_gpus": cfg.num_gpus_per_actor,
        "max_restarts": -1, "max_task_retries": -1, "max_concurrency": 1000,
        "runtime_env": {"env_vars": env},
    }
    if cfg.resources:
        opts["resources"] = dict(cfg.resources)
    if cfg.label_selector and not cfg.placement_strategy:  # a group carries it per bundle
        opts["label_selector"] = dict(cfg.label_selector)
    return opts


def actor_cores(cfg: ReferenceConfig, i: int) -> list[int]:
    """Actor i's share of ``reference.cpu_cores``: with at least as many cores as actors, each
    engine gets its own (two engines spinning OpenMP threads on the same cores stall each
    other); otherwise all of them."""
    cores = list(cfg.cpu_cores)
    return cores[i::cfg.num_actors] if len(cores) >= cfg.num_actors else cores


def placement_group_for(cfg: ReferenceConfig):
    """One placement group over all scorer actors (``reference.placement_strategy``), or None.

    A group reserves every actor's GPU at once or not at all, so a job never starts with part
    of its engines; PACK fills GPU nodes, STRICT_SPREAD puts one engine per node.
    """
    if not cfg.placement_strategy:
        return None
    from ray.util.placement_group import placement_group

    b = {"CPU": cfg.num_cpus_per_actor, "GPU": cfg.num_gpus_per_actor, **cfg.resources}
    b = {k: float(v) for k, v in b.items() if v}
    sel = [dict(cfg.label_selector)] * cfg.num_actors if cfg.label_selector else None
    return placement_group([b] * cfg.num_actors, strategy=cfg.placement_strategy,
                           name=f"{cfg.pool_name}-pg", bundle_label_selector=sel)


class RewardPool:
    """Client of the scorer actors: routes, caches by actor, survives restarts.

    Create once per job with `RewardPool.start(cfg)`; other processes (env runners) attach
    with `RewardPool.attach(cfg)`, which finds the actors by name.
    """

    def __init__(self, actors: list[ray.actor.ActorHandle], cfg: ReferenceConfig,
                 group: Any = None) -> None:
        self.actors, self.cfg, self.group = actors, cfg, group
        self.client = ray.get_runtime_context().get_worker_id()  # + thread: one caller
        self.lock = threading.Lock()  # threads of this process route and submit one at a time
        self.sent: list[tuple[int, int, ray.ObjectRef]] = []  # (actor, requests, ref) unanswered
        self.balancing = cfg.route_by_load and len(actors) > 1
        self.model_id = ray.get(actors[0].ready.remote())["model_id"]

    @staticmethod
    def _name(cfg: ReferenceConfig, i: int) -> str:
        return f"{cfg.pool_name}-{i}"

    @classmethod
    def start(cls, cfg: ReferenceConfig) -> RewardPool:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(ScorerActor)
        group = placement_group_for(cfg)
        actors = []
        for i in range(cfg.num_actors):
            where = {} if group is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=i)}
            own = replace(cfg, cpu_cores=actor_cores(cfg, i))
            actors.append(remote.options(name=cls._name(cfg, i), get_if_exists=True,
                                         **actor_options(own), **where).remote(asdict(own)))
        ray.get([a.ready.remote() for a in actors])
        return cls(actors, cfg, group)

    @classmethod
    def attach(cls, cfg: ReferenceConfig) -> RewardPool:
        return cls([ray.get_actor(cls._name(cfg, i)) for i in range(cfg.num_actors)], cfg)

    def home(self, video: str) -> int:
        """The actor a video's requests go to unless it is a group ahead (a stable hash)."""
        return int(hashlib.sha256(video.encode()).hexdigest()[:8], 16) % len(self.actors)

    def loads(self) -> list[int]:
        """Requests each actor has queued or in its engine: what the actors report (every
        caller's), and at least what this client has sent and not yet been answered (a request
        sent a moment ago may not have reached its actor)."""
        if self.sent:  # forget the answered calls
            refs = [ref for _, _, ref in self.sent]
            _, unanswered = ray.wait(refs, num_returns=len(refs), timeout=0)
            self.sent = [s for s in self.sent if s[2] in set(unanswered)]
        mine = [0] * len(self.actors)
        for a, n, _ in self.sent:
            mine[a] += n
        try:  # an actor restarting answers late: balance on what this client knows
            theirs = ray.get([a.load.remote() for a in self.actors], timeout=1.0)
        except ray.exceptions.GetTimeoutError:
            theirs = mine
        return [max(x, y) for x, y in zip(mine, theirs)]

    def route(self, requests: list[ScoreRequest], by_load: bool | None = None) -> dict[int, list[int]]:
        """actor index -> positions of the requests it is sent.

        A video's n requests (a GRPO group) go together to its `home` actor unless that actor
        already has n more requests queued or running than the least-loaded one
        (`reference.route_by_load`, or `by_load`); then that one takes them. Affinity with a
        bounded imbalance: an engine does not idle while another has a group waiting, and a
        video leaves home (its cache and decoded frames) only when home is a group ahead.
        """
        videos: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            videos.setdefault(req.video, []).append(i)
        by_load = self.balancing if by_load is None else by_load and len(self.actors) > 1
        load = self.loads() if by_load else None
        by_actor: dict[int, list[int]] = {}
        for video, idx in videos.items():
            a = self.home(video)
            if load is not None:
                if load[a] >= min(load) + len(idx):
                    a = load.index(min(load))
                load[a] += len(idx)
            by_actor.setdefault(a, []).extend(idx)
        return by_actor

    def submit(self, requests: list[ScoreRequest]) -> list[ray.ObjectRef]:
        """Send requests (see `route`) without waiting; returns one ref per actor used, see
        `gather`."""
        caller = f"{self.client}:{threading.get_ident()}"
        out = []
        with self.lock:
            for a, idx in self.route(requests).items():
                ref = self.actors[a].score.remote([requests[i] for i in idx], caller)
                if self.balancing:  # pruned by `loads`, so only kept when it is called
                    self.sent.append((a, len(idx), ref))
                out.append((idx, ref))
        return out

    def prefetch(self, requests: list[ScoreRequest]) -> int:
        """Decode the requests' frames in their home actors, which score them unless they are
        a group ahead (see `ScorerActor.prefetch`)."""
        return sum(ray.get([self.actors[a].prefetch.remote([requests[i] for i in idx])
                            for a, idx in self.route(requests, by_load=False).items()]))

    @staticmethod
    def gather(pending, n: int, timeout_s: float | None = None) -> list[list[float]]:
        """Wait for `submit`'s refs; TimeoutError (never a hang) when an actor does not
        answer within `timeout_s` (restarts and retries happen inside that time)."""
        out: list[list[float]] = [None] * n  # type: ignore[list-item]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for idx, ref in pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                z = ray.get(ref, timeout=left)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(
                    f"reward pool: {len(idx)} request(s) unanswered after {timeout_s:.0f} s "
                    f"(reference.request_timeout_s): a scorer actor is alive but stuck, or "
                    f"the cluster has no resources to restart it (see `ray status`)"
                ) from None
            for i, zi in zip(idx, z):
                out[i] = zi
        return out

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """Option scores z for each request (blocking, at most reference.request_timeout_s)."""
        return self.gather(self.submit(requests), len(requests), self.cfg.request_timeout_s)

    def stats(self) -> list[dict[str, Any]]:
        return ray.get([a.get_stats.remote() for a in self.actors])

    def metrics(self) -> dict[str, float]:
        """The pool's figures over its actors (each counts since its last start): requests,
        requests/s, mean engine batch, cache hit rate, p50/p95 latency (the slowest actor's)
        and restarts (Ray's count, summed)."""
        from ray._private.state import actors  # the GCS actor table; Ray's public state API
        # needs the dashboard, which jobs here run without

        stats = self.stats()
        n = sum(s["requests"] for s in stats)
        return {
            "requests": n, "requests_per_s": sum(s["requests_per_s"] for s in stats),
            "mean_batch_size": sum(s["scored"] for s in stats)
            / max(sum(s["engine_calls"] for s in stats), 1),
            "cache_hit_rate": sum(s["cache_hit_rate"] * s["requests"] for s in stats) / max(n, 1),
            "p50_ms": max(s["p50_ms"] for s in stats), "p95_ms": max(s["p95_ms"] for s in stats),
            "restarts": sum(int(actors(a._actor_id.hex())["NumRestarts"]) for a in self.actors),
        }

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
