"""GRPO training of the selector from a run config: `train(cfg) -> run dir`.

Reads the run's cached pools and query features (``refocus prepare``) and its ``train:``,
``policy:`` and ``reference:`` sections; starts the reward pool (the driver owns it; env runners
attach by name); builds the `GRPO` algorithm, or restores it with ``resume=True``; trains until
``train.iterations``. ``train.table`` picks the questions: ``all`` (default, the run's table) or
``filtered`` (the reward-variance filter's kept subset, ``refocus filter``). Run it from the repository root (or with ``ray job submit --working-dir
.``): env runners import the top-level ``envs`` package from there.

Output under ``<run_dir>/train/``:

    checkpoints/iter_000010/   RLlib checkpoints (`Algorithm.save_to_path`; they contain pickles
                               and are read only by ``resume`` of this run)
    metrics.jsonl              one JSON line per iteration (reward, accuracy, entropy, K, times)
                               times: time_rollout_s (wall), time_learn_s, time_sync_s; summed
                               over env runners time_sample_s = time_policy_s (inference) +
                               time_reward_wait_s + env work; reward_wait_frac (share of
                               sampling spent waiting for rewards), learner_wait_frac (share of
                               the iteration the learner waits for rollouts)
    policy/                    the trained selector: safetensors + JSON (`policy.load`); with
                               ``train.select_split`` the checkpoint that scored best on that
                               split (selection.jsonl, selection.json), else the last iteration
    policy_last/               with ``train.select_split``: the last iteration's selector
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from refocus_ray.config import Config, ConfigError, DataConfig, build

CHECKPOINT_RE = re.compile(r"iter_(\d{6})$")
TABLES = ("all", "filtered")  # train.table


def train_dir(cfg: Config) -> Path:
    return cfg.run_path / "train"


def latest_checkpoint(cfg: Config) -> Path | None:
    """The newest complete checkpoint of this run (by iteration), if any."""
    d = train_dir(cfg).resolve() / "checkpoints"
    done = [p for p in d.glob("iter_*") if CHECKPOINT_RE.search(p.name)
            and (p / "DONE").exists()] if d.exists() else []
    return max(done, key=lambda p: p.name, default=None)


def training_config(cfg: Config, check_table: bool = True) -> Config:
    """The run config training reads: ``train.table: filtered`` swaps the QA table for the
    filter stage's kept subset (same run dir, so the same pools and features); ``all`` keeps
    the run's table. The held-out check always uses the run's own table."""
    import copy

    section = cfg.section("train")
    choice = section.pop("table", "all")
    if choice not in TABLES:
        raise ConfigError(f"train.table: must be one of {list(TABLES)}, got {choice!r}")
    out = copy.deepcopy(cfg)
    out.extra["train"] = section
    if choice == "filtered":
        from refocus_ray.filtering import kept_table_path

        kept = kept_table_path(cfg)
        if check_table and not kept.exists():
            raise FileNotFoundError(f"train.table is 'filtered' but {kept} does not exist; "
                                    "run `refocus filter` with this config first")
        out.data = DataConfig(kind="table", table=str(kept))
    return out


def scorer_config(cfg: Config, section: str = "reference"):
    """A ReferenceConfig from a config section (``reference`` or ``answerer``); model "forge"
    or "forge_answerer" means this run's forged checkpoint of that name."""
    from refocus_ray.pipeline import FORGES, forge_checkpoint
    from refocus_ray.scoring import ReferenceConfig

    # the answerer gets its own pool name, so its actors never collide with the reference's
    defaults = {"pool_name": "refocus-answerer"} if section == "answerer" else {}
    ref = build(ReferenceConfig, {**defaults, **cfg.section(section)}, section)
    if ref.model in FORGES:
        ckpt = forge_checkpoint(cfg, ref.model)
        if not ckpt.exists():
            raise FileNotFoundError(f"{section}.model is {ref.model!r} but {ckpt} does not "
                                    "exist; run `refocus forge-reference` first or name a "
                                    "checkpoint")
        ref.model = str(ckpt.resolve())
    return ref


def reference_config(cfg: Config):
    """The ``reference:`` section (see `scorer_config`)."""
    return scorer_config(cfg, "reference")


def metrics_row(result: dict[str, Any]) -> dict[str, Any]:
    """The per-iteration line of metrics.jsonl from an `Algorithm.train()` result."""
    g = result.get("grpo", {})
    lrn = result.get("learners", {}).get("default_policy", {})

    def num(v: Any) -> float | None:
        v = float(v)
        return None if math.isnan(v) else round(v, 6)

    row: dict[str, Any] = {"iteration": int(result["training_iteration"])}
    for key in ("k", "groups", "groups_trained", "updates", "reward_calls", "reward_requests"):
        if key in g:
            row[key] = int(g[key])
    for key in ("reward_mean", "accuracy", "reward_group_std_mean", "zero_variance_groups_frac",
                "time_rollout_s", "time_reward_wait_s", "time_learn_s", "time_sync_s",
                "time_sample_s", "time_policy_s", "reward_wait_frac", "learner_wait_frac"):
        if key in g:
            row[key] = num(g[key])
    for key in ("entropy", "policy_loss", "clip_frac", "approx_kl"):
        if key in lrn:
            row[key] = num(lrn[key])
    row["time_iteration_s"] = num(result.get("time_this_iter_s", float("nan")))
    return row


class SignalWatch:
    """Warn once when GRPO has run out of signal: for `window` iterations in a row, rewards
    within a group differed by less than `min_spread` (``reward_group_std_mean``).

    Advantages are (r - mean) / (std + eps): with no spread inside groups the policy no longer
    moves, however many iterations remain. Measured on the embedded benchmark, this is how a
    policy that has learned to avoid every frame that changes the reference's answer looks
    (docs/benchmarks.md, "Training"); the message says so instead of training on in silence.
    """

    def __init__(self, min_spread: float = 0.02, window: int = 20) -> None:
        self.min_spread, self.window = min_spread, window
        self.low, self.warned = 0, False

    def update(self, row: dict[str, Any]) -> str | None:
        spread = row.get("reward_group_std_mean")
        if spread is None:
            return None
        self.low = self.low + 1 if spread < self.min_spread else 0
        if self.low < self.window or self.warned:
            return None
        self.warned = True
        return (f"[train] warning: for {self.window} iterations (to {row['iteration']}) the "
                f"rewards within a group differed by < {self.min_spread} on average "
                f"(reward_group_std_mean): GRPO has almost no signal left. The policy has "
                f"likely stopped sampling frames that change the reference's answer; "
                f"bench/reward_landscape.py shows what the reference rewards "
                f"(docs/benchmarks.md, 'Training').")


def learner_policy(algo: Any):
    """The learner's current selector as a plain `SelectorPolicy`."""
    import numpy as np
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID

    from refocus_ray.policy import PolicyConfig, SelectorPolicy

    weights = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
    pcfg = algo.config.model_config["policy"]
    policy = SelectorPolicy(PolicyConfig.from_dict(pcfg))
    policy.load_state_dict({k.removeprefix("policy."): torch.as_tensor(np.asarray(v))
                            for k, v in weights.items()})  # the learner group sends numpy
    return policy


def export_policy(algo: Any, out: Path) -> Path:
    """Save the learner's current selector as safetensors + JSON (`policy.save`)."""
    from refocus_ray.policy import save

    return save(learner_policy(algo), out)


class CheckpointSelection:
    """``train.select_split``: score the learner's policy on a held-out split at every
    checkpoint and export the best checkpoint's policy instead of the last one.

    Why: GRPO can drift after it has learned (at lr 3e-4 on the embedded benchmark, a run's
    iteration 100 scored +9 points over uniform on test and its end +3), and exporting
    whatever the last iteration holds is the worse rule then. On 185 val questions it was
    neutral (docs/benchmarks.md, Training). The score is the mean accuracy over the
    curriculum's K values of one seeded temperature-1 sample: label-using model selection on
    val, never on test.
    """

    def __init__(self, cfg: Config, split: str, ks: list[int], seed: int, out: Path,
                 client: Any, log=print) -> None:
        from refocus_ray.heldout import heldout_questions
        from refocus_ray.policy import example_from_pool

        self.ks, self.seed, self.client, self.log = ks, seed, client, log
        self.rows = heldout_questions(cfg, split, min_pool=max(ks))
        if not self.rows:
            raise ConfigError(f"train.select_split: no {split!r} questions with cached features "
                              f"and pools of at least {max(ks)} frames (run `refocus prepare`)")
        self.examples = [example_from_pool(r["pool"], r["q_emb"], r["opt_emb"])
                         for r in self.rows]  # built once, scored at every checkpoint
        self.split, self.file = split, out / "selection.jsonl"

    def restore(self, it0: int) -> None:
        """Keep the scores of the iterations the restored state has seen (as metrics.jsonl)."""
        rows = self.history() if it0 else []
        self.file.write_text("".join(json.dumps(r) + "\n" for r in rows if r["iteration"] <= it0))

    def history(self) -> list[dict[str, Any]]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines() if line]

    def update(self, iteration: int, policy: Any, ckpt: Path) -> None:
        from refocus_ray.heldout import selection_score
        from refocus_ray.policy import save

        save(policy, ckpt / "policy")  # safetensors + JSON: what is exported if it wins
        row = {"iteration": iteration, "split": self.split, "n_questions": len(self.rows),
               **selection_score(policy, self.rows, self.examples, self.client, self.ks,
                                 self.seed)}
        with self.file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.log(f"[train] selection on {self.split}: {json.dumps(row)}")

    def rank(self, row: dict[str, Any]) -> tuple[float, float]:
        """Accuracy first; the mean margin over the Ks breaks ties (few questions tie often)."""
        return row["score"], sum(row[f"margin_k{k}"] for k in self.ks) / len(self.ks)

    def export(self, out: Path) -> dict[str, Any]:
        """Copy the best checkpoint's policy to ``out``; returns its score row."""
        import shutil

        history = self.history()
        best = max(history, key=self.rank)
        src = out.parent / "checkpoints" / f"iter_{best['iteration']:06d}" / "policy"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(src, out)
        (out.parent / "selection.json").write_text(json.dumps(
            {"chosen": best, "ks": self.ks, "history": history}, indent=1))
        self.log(f"[train] exported the policy of iteration {best['iteration']} "
                 f"({self.split} score {best['score']:.3f}); the last one is in policy_last/")
        return best


# train: keys -> the GRPOConfig attribute a checkpoint restores them into
RESTORED_KEYS = {"group_size": "group_size", "groups_per_batch": "groups_per_batch",
                 "minibatch_groups": "minibatch_groups", "num_epochs": "num_epochs",
                 "clip": "clip_param", "entropy_coeff": "entropy_coeff", "adv_eps": "adv_eps",
                 "lr": "lr", "grad_clip": "grad_clip", "curriculum": "curriculum",
                 "options_dropout": "options_dropout"}  # fmt: skip


def resume_changes(t: Any, restored: Any) -> dict[str, tuple[Any, Any]]:
    """train: keys whose config value differs from the checkpoint's, as {key: (was, now)}.

    RLlib restores the whole algorithm config from a checkpoint, so a key changed before
    ``--resume`` would be silently ignored (seen: a new curriculum had no effect)."""
    out = {}
    for key, attr in RESTORED_KEYS.items():
        was, now = getattr(restored, attr), getattr(t, key)
        if key == "curriculum":
            was, now = [list(x) for x in was], [list(x) for x in now]
        if was != now:
            out[key] = (was, now)
    return out


def train(cfg: Config, resume: bool = False, scorer: Any = None, log=print) -> Path:
    """Train (or resume) GRPO for the run; returns the run directory.

    `scorer` (an object with ``score(requests)``) replaces the reward pool in this process
    (``train.num_env_runners`` must be 0); such runs cannot be resumed in another process.
    """
    import ray
    from ray.rllib.algorithms.algorithm import Algorithm

    from refocus_ray.grpo import GRPOConfig, TrainConfig

    cfg = training_config(cfg)
    t: TrainConfig = build(TrainConfig, cfg.section("train"), "train")
    out = train_dir(cfg).resolve()  # RLlib reads checkpoint paths as URIs: absolute only
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    pool, client = None, scorer  # pool: started here (and shut down); client: scores
    if scorer is None:
        from refocus_ray.reward_pool import RewardPool

        ref = reference_config(cfg)
        try:  # a pool somebody else started (same name) is used and left running
            ray.get_actor(f"{ref.pool_name}-0")
        except ValueError:
            pool = client = RewardPool.start(ref)
        else:
            client = RewardPool.attach(ref)

    start = latest_checkpoint(cfg) if resume else None
    if resume and start is None:
        log(f"[train] --resume: no checkpoint under {out / 'checkpoints'}; starting fresh")
    algo = (Algorithm.from_checkpoint(str(start)) if start is not None
            else GRPOConfig.from_run_config(cfg, scorer=scorer).build_algo())
    if start is not None and (changed := resume_changes(t, algo.config)):
        algo.stop()
        if pool is not None:
            pool.shutdown()
        raise ConfigError(
            f"train --resume: {start} was trained with "
            + "; ".join(f"train.{k}={was!r} (the config now says {now!r})"
                        for k, (was, now) in changed.items())
            + ". A resumed run continues with its checkpoint's settings: restore these keys, "
            "or train into a new run_dir (train.iterations may be raised to train longer)"
        )  # fmt: skip
    it0 = algo.training_iteration
    # metrics.jsonl holds exactly the iterations the restored state has seen
    old = metrics.read_text().splitlines() if (start is not None and metrics.exists()) else []
    metrics.write_text("".join(line + "\n" for line in old
                               if json.loads(line)["iteration"] <= it0))
    log(f"[train] {'resumed at' if start else 'starting'} iteration {it0} of {t.iterations}")
    watch = SignalWatch()
    try:
        select = None
        if t.select_split:
            seed = cfg.seed if t.seed is None else t.seed
            select = CheckpointSelection(cfg, t.select_split, sorted({k for k, _ in t.curriculum}),
                                         seed, out, client, log)
            select.restore(it0)
        with metrics.open("a") as f:
            while algo.training_iteration < t.iterations:
                t0 = time.perf_counter()
                row = metrics_row(algo.train())
                row["time_iteration_s"] = round(time.perf_counter() - t0, 4)
                if hasattr(client, "metrics"):  # the reward pool's, since its actors started
                    row.update({f"reward_pool_{k}": round(v, 4)
                                for k, v in client.metrics().items()})
                f.write(json.dumps(row) + "\n")
                f.flush()
                it = row["iteration"]
                log(f"[train] {json.dumps(row)}")
                if warning := watch.update(row):
                    log(warning)
                if it % t.checkpoint_every == 0 or it == t.iterations:
                    ckpt = out / "checkpoints" / f"iter_{it:06d}"
                    algo.save_to_path(str(ckpt))
                    if select is not None:
                        select.update(it, learner_policy(algo), ckpt)
                    (ckpt / "DONE").write_text("")  # a crash mid-save leaves no 'latest'
        if select is None or not select.history():
            export_policy(algo, out / "policy")
        else:
            export_policy(algo, out / "policy_last")
            select.export(out / "policy")
    finally:
        algo.stop()
        if pool is not None:
            pool.shutdown()
    return cfg.run_path


def describe_resources(cfg: Config) -> dict[str, Any]:
    """What `train` would ask Ray for, from the config alone (``refocus train --dry-run``).

    Validates every section training reads, including RLlib's own checks of the algorithm
    config (batch vs. sampling rounds), and returns `placement.plan`: bundles per role, totals
    per resource and, with ``cluster.nodes``, whether and where they fit. Starts no Ray work.
    """
    from refocus_ray.grpo import GRPOConfig, TrainConfig
    from refocus_ray.placement import plan

    cfg = training_config(cfg, check_table=False)
    t: TrainConfig = build(TrainConfig, cfg.section("train"), "train")
    GRPOConfig.from_run_config(cfg).validate()
    out = plan(cfg)
    out["batch"] = {"groups": t.groups_per_batch, "group_size": t.group_size,
                    "episodes": t.groups_per_batch * t.group_size,
                    "curriculum": t.curriculum, "iterations": t.iterations}
    return out
