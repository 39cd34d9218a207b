"""GRPO for the frame selector on RLlib's new API stack (RLlib has no GRPO; PPOLearner needs a
critic). The pieces, top to bottom:

  * `group_advantages` / `grpo_loss`: the math, in the paper's symbols (paper notes 4.2):

        A_j     = (r_j - mean_group r) / (std_group r + eps)     broadcast to every step t of j
        rho_jt  = exp(l_jt - l_old_jt)                            l = log pi(c_jt | c_<t, query)
        L_pg    = -mean_{j,t} min(rho_jt A_j, clip(rho_jt, 1 - eps_c, 1 + eps_c) A_j)
        H       = mean_{j,t} [-sum_f p_jt(f) log p_jt(f)]         exact, from full distributions
        L       = L_pg - beta H                                   beta = 1e-3, no KL term

    Groups whose rewards have zero variance carry no signal (every A_j = 0) and are masked out
    of both terms: they contribute no gradient, not even through the entropy bonus.
  * `GroupAdvantages`: the learner connector turning whole episodes into one row per episode
    (query, chosen frames, behaviour log-probs, A_j). A train batch always holds whole groups.
  * `SelectorRLModule`: a `TorchRLModule` around `policy.SelectorPolicy`.
  * `GRPOLearner`: a `TorchLearner` whose loss is `grpo_loss`.
  * `GRPOConfig` / `GRPO`: the algorithm: sample complete groups, update, sync weights, advance
    the K curriculum, log metrics. ``train.async_sampling`` samples the next iteration's groups
    on the env runners while the learner updates on this one (see `GRPO`).

How the autoregressive policy meets RLlib's one-action-per-step loop
--------------------------------------------------------------------
The policy picks frame c_t from a state that has read the whole pool, the query and c_<t. At the
first step of an episode (obs ``step == 0``) the module runs `SelectorPolicy.sample` for all K
steps at once: one prompt prefill, then one cached backbone step per pick (the KV cache lives
inside `sample`). It keeps the plan, keyed by the episode id in the observation, and at every
env step returns the next pick and its behaviour log-prob. Each env step therefore costs a dict
lookup, and the whole episode costs exactly the sequence work of step-by-step sampling with a
carried cache; the law of the picks is the same (c_t ~ p(. | c_<t) either way, because the env
applies exactly the picks the policy made; the module checks ``chosen`` against its plan).
All G * M sub-envs start together, so one `sample` call serves a whole vector env, and with
``group=G`` the prompt of each query is run once for its G rollouts (the learner's rescore too).

RLlib's STATE_IN / STATE_OUT is not used for the cache: RLlib stores the state of every
timestep in the episode and ships it to the learner, and expects a fixed-shape state; a KV cache
grows by one token per step and starts with the whole prompt (~F + 1 + O tokens per layer), so
storing it per step costs O(K * (F + K)) memory per episode for nothing: the learner re-scores
whole episodes teacher-forced (`SelectorPolicy.rescore`) and never needs per-step states. A
Mamba-2 cache is also not a plain tensor pytree.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import LearnerConnectorPipeline, NumpyToTensor
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)
from torch import Tensor

from envs.frame_selection import (
    ENV_NAME,
    InProcessScorer,
    QuerySource,
    load_query_table,
    register,
)
from refocus_ray.bridge import bridge_tensors, check_policy_bridge
from refocus_ray.config import Config, ConfigError, build
from refocus_ray.policy import PolicyBatch, PolicyConfig, SelectorPolicy, collate, example_from_pool

# columns of the per-episode train batch (besides ACTIONS, ACTION_LOGP, ADVANTAGES, REWARDS)
QUERY, SHOW_OPTIONS, GROUP, VALID = "query", "show_options", "group", "group_valid"


# ---------------------------------------------------------------------------- the math


def group_advantages(
    rewards: np.ndarray, groups: np.ndarray, eps: float = 1e-6, zero_std: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """A_j = (r_j - mean_g r) / (std_g r + eps) within each group g; population std (ddof 0).

    Returns (A [N], valid [N]): valid is False for episodes of groups whose reward std is
    <= zero_std; their advantage is 0.
    """
    rewards = np.asarray(rewards, np.float64)
    adv, valid = np.zeros_like(rewards), np.zeros(len(rewards), bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        r = rewards[idx]
        std = r.std()  # sqrt(mean((r - mean r)^2))
        if std > zero_std:
            adv[idx] = (r - r.mean()) / (std + eps)
            valid[idx] = True
    return adv.astype(np.float32), valid


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    valid: Tensor,
    entropy: Tensor,
    clip: float = 0.2,
    beta: float = 1e-3,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = -mean_{j,t} min(rho A, clip(rho, 1-eps_c, 1+eps_c) A) - beta * mean_{j,t} H.

    logp, old_logp, entropy: [B, K] per step; advantages [B] (one per episode, broadcast to its
    K steps); valid [B] bool. Rows of zero-variance groups are dropped before any arithmetic,
    so they get exactly zero gradient (also from the entropy bonus).
    """
    with torch.no_grad():
        stats = {"entropy": entropy.mean(), "valid_frac": valid.float().mean()}
    valid = valid.bool()
    if not bool(valid.any()):  # nothing to learn from; keep the graph, gradient exactly 0
        zero = (logp * 0.0).sum() + (entropy * 0.0).sum()
        return zero, {**stats, "policy_loss": zero.detach(), "clip_frac": torch.zeros(()),
                      "approx_kl": torch.zeros(())}
    l, l_old, H = logp[valid], old_logp[valid], entropy[valid]  # [B', K]
    A = advantages[valid][:, None]  # A_j broadcast to steps
    rho = torch.exp(l - l_old)
    surr = torch.minimum(rho * A, torch.clamp(rho, 1.0 - clip, 1.0 + clip) * A)
    policy_loss = -surr.mean()
    entropy_bonus = H.mean()
    loss = policy_loss - beta * entropy_bonus
    with torch.no_grad():
        stats.update(
            policy_loss=policy_loss.detach(),
            entropy_valid=entropy_bonus.detach(),
            clip_frac=((rho - 1.0).abs() > clip).float().mean(),
            approx_kl=((rho - 1.0) - torch.log(rho)).mean(),  # k3 estimator, monitoring only
            ratio_mean=rho.mean(),
        )
    return loss, stats


# ------------------------------------------------------------------- learner connector


class GroupAdvantages(ConnectorV2):
    """Episodes -> one row per episode with its group-normalised advantage.

    Row columns: ``query``, ``show_options``, ``group`` (from the first observation), ACTIONS
    [K] (the picks), ACTION_LOGP [K] (behaviour log-probs from the env runner), REWARDS (the
    terminal reward r_j), ADVANTAGES (A_j) and ``group_valid``. Every group in the batch must be
    complete (G episodes): a group split across train batches would be normalised with the
    wrong mean/std, so that is an error, not a warning.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *,
                 group_size: int = 8, adv_eps: float = 1e-6, **kwargs) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.group_size, self.adv_eps = int(group_size), float(adv_eps)

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None,
                 **kwargs) -> Any:
        rows = episode_rows(episodes)
        counts = np.unique(rows[GROUP], return_counts=True)[1]
        if len(counts) and (counts != self.group_size).any():
            raise ValueError(f"train batch holds partial GRPO groups (sizes {sorted(set(counts))}"
                             f", group_size {self.group_size}); a group must never be split")
        adv, valid = group_advantages(rows[Columns.REWARDS], rows[GROUP], self.adv_eps)
        rows[Columns.ADVANTAGES], rows[VALID] = adv, valid
        batch[DEFAULT_MODULE_ID] = rows
        return batch


def episode_rows(episodes: Sequence[Any]) -> dict[str, np.ndarray]:
    """Whole episodes -> per-episode arrays (all episodes of one batch have the same K)."""
    lengths = {len(e) for e in episodes}
    if len(lengths) > 1:
        raise ValueError(f"episodes of one train batch differ in length {sorted(lengths)}")
    obs0 = [e.get_observations(0) for e in episodes]
    return {
        QUERY: np.asarray([o[QUERY] for o in obs0], np.int64),
        SHOW_OPTIONS: np.asarray([o[SHOW_OPTIONS] for o in obs0], bool),
        GROUP: np.asarray([o[GROUP] for o in obs0], np.int64),
        Columns.ACTIONS: np.stack([np.asarray(e.get_actions(), np.int64) for e in episodes]),
        Columns.ACTION_LOGP: np.stack(
            [np.asarray(e.get_extra_model_outputs(Columns.ACTION_LOGP), np.float32)
             for e in episodes]
        ),
        Columns.REWARDS: np.asarray([e.get_return() for e in episodes], np.float32),
    }


# -------------------------------------------------------------------------- RL module


class SelectorRLModule(TorchRLModule):
    """`SelectorPolicy` as an RLModule. model_config: ``policy`` (PolicyConfig dict),
    ``query_source`` (QuerySource dict; the module reads pool/query features itself, the
    observation only carries indices) and ``seed`` (of the sampling noise).

    Exploration/inference: plan K picks at an episode's first step (see the module docstring of
    `refocus_ray.grpo`), then replay one pick per env step. Train: teacher-forced rescore of
    whole episodes.
    """

    MAX_PLANS = 1 << 16  # bounded: plans of abandoned episodes are dropped oldest-first

    def setup(self) -> None:
        mc = self.model_config
        self.policy = SelectorPolicy(PolicyConfig.from_dict(mc.get("policy")))
        self.source = QuerySource(**mc["query_source"])
        if self.policy.cfg.bridge_classes:  # frozen buffers: the same in every process
            self.policy.set_bridge(**bridge_tensors(self.source.config()))
        self._table = None
        self._plans: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.act_seconds = 0.0  # time spent choosing actions (policy inference), for metrics

    @property
    def table(self):
        if self._table is None:
            self._table = load_query_table(self.source)
            dim = next(iter(self._table.pools.values())).features.shape[1]
            if dim != self.policy.cfg.frame_dim:
                raise ConfigError(f"policy.frame_dim: {self.policy.cfg.frame_dim} but the cached "
                                  f"frame features have {dim} dimensions")
        return self._table

    def policy_batch(self, query: Sequence[int], show_options: Sequence[bool]
                     ) -> tuple[PolicyBatch, int, np.ndarray]:
        """The distinct (query, show options) pairs of the rows as a PolicyBatch, for the
        policy's ``group`` argument: a GRPO group shares one query, so its prompt (the pool,
        the question, the options) runs once, not G times.

        Returns (batch of distinct pairs, n, order): row ``i * n + j`` of a ``group=n`` call is
        input row ``order[i * n + j]``. When the pairs do not all repeat equally often, n = 1
        and the batch has one row per input row.
        """
        keys = [(int(q), bool(s)) for q, s in zip(query, show_options)]
        rows_of: dict[tuple[int, bool], list[int]] = {}
        for r, key in enumerate(keys):
            rows_of.setdefault(key, []).append(r)
        counts = {len(v) for v in rows_of.values()}
        if len(counts) == 1:
            uniq, n = list(rows_of), counts.pop()
            order = np.asarray([r for key in uniq for r in rows_of[key]], np.int64)
        else:
            uniq, n, order = keys, 1, np.arange(len(keys))
        examples = []
        for q, show in uniq:
            query_ = self.table.queries[q]
            q_emb, opt_emb = self.table.question_features[query_.question_id]
            examples.append(example_from_pool(self.table.pools[query_.video_id], q_emb,
                                              opt_emb if show else None))
        return collate(examples), n, order

    # -- env runner side -------------------------------------------------------------------

    def _act(self, batch: dict[str, Any], greedy: bool) -> dict[str, Any]:
        obs = {name: np.asarray(v.cpu() if isinstance(v, Tensor) else v)
               for name, v in batch[Columns.OBS].items()}
        step, k, episode = obs["step"], obs["k"], obs["episode"]
        for kk in np.unique(k[step == 0]):  # new episodes: plan all K picks in one pass
            rows = np.flatnonzero((step == 0) & (k == kk))
            pb, n, order = self.policy_batch(obs[QUERY][rows], obs[SHOW_OPTIONS][rows])
            out = self.policy.sample(pb, int(kk), greedy=greedy, group=n,
                                     generator=self._noise(episode[rows]))
            for r, c, lp in zip(rows[order], out.chosen.numpy(), out.logp.numpy()):
                self._plans[int(episode[r])] = (c, lp)
                self._plans.move_to_end(int(episode[r]))
        while len(self._plans) > self.MAX_PLANS:
            self._plans.popitem(last=False)
        actions = np.zeros(len(step), np.int64)
        logp = np.zeros(len(step), np.float32)
        for r in range(len(step)):
            t = int(step[r])
            if t >= int(k[r]):  # a finished sub-env waiting for its autoreset: action ignored
                continue
            c, lp = self._plans[int(episode[r])]
            if not np.array_equal(obs["chosen"][r, :t], c[:t]):
                raise RuntimeError(f"episode {int(episode[r])}: the env holds picks "
                                   f"{obs['chosen'][r, :t].tolist()}, the policy made "
                                   f"{c[:t].tolist()}")
            actions[r], logp[r] = c[t], lp[t]
            if t == int(k[r]) - 1:
                del self._plans[int(episode[r])]
        return {Columns.ACTIONS: torch.from_numpy(actions),
                Columns.ACTION_LOGP: torch.from_numpy(logp)}

    def _noise(self, episodes: np.ndarray) -> torch.Generator:
        """The sampling noise of these episodes, a function of (seed, episode ids) only: the
        global torch RNG would do, but RLlib reseeds it on restore, so a resumed run would
        draw other frames than the uninterrupted one. Episode ids are stream positions, which
        `train --resume` restores."""
        seed = np.random.SeedSequence([int(self.model_config.get("seed", 0)),
                                       int(episodes.min())]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def _timed_act(self, batch: dict[str, Any], greedy: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return self._act(batch, greedy)
        finally:
            self.act_seconds += time.perf_counter() - t0

    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._timed_act(batch, greedy=False)

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._timed_act(batch, greedy=True)

    # -- learner side ----------------------------------------------------------------------

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Teacher-forced re-scoring of whole episodes: per-step log-probs and entropies."""
        pb, n, order = self.policy_batch(batch[QUERY].tolist(), batch[SHOW_OPTIONS].tolist())
        order = torch.as_tensor(order, device=batch[Columns.ACTIONS].device)
        out = self.policy.rescore(pb, batch[Columns.ACTIONS][order], group=n)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return {"logp": out.logp[inverse], "entropy": out.entropy[inverse]}


# ----------------------------------------------------------------------------- learner


class GRPOLearner(TorchLearner):
    """TorchLearner with the GRPO loss (no value function, no KL)."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> Tensor:
        loss, stats = grpo_loss(
            fwd_out["logp"], batch[Columns.ACTION_LOGP], batch[Columns.ADVANTAGES],
            batch[VALID], fwd_out["entropy"], clip=config.clip_param,
            beta=config.entropy_coeff,
        )
        for key, value in stats.items():
            self.metrics.log_value((module_id, key), value.item(), window=1)
        return loss


# ------------------------------------------------------------------------------ config


@dataclass
class TrainConfig:
    """The ``train:`` section of a run config (GRPO hyper-parameters and rollout layout)."""

    iterations: int = 200
    group_size: int = 8  # G episodes per (video, question)
    groups_per_batch: int = 8  # train batch size, in groups
    minibatch_groups: int = 0  # groups per gradient step; 0 = the whole batch
    num_epochs: int = 1
    clip: float = 0.2  # eps_c
    entropy_coeff: float = 1e-3  # beta
    adv_eps: float = 1e-6
    lr: float = 1e-4
    grad_clip: float = 1.0
    # K stages: [[K, iterations], ...]; the last K stays after its stage ends
    curriculum: list = field(default_factory=lambda: [[4, 50], [8, 50], [16, 50], [32, 50]])
    options_dropout: float = 0.25  # share of groups whose query hides the options
    num_env_runners: int = 0
    groups_per_env_runner: int = 4  # M: one vector env runs G * M episodes at once
    # sample iteration i + 1 on the env runners while learning on i (needs num_env_runners > 0)
    async_sampling: bool = False
    # a round that remote env runners have not returned after this long is an error, not a
    # hang (a dead runner fails fast and is restored; this catches one alive but stuck)
    sample_timeout_s: float = 900.0
    # placement (refocus_ray/placement.py): resources per env runner and per learner
    num_cpus_per_env_runner: float = 1.0
    num_gpus_per_env_runner: float = 0.0
    env_runner_resources: dict[str, float] = field(default_factory=dict)
    num_learners: int = 0  # 0 = the learner runs in the driver process
    num_cpus_per_learner: float = 1.0
    num_gpus_per_learner: float = 0.0
    learner_resources: dict[str, float] = field(default_factory=dict)
    checkpoint_every: int = 10
    split: str = "train"
    # export the checkpoint whose policy scores best on this split (mean accuracy over the
    # curriculum's K), not the last one; None: the last (see train.CheckpointSelection)
    select_split: str | None = None
    seed: int | None = None  # None: the run's seed

    def check(self, key: str) -> None:
        check_grpo_settings(key, self.group_size, self.groups_per_batch, self.minibatch_groups,
                            self.num_epochs, self.clip, self.entropy_coeff,
                            self.curriculum, self.options_dropout,
                            async_sampling=self.async_sampling,
                            num_env_runners=self.num_env_runners)
        for name in ("iterations", "groups_per_env_runner", "checkpoint_every", "lr",
                     "sample_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.num_env_runners < 0 or self.num_learners < 0:
            raise ConfigError(f"{key}.num_env_runners and {key}.num_learners: must be >= 0")
        from refocus_ray import placement

        placement.check_amounts(
            key, num_cpus_per_env_runner=self.num_cpus_per_env_runner,
            num_gpus_per_env_runner=self.num_gpus_per_env_runner,
            num_cpus_per_learner=self.num_cpus_per_learner,
            num_gpus_per_learner=self.num_gpus_per_learner)
        placement.check_custom(f"{key}.env_runner_resources", self.env_runner_resources)
        placement.check_custom(f"{key}.learner_resources", self.learner_resources)
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"{key}.split: must be train, val or test, got {self.split!r}")
        if self.select_split == "test":
            raise ConfigError(f"{key}.select_split: 'test' would pick the policy on the split "
                              f"the held-out check reports; use val")
        if self.select_split not in (None, "train", "val"):
            raise ConfigError(f"{key}.select_split: must be val, train or null, "
                              f"got {self.select_split!r}")


def check_grpo_settings(key: str, group_size: int, groups_per_batch: int, minibatch_groups: int,
                        num_epochs: int, clip: float, entropy_coeff: float, curriculum: Any,
                        options_dropout: float, *, async_sampling: bool = False,
                        num_env_runners: int = 0) -> None:
    """Shared by TrainConfig and GRPOConfig; errors name ``<key>.<field>``."""
    if async_sampling and num_env_runners < 1:
        raise ConfigError(f"{key}.async_sampling: needs {key}.num_env_runners >= 1, got "
                          f"{num_env_runners} (with no remote env runners the driver samples "
                          "itself and cannot sample while it learns)")
    if group_size < 2:
        raise ConfigError(f"{key}.group_size: must be >= 2 (GRPO needs a reward spread), "
                          f"got {group_size}")
    if groups_per_batch < 1:
        raise ConfigError(f"{key}.groups_per_batch: must be >= 1, got {groups_per_batch}")
    if minibatch_groups < 0 or (minibatch_groups and groups_per_batch % minibatch_groups):
        raise ConfigError(f"{key}.minibatch_groups: must divide groups_per_batch="
                          f"{groups_per_batch} (or be 0), got {minibatch_groups}")
    if num_epochs < 1:
        raise ConfigError(f"{key}.num_epochs: must be >= 1, got {num_epochs}")
    if not clip > 0:
        raise ConfigError(f"{key}.clip: must be > 0, got {clip}")
    if entropy_coeff < 0:
        raise ConfigError(f"{key}.entropy_coeff: must be >= 0, got {entropy_coeff}")
    if not 0.0 <= options_dropout <= 1.0:
        raise ConfigError(f"{key}.options_dropout: must be in [0, 1], got {options_dropout}")
    ok = isinstance(curriculum, (list, tuple)) and len(curriculum) > 0 and all(
        isinstance(s, (list, tuple)) and len(s) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s)
        for s in curriculum)  # fmt: skip
    if not ok:
        raise ConfigError(f"{key}.curriculum: must be a non-empty list of [K, iterations] "
                          f"pairs of positive ints, got {curriculum!r}")


def k_at(curriculum: Sequence[Sequence[int]], iteration: int) -> int:
    """K of the curriculum stage that holds `iteration` (0-based); the last K persists."""
    for k, iters in curriculum:
        if iteration < iters:
            return int(k)
        iteration -= iters
    return int(curriculum[-1][0])


class GRPOConfig(AlgorithmConfig):
    """RLlib config of GRPO for the frame selector. Build it from a run config with
    `GRPOConfig.from_run_config(cfg)`; `training(...)` takes the GRPO keys below."""

    def __init__(self, algo_class=None) -> None:
        super().__init__(algo_class=algo_class or GRPO)
        self.group_size = 8
        self.groups_per_batch = 8
        self.minibatch_groups = 0
        self.num_epochs = 1
        self.clip_param = 0.2
        self.entropy_coeff = 1e-3
        self.adv_eps = 1e-6
        self.curriculum = [[4, 50], [8, 50], [16, 50], [32, 50]]
        self.options_dropout = 0.25
        self.async_sampling = False
        self.lr = 1e-4
        self.grad_clip = 1.0
        self.batch_mode = "complete_episodes"
        self.gym_env_vectorize_mode = gym.VectorizeMode.VECTOR_ENTRY_POINT
        # the env runners' connectors hold no state (observations are indices, no filters):
        # RLlib's after-iteration gather + broadcast of connector states only costs a blocking
        # get_state on every runner, which with async sampling waits out its in-flight rounds
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False

    def training(self, *, group_size=NotProvided, groups_per_batch=NotProvided,
                 minibatch_groups=NotProvided, num_epochs=NotProvided, clip_param=NotProvided,
                 entropy_coeff=NotProvided, adv_eps=NotProvided, curriculum=NotProvided,
                 options_dropout=NotProvided, async_sampling=NotProvided,
                 **kwargs) -> GRPOConfig:
        super().training(**kwargs)
        given = {
            "group_size": group_size, "groups_per_batch": groups_per_batch,
            "minibatch_groups": minibatch_groups, "num_epochs": num_epochs,
            "clip_param": clip_param, "entropy_coeff": entropy_coeff, "adv_eps": adv_eps,
            "curriculum": curriculum, "options_dropout": options_dropout,
            "async_sampling": async_sampling,
        }  # fmt: skip
        for name, value in given.items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @property
    def groups_per_round(self) -> int:
        """Groups one synchronous sampling round yields over all env runners."""
        return (self.num_envs_per_env_runner // self.group_size) * max(self.num_env_runners, 1)

    def validate(self) -> None:
        super().validate()
        check_grpo_settings("train", self.group_size, self.groups_per_batch,
                            self.minibatch_groups, self.num_epochs, self.clip_param,
                            self.entropy_coeff, self.curriculum, self.options_dropout,
                            # RLlib's evaluation copy (0 runners) never trains: not checked
                            async_sampling=self.async_sampling and not self.in_evaluation,
                            num_env_runners=self.num_env_runners)
        if self.num_envs_per_env_runner % self.group_size:
            raise ConfigError(f"env_runners.num_envs_per_env_runner: must be a multiple of "
                              f"train.group_size={self.group_size}, got "
                              f"{self.num_envs_per_env_runner}")
        if self.groups_per_batch % self.groups_per_round:
            raise ConfigError(f"train.groups_per_batch: must be a multiple of the groups of one "
                              f"sampling round ({self.groups_per_round} = groups_per_env_runner"
                              f" x env runners), got {self.groups_per_batch}")
        if gym.VectorizeMode(self.gym_env_vectorize_mode) != gym.VectorizeMode.VECTOR_ENTRY_POINT:
            raise ConfigError("env_runners.gym_env_vectorize_mode: GRPO groups need the env's "
                              "own VectorEnv (VECTOR_ENTRY_POINT)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=SelectorRLModule)

    def get_default_learner_class(self):
        return GRPOLearner

    def build_learner_connector(self, input_observation_space, input_action_space, device=None):
        """Episodes -> per-episode rows with group advantages -> torch (no RLlib defaults:
        they flatten episodes into timesteps, and GRPO re-scores whole episodes)."""
        return LearnerConnectorPipeline(
            connectors=[
                GroupAdvantages(group_size=self.group_size, adv_eps=self.adv_eps),
                NumpyToTensor(as_learner_connector=True, device=device),
            ],
            input_observation_space=input_observation_space,
            input_action_space=input_action_space,
        )

    @classmethod
    def from_run_config(cls, cfg: Config, scorer: Any = None) -> GRPOConfig:
        """The GRPO algorithm config of a run: ``train:``, ``policy:`` and ``reference:``.

        `scorer` (an object with ``score(requests)``) replaces the reward pool; it only reaches
        envs in this process (num_env_runners = 0).
        """
        # the env's name lives in the current Ray cluster's registry: register again
        # (idempotent), so a driver that restarted Ray since importing the env still finds it
        register()
        from refocus_ray.scoring import ReferenceConfig

        t: TrainConfig = build(TrainConfig, cfg.section("train"), "train")
        policy = PolicyConfig.from_dict(cfg.section("policy"))
        check_policy_bridge(cfg, policy.bridge_classes)
        reference = build(ReferenceConfig, cfg.section("reference"), "reference")
        k_max = max(k for k, _ in t.curriculum)
        if k_max > cfg.pool.max_frames:
            raise ConfigError(f"train.curriculum: K={k_max} exceeds pool.max_frames="
                              f"{cfg.pool.max_frames}")
        if scorer is not None and t.num_env_runners:
            raise ConfigError("train.num_env_runners: an in-process scorer needs 0 env runners")
        seed = cfg.seed if t.seed is None else t.seed
        source = QuerySource.of(cfg, t.split, min_frames=k_max)
        env_config = {
            "query_source": source.to_dict(), "group_size": t.group_size,
            "k": t.curriculum[0][0], "k_max": k_max, "f_max": cfg.pool.max_frames,
            "reward": reference.reward, "options_dropout": t.options_dropout, "seed": seed,
            "reference": cfg.section("reference"),
        }  # fmt: skip
        if scorer is not None:
            env_config["scorer"] = InProcessScorer(scorer)
        return (
            cls()
            .environment(ENV_NAME, env_config=env_config)
            .env_runners(
                num_env_runners=t.num_env_runners,
                num_envs_per_env_runner=t.group_size * t.groups_per_env_runner,
                gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT,
                num_cpus_per_env_runner=t.num_cpus_per_env_runner,
                num_gpus_per_env_runner=t.num_gpus_per_env_runner,
                custom_resources_per_env_runner=dict(t.env_runner_resources),
                sample_timeout_s=t.sample_timeout_s,
            )
            .learners(
                num_learners=t.num_learners, num_cpus_per_learner=t.num_cpus_per_learner,
                num_gpus_per_learner=t.num_gpus_per_learner,
                custom_resources_per_learner=dict(t.learner_resources),
            )
            .training(
                group_size=t.group_size, groups_per_batch=t.groups_per_batch,
                minibatch_groups=t.minibatch_groups, num_epochs=t.num_epochs,
                clip_param=t.clip, entropy_coeff=t.entropy_coeff, adv_eps=t.adv_eps,
                curriculum=[list(s) for s in t.curriculum], options_dropout=t.options_dropout,
                async_sampling=t.async_sampling, lr=t.lr, grad_clip=t.grad_clip,
            )
            .rl_module(model_config={"policy": policy.to_dict(), "seed": seed,
                                     "query_source": source.to_dict()})
            .debugging(seed=seed)
        )


# ---------------------------------------------------------------------------- algorithm


def _sample_round(runner: Any, k: int, cursor: int, num_episodes: int) -> tuple:
    """On one env runner: set K and the query cursor, sample whole groups, return episodes,
    RLlib's runner metrics and the env's counters plus this runner's time split (sampling
    wall time, of which policy inference and waiting for the reward pool)."""
    env = runner.env.unwrapped
    env.configure(k=k, cursor=cursor, stream_offset=max((runner.worker_index or 0) - 1, 0),
                  stream_stride=max(runner.num_workers or 0, 1))
    module = runner.module
    policy0, t0 = getattr(module, "act_seconds", 0.0), time.perf_counter()
    episodes = runner.sample(num_episodes=num_episodes, explore=True)
    stats = env.pop_stats()
    stats["sample_s"] = time.perf_counter() - t0
    stats["policy_s"] = getattr(module, "act_seconds", 0.0) - policy0
    return episodes, runner.get_metrics(), stats


@dataclass
class Rollouts:
    """The sampling rounds of one iteration, launched: `GRPO._collect` waits for them."""

    iteration: int
    k: int  # the curriculum's K at `iteration`: every episode of these rounds has it
    tags: list[str] = field(default_factory=list)  # RLlib async-request tags (remote runners)
    done: list[tuple] = field(default_factory=list)  # rounds sampled in the driver already


class GRPO(Algorithm):
    """GRPO on whole groups: sample -> group advantages -> clipped update -> sync weights.

    Iteration i samples ``groups_per_batch`` groups in rounds (round r: every env runner runs
    its G * M episodes from query cursor ``(i * rounds + r) * M``, so the query stream depends on
    i alone), with the curriculum's K at i.

    ``async_sampling``: iteration i launches iteration i + 1's rounds on the remote env runners
    right after collecting its own, then learns, so sampling overlaps the update (and the
    weight sync, which the runners apply after those rounds). The batch learned at i + 1 was
    therefore sampled by weights one update behind the learner's (one-step off-policy). The
    loss needs nothing else: its ratio rho = pi_new / pi_old uses the behaviour log-probs the
    sampler recorded, and the PPO clip bounds how far the update follows the stale data (clip_frac
    and approx_kl show how stale it was). Groups, K and queries are those of synchronous
    sampling: a launch carries its iteration's K and cursors, so the episodes learned at i have
    the K of i (the iteration they were sampled *for*) and no question is skipped or repeated.
    In-flight rounds are not part of a checkpoint: a resumed (or restored) algorithm drops
    them and launches iteration i's rounds again, from the same cursors, with the restored
    weights. ``time_rollout_s`` is the time the driver spent getting the batch (sync: all of
    sampling; async: waiting for rounds still running, plus launching the next).
    """

    _next: Rollouts | None = None  # async: the next iteration's rounds, in flight

    @classmethod
    def get_default_config(cls) -> GRPOConfig:
        return GRPOConfig()

    def _launch(self, it: int) -> Rollouts:
        """Start iteration `it`'s rounds. Remote env runners queue them (an actor runs its
        calls in order) and this returns at once; with none, the driver's env runner samples
        them here."""
        c: GRPOConfig = self.config
        out = Rollouts(it, k_at(c.curriculum, it))
        rounds = c.groups_per_batch // c.groups_per_round
        for r in range(rounds):
            cursor = (it * rounds + r) * (c.num_envs_per_env_runner // c.group_size)
            sample = partial(_sample_round, k=out.k, cursor=cursor,
                             num_episodes=c.num_envs_per_env_runner)
            if self.env_runner_group.num_remote_workers() > 0:
                out.tags.append(f"grpo-sample-{it}-{r}")  # unique: RLlib caps in-flight per tag
                self.env_runner_group.foreach_env_runner_async(sample, tag=out.tags[-1])
            else:
                out.done.append(sample(self.env_runner))
        return out

    def _collect(self, rollouts: Rollouts) -> list[tuple]:
        """Wait for a launch's rounds: results round by round, env runners in index order. A
        failed runner's round is missing (RLlib takes the runner out of service and restores
        it), as with synchronous sampling."""
        out = list(rollouts.done)
        group, limit = self.env_runner_group, self.config.sample_timeout_s
        deadline = time.monotonic() + limit
        for tag in rollouts.tags:
            ready = []
            while True:
                left = deadline - time.monotonic()
                ready += group.fetch_ready_async_reqs(tags=tag, timeout_seconds=max(min(left, 5.0), 0))
                if group.num_in_flight_async_reqs(tag=tag) == 0:
                    break
                if left <= 0:
                    raise TimeoutError(
                        f"iteration {rollouts.iteration}: sampling round {tag!r} not returned by "
                        f"{group.num_in_flight_async_reqs(tag=tag)} env runner(s) after "
                        f"{limit:.0f} s (train.sample_timeout_s): a runner is alive but stuck "
                        f"(its log is in the Ray session's logs); checkpoints are kept, continue "
                        f"with `refocus train --resume`"
                    )
            out.extend(result for _, result in sorted(ready, key=lambda r: r[0]))
        return out

    def training_step(self) -> None:
        c: GRPOConfig = self.config
        it = self.training_iteration  # completed iterations (restored on resume)

        # 1. rollouts: this iteration's rounds (launched last iteration in async mode, unless
        #    this is the first iteration of this process); async: launch the next before learning
        t0 = time.perf_counter()
        launched, self._next = self._next, None
        if launched is None or launched.iteration != it:  # anything else in flight is dropped
            launched = self._launch(it)
        episodes, runner_metrics, env_stats = [], [], defaultdict(float)
        for eps, metrics, stats in self._collect(launched):
            episodes.extend(eps)
            runner_metrics.append(metrics)
            for key, v in stats.items():
                env_stats[key] += v
        if c.async_sampling:
            self._next = self._launch(it + 1)
        k = launched.k
        t_rollout = time.perf_counter() - t0
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)

        # 2. complete groups only; zero-variance groups carry no gradient: not sent at all
        by_group: dict[int, list] = defaultdict(list)
        for e in episodes:
            by_group[int(e.get_observations(0)[GROUP])].append(e)
        groups = [g for g in by_group.values()
                  if len(g) == c.group_size and all(e.is_terminated for e in g)]
        rewards = np.asarray([[e.get_return() for e in g] for g in groups], np.float64)
        _, valid = group_advantages(rewards.ravel(), np.repeat(np.arange(len(groups)),
                                                                c.group_size), c.adv_eps)
        train_groups = [g for g, v in zip(groups, valid[:: c.group_size]) if v]

        # 3. update: minibatches of whole groups, num_epochs passes
        t1 = time.perf_counter()
        rng = np.random.default_rng([c.seed or 0, it])
        mb = c.minibatch_groups or c.groups_per_batch
        timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
            (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)}
        updates = 0
        for _ in range(c.num_epochs if train_groups else 0):
            order = rng.permutation(len(train_groups))
            for s in range(0, len(order), mb):
                chunk = [e for gi in order[s: s + mb] for e in train_groups[gi]]
                results = self.learner_group.update(episodes=chunk, timesteps=timesteps)
                self.metrics.aggregate(results, key=LEARNER_RESULTS)
                updates += 1
        t_learn = time.perf_counter() - t1

        # 4. new weights to the env runners
        t2 = time.perf_counter()
        if updates:
            # timeout None: wait for the previous push to land first (RLlib silently skips a
            # runner whose last push is in flight; in async mode it queues behind sampling)
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               inference_only=True, timeout_seconds=None)
        t_sync = time.perf_counter() - t2

        # 5. metrics of this iteration
        flat = rewards.ravel()
        for key, value in {
            "k": k, "groups": len(groups), "groups_trained": len(train_groups),
            "zero_variance_groups_frac": 1.0 - len(train_groups) / max(len(groups), 1),
            "reward_mean": float(flat.mean()) if flat.size else float("nan"),
            "accuracy": float((flat > 0).mean()) if flat.size else float("nan"),
            "reward_group_std_mean": float(rewards.std(1).mean()) if flat.size else float("nan"),
            "updates": updates, "time_rollout_s": t_rollout, "time_learn_s": t_learn,
            "time_sync_s": t_sync, "time_reward_wait_s": env_stats["reward_wait_s"],
            # summed over env runners: sampling = policy + reward wait + env/connector work
            "time_sample_s": env_stats["sample_s"], "time_policy_s": env_stats["policy_s"],
            "reward_wait_frac": env_stats["reward_wait_s"] / max(env_stats["sample_s"], 1e-9),
            # share of the iteration the driver (learner) waited for rollouts
            "learner_wait_frac": t_rollout / max(t_rollout + t_learn + t_sync, 1e-9),
            "reward_calls": env_stats["reward_calls"],
            "reward_requests": env_stats["reward_requests"],
        }.items():  # fmt: skip
            self.metrics.log_value(("grpo", key), value, window=1)
