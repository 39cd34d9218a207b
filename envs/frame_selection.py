"""The frame-selection environment: one step picks one frame; the reward comes at the end.

An episode is one (video, question): the pool has F candidate frames (cached by `prepare`), the
agent picks K distinct frames one per step (``Discrete(F_max)`` with an ``action_mask``), and
after step K the frozen reference VLM scores the chosen frames in chronological order:
r = reward(z, y*) in (-1, 1) (``refocus_ray.reward``), every earlier step gets 0.

GRPO needs a *group* of G episodes on the same (video, question). `FrameSelectionVectorEnv` is a
``gymnasium.vector.VectorEnv`` of G * M sub-envs, M groups of G consecutive sub-envs. The members
of a group are reset together, share the query and K, so they also finish together; the rewards
of every sub-env that finishes in a step are requested in ONE reward-pool call. RLlib builds it
by name (``register_env``; ``gym_env_vectorize_mode=VECTOR_ENTRY_POINT``, the creator receives
``num_envs`` in its env_config).

Observations stay small: indices into the cached pools, never feature copies. The RLModule
looks the features up itself (`QueryTable` is shared by both, in one process).

    query         index into `QueryTable.queries` (canonical order: sorted question ids)
    group         a run-unique group id (the global position in the query stream)
    episode       a run-unique episode id (group * G + member): the module keys its caches by it
    step, k       picks made so far and this episode's K (the curriculum sets K per group)
    chosen        pool indices picked so far, in pick order, padded with -1 to K_max
    action_mask   1 for pool frames that may still be picked (padding and picks are 0)
    show_options  0 when the options are withheld from the policy's query (the reward uses them)

Queries come from one split, visited in a seeded shuffled order; the position in that stream is
a cursor the algorithm may set (so a resumed run continues the same stream), and env runners
take disjoint interleaved slices of it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from refocus_ray.config import STAGE_SECTIONS, Config, ConfigError, build
from refocus_ray.dataset import read_table, resolve_video
from refocus_ray.features import PoolFeatures, load_pools, load_question_features
from refocus_ray.reward import get_reward
from refocus_ray.scoring import ScoreRequest

ENV_NAME = "refocus-frame-selection"
UID_MAX = np.iinfo(np.int64).max


# ------------------------------------------------------------------------------ queries


@dataclass(frozen=True)
class Query:
    """One training question on its cached pool (frames are original frame numbers)."""

    question_id: str
    video_id: str
    video: str  # absolute path: what the reward pool decodes
    question: str
    options: tuple[str, ...]
    answer: int
    frames: np.ndarray  # int64 [F] pool frame numbers


@dataclass
class QueryTable:
    """The questions of one split that have a cached pool and cached query features.

    Index i means the same question in the env (which sends it) and in the RLModule (which
    looks its features up), because both build the table from the same `QuerySource`.
    """

    queries: list[Query]
    pools: dict[str, PoolFeatures]
    question_features: dict[str, tuple[np.ndarray, np.ndarray]]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)


def config_from_dict(data: dict[str, Any]) -> Config:
    """A run `Config` from its `to_dict()` form (stage sections go to `extra`)."""
    data = dict(data)
    extra = {k: data.pop(k) for k in list(data) if k in STAGE_SECTIONS}
    cfg = build(Config, data, "")
    cfg.extra = extra
    return cfg


@dataclass(frozen=True)
class QuerySource:
    """Which questions an env serves: the run config (as a dict), split, minimum pool size.

    Queries whose pool has fewer than `min_frames` frames are left out so every episode of
    every group lasts exactly K steps (groups stay aligned; no group ever finishes early).
    """

    run_config: str  # JSON of Config.to_dict() with absolute paths
    split: str = "train"
    min_frames: int = 1

    @classmethod
    def of(cls, cfg: Config, split: str = "train", min_frames: int = 1) -> QuerySource:
        d = cfg.to_dict()
        d["run_dir"] = str(Path(cfg.run_dir).resolve())
        if cfg.data.table:
            d["data"]["table"] = str(Path(cfg.data.table).resolve())
        return cls(json.dumps(d, sort_keys=True), split, int(min_frames))

    def to_dict(self) -> dict[str, Any]:
        return {"run_config": self.run_config, "split": self.split, "min_frames": self.min_frames}

    def config(self) -> Config:
        """The run config this source was made from."""
        return config_from_dict(json.loads(self.run_config))


_TABLES: dict[QuerySource, QueryTable] = {}


def load_query_table(source: QuerySource) -> QueryTable:
    """Build (once per process) the query table of `source` from the run's caches."""
    if source in _TABLES:
        return _TABLES[source]
    cfg = source.config()
    table_path = cfg.table_path()
    pools = load_pools(cfg)
    qfeats = load_question_features(cfg)
    queries, skipped = [], {"no_pool": 0, "no_query_features": 0, "pool_too_small": 0}
    for r in read_table(table_path).to_pylist():
        if r["split"] != source.split:
            continue
        if r["video_id"] not in pools:
            skipped["no_pool"] += 1
        elif r["question_id"] not in qfeats:
            skipped["no_query_features"] += 1
        elif len(pools[r["video_id"]].frames) < source.min_frames:
            skipped["pool_too_small"] += 1
        else:
            queries.append(Query(
                r["question_id"], r["video_id"],
                str(resolve_video(table_path, r["video_path"]).resolve()), r["question"],
                tuple(r["options"]), int(r["answer"]),
                np.asarray(pools[r["video_id"]].frames, np.int64),
            ))  # fmt: skip
    if not queries:
        raise ValueError(
            f"no {source.split!r} questions with a cached pool of >= {source.min_frames} frames "
            f"under {cfg.run_dir} (skipped: {skipped}); run `refocus prepare` first"
        )
    queries.sort(key=lambda q: q.question_id)
    used = {q.video_id for q in queries}
    table = QueryTable(queries, {v: p for v, p in pools.items() if v in used},
                       {q.question_id: qfeats[q.question_id] for q in queries}, skipped)
    _TABLES[source] = table
    return table


# ------------------------------------------------------------------------------- rewards


class Scorer(Protocol):
    """What the env needs from the reward pool: option scores z per request, in one call."""

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]: ...


def score_requests(
    scorer: Scorer, requests: Sequence[ScoreRequest], answers: Sequence[int], reward: str
) -> tuple[np.ndarray, np.ndarray]:
    """One batched scorer call for all `requests` -> (rewards r, margins z_y* - max z_other).

    The single place the env talks to the reference model, so batching is easy to see and to
    count: every sub-env that finishes in a step is in one call.
    """
    from refocus_ray.reward import margin

    z = scorer.score(list(requests))
    if len(z) != len(requests):
        raise RuntimeError(f"reward pool returned {len(z)} scores for {len(requests)} requests")
    fn = get_reward(reward)
    r = np.asarray([fn(zi, a) for zi, a in zip(z, answers)], np.float32)
    m = np.asarray([margin(zi, a) for zi, a in zip(z, answers)], np.float32)
    return r, m


_IN_PROCESS: dict[str, Scorer] = {}


class InProcessScorer:
    """Hands one scorer object to envs built in this process (env_config ``scorer``).

    RLlib deep-copies and pickles configs many times; copying a reward model would duplicate
    it. The holder pickles as a key into a process-local registry instead, so every copy in
    this process reaches the same scorer, and a copy in another process (a remote env runner)
    fails with a clear error when it is asked for a reward.
    """

    def __init__(self, scorer: Scorer, key: str | None = None) -> None:
        import uuid

        self.key = key or uuid.uuid4().hex
        _IN_PROCESS[self.key] = scorer

    def score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        if self.key not in _IN_PROCESS:
            raise RuntimeError("an in-process scorer was sent to another process; remote env "
                               "runners need the reward pool (env_config 'reference')")
        return _IN_PROCESS[self.key].score(requests)

    def __reduce__(self):
        return (_in_process_scorer, (self.key,))


def _in_process_scorer(key: str) -> InProcessScorer:
    holder = InProcessScorer.__new__(InProcessScorer)
    holder.key = key
    return holder


def attach_reward_pool(reference: dict[str, Any]) -> Scorer:
    """The job's reward pool (started by the driver), found by actor name."""
    from refocus_ray.reward_pool import RewardPool
    from refocus_ray.scoring import ReferenceConfig

    return RewardPool.attach(build(ReferenceConfig, reference, "reference"))


# ----------------------------------------------------------------------------------- env


class FrameSelectionVectorEnv(gym.vector.VectorEnv):
    """G * M frame-selection episodes stepped together; M GRPO groups of G sub-envs.

    Autoreset follows Gymnasium's NEXT_STEP mode (what RLlib expects): the step after a
    terminal step resets the finished sub-envs (their actions are ignored); a finished group is
    reset as a whole, onto the next query of the stream.
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        table: QueryTable,
        *,
        num_envs: int,
        group_size: int,
        k: int,
        k_max: int,
        f_max: int,
        scorer: Scorer | Callable[[], Scorer],
        reward: str = "tanh_margin",
        options_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"num_envs ({num_envs}) must be a multiple of group_size "
                             f"({group_size})")
        largest = max(len(q.frames) for q in table.queries)
        if largest > f_max:
            raise ValueError(f"a pool has {largest} frames > f_max={f_max} (pool.max_frames)")
        get_reward(reward)  # fail early on a bad name
        self.table, self.reward_name = table, reward
        self.num_envs, self.group_size = num_envs, group_size
        self.num_groups = num_envs // group_size
        self.k_max, self.f_max = int(k_max), int(f_max)
        self.options_dropout, self.seed = float(options_dropout), int(seed)
        # env runners take interleaved slices of one query stream (`configure` sets them)
        self.stream_offset, self.stream_stride = 0, 1
        self._scorer_or_factory = scorer
        self._scorer: Scorer | None = None
        self.set_k(k)
        self.cursor = 0  # groups drawn by this env so far

        n, km = num_envs, self.k_max
        self.single_action_space = gym.spaces.Discrete(self.f_max)
        i64 = np.int64
        self.single_observation_space = gym.spaces.Dict({
            "query": gym.spaces.Box(0, len(table) - 1, (), i64),
            "group": gym.spaces.Box(0, UID_MAX, (), i64),
            "episode": gym.spaces.Box(0, UID_MAX, (), i64),
            "step": gym.spaces.Box(0, km, (), i64),
            "k": gym.spaces.Box(1, km, (), i64),
            "chosen": gym.spaces.Box(-1, self.f_max - 1, (km,), i64),
            "action_mask": gym.spaces.Box(0, 1, (self.f_max,), np.int8),
            "show_options": gym.spaces.Box(0, 1, (), np.int8),
        })  # fmt: skip
        self.action_space = batch_space(self.single_action_space, n)
        self.observation_space = batch_space(self.single_observation_space, n)

        self.query = np.zeros(n, i64)
        self.group = np.zeros(n, i64)
        self.episode = np.zeros(n, i64)
        self.step_ = np.zeros(n, i64)
        self.k_env = np.full(n, self.k, i64)
        self.chosen = np.full((n, km), -1, i64)
        self.mask = np.zeros((n, self.f_max), np.int8)
        self.show = np.ones(n, np.int8)
        self.needs_reset = np.zeros(n, bool)
        self.stats = self._new_stats()
        self._perms: dict[int, np.ndarray] = {}

    # -- control (called by the algorithm on every env runner) ---------------------------

    def set_k(self, k: int) -> None:
        """K for groups reset from now on (the curriculum); running groups keep theirs."""
        if not 1 <= int(k) <= self.k_max:
            raise ValueError(f"k must be in [1, k_max={self.k_max}], got {k}")
        smallest = min(len(q.frames) for q in self.table.queries)
        if int(k) > smallest:
            raise ValueError(f"k={k} exceeds the smallest pool ({smallest} frames)")
        self.k = int(k)

    def configure(self, *, k: int | None = None, cursor: int | None = None,
                  stream_offset: int | None = None, stream_stride: int | None = None) -> None:
        """Set K, the position in this runner's query stream and its slice of the stream.

        The algorithm calls this on every env runner before sampling (RLlib does not pass the
        runner's index to vector-env creators), so restarts and resumes stay consistent.
        """
        if k is not None:
            self.set_k(k)
        if cursor is not None:
            self.cursor = int(cursor)
        if stream_stride is not None:
            self.stream_stride = max(int(stream_stride), 1)
        if stream_offset is not None:
            self.stream_offset = int(stream_offset) % self.stream_stride

    def pop_stats(self) -> dict[str, float]:
        """Reward-call counters since the last call (time waiting for the reward pool)."""
        out, self.stats = self.stats, self._new_stats()
        return out

    @staticmethod
    def _new_stats() -> dict[str, float]:
        return {"reward_calls": 0, "reward_requests": 0, "reward_wait_s": 0.0}

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            s = self._scorer_or_factory
            self._scorer = s if hasattr(s, "score") else s()  # type: ignore[operator]
        return self._scorer

    # -- query stream ----------------------------------------------------------------------

    def _stream(self, position: int) -> tuple[int, bool]:
        """(query index, show options) at global stream position `position`."""
        n = len(self.table)
        epoch, pos = divmod(position, n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        show = np.random.default_rng([self.seed, position, 1]).random() >= self.options_dropout
        return int(self._perms[epoch][pos]), bool(show)

    def _reset_group(self, g: int) -> None:
        position = self.cursor * self.stream_stride + self.stream_offset
        self.cursor += 1
        q, show = self._stream(position)
        members = slice(g * self.group_size, (g + 1) * self.group_size)
        self.query[members], self.show[members] = q, show
        self.group[members] = position
        self.episode[members] = position * self.group_size + np.arange(self.group_size)
        self.step_[members], self.k_env[members] = 0, self.k
        self.chosen[members] = -1
        self.mask[members] = 0
        self.mask[members, : len(self.table.queries[q].frames)] = 1
        self.needs_reset[members] = False

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "query": self.query.copy(), "group": self.group.copy(),
            "episode": self.episode.copy(), "step": self.step_.copy(), "k": self.k_env.copy(),
            "chosen": self.chosen.copy(), "action_mask": self.mask.copy(),
            "show_options": self.show.copy(),
        }  # fmt: skip

    # -- gym API ---------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset every group onto the next queries of the stream.

        The stream is a function of (config seed, cursor), not of `seed`, so a resumed run
        (cursor restored by the algorithm) sees the same questions; `seed` is accepted for the
        Gymnasium API and ignored.
        """
        for g in range(self.num_groups):
            self._reset_group(g)
        return self._obs(), {}

    def advance(self, actions: np.ndarray) -> np.ndarray:
        """Apply one pick per running sub-env; returns the indices that just finished.

        Env mechanics only (no reward): a pick outside the action mask is an error (a frame is
        never picked twice, padding is never picked).
        """
        actions = np.asarray(actions, np.int64).reshape(self.num_envs)
        resetting = np.flatnonzero(self.needs_reset)
        for g in sorted({int(i) // self.group_size for i in resetting}):
            members = range(g * self.group_size, (g + 1) * self.group_size)
            if not self.needs_reset[members].all():
                raise RuntimeError(f"group {g} finished only partly: groups must stay aligned")
            self._reset_group(g)
        live = np.setdiff1d(np.arange(self.num_envs), resetting)
        for i in live:  # validate every pick before applying any: a refused step changes nothing
            a = int(actions[i])
            if not (0 <= a < self.f_max and self.mask[i, a]):
                why = "already chosen" if a in self.chosen[i, : self.step_[i]] else \
                    "outside the pool"
                raise ValueError(f"sub-env {i}: action {a} is masked ({why}); "
                                 f"chosen so far {self.chosen[i, : self.step_[i]].tolist()}")
        picks = actions[live]
        self.chosen[live, self.step_[live]] = picks
        self.mask[live, picks] = 0
        self.step_[live] += 1
        done = live[self.step_[live] >= self.k_env[live]]
        self.needs_reset[done] = True
        return done

    def requests_for(self, idx: Sequence[int]) -> tuple[list[ScoreRequest], list[int]]:
        """Reward requests of finished sub-envs: chosen frames in chronological order."""
        reqs, answers = [], []
        for i in idx:
            q = self.table.queries[int(self.query[i])]
            picks = self.chosen[i, : self.step_[i]]
            frames = tuple(int(f) for f in np.sort(q.frames[picks]))
            reqs.append(ScoreRequest(q.video, frames, q.question, q.options))
            answers.append(q.answer)
        return reqs, answers

    def step(self, actions):
        done = self.advance(actions)
        rewards = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        infos: dict[str, Any] = {}
        if len(done):
            reqs, answers = self.requests_for(done)
            t0 = time.perf_counter()
            r, m = score_requests(self.scorer, reqs, answers, self.reward_name)
            self.stats["reward_wait_s"] += time.perf_counter() - t0
            self.stats["reward_calls"] += 1
            self.stats["reward_requests"] += len(reqs)
            rewards[done], terminated[done] = r, True
            margins = np.zeros(self.num_envs, np.float32)
            margins[done] = m
            infos = {"margin": margins, "_margin": terminated.copy()}
        truncated = np.zeros(self.num_envs, bool)
        return self._obs(), rewards, terminated, truncated, infos


def make_vector_env(env_config: dict[str, Any]) -> FrameSelectionVectorEnv:
    """RLlib's creator (``register_env``): env_config carries the GRPO settings and `num_envs`.

    Keys: ``query_source`` (QuerySource.to_dict()), ``group_size``, ``k``, ``k_max``,
    ``f_max``, ``reward``, ``options_dropout``, ``seed`` and either ``reference`` (the
    reference section: the env attaches to the running reward pool) or ``scorer`` (an object
    with ``score(requests)``, same process only).
    """
    known = {"query_source", "group_size", "k", "k_max", "f_max", "reward", "options_dropout",
             "seed", "reference", "scorer", "num_envs"}
    unknown = sorted(set(env_config) - known)
    if unknown:
        raise ConfigError(f"env_config.{unknown[0]}: unknown key; known keys: {sorted(known)}")
    table = load_query_table(QuerySource(**env_config["query_source"]))
    scorer = env_config.get("scorer")
    if scorer is None:
        # attached on the first reward, so building the env needs no running pool
        scorer = functools.partial(attach_reward_pool, dict(env_config.get("reference") or {}))
    return FrameSelectionVectorEnv(
        table,
        num_envs=int(env_config.get("num_envs", env_config["group_size"])),
        group_size=int(env_config["group_size"]),
        k=int(env_config["k"]),
        k_max=int(env_config["k_max"]),
        f_max=int(env_config["f_max"]),
        scorer=scorer,
        reward=env_config.get("reward", "tanh_margin"),
        options_dropout=float(env_config.get("options_dropout", 0.0)),
        seed=int(env_config.get("seed", 0)),
    )


def register() -> None:
    """Register the env creator under ENV_NAME (idempotent; done on import)."""
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_vector_env)


register()
