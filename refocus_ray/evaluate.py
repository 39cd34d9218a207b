"""`refocus evaluate`: the trained selector against the selectors people would use instead.

One run compares, on a split (default test) and at every K of ``evaluate.ks`` that fits the
pools, the methods of `METHODS`:

    uniform            the paper's baseline (linspace over the pool)
    random             K random frames, mean over `seeds` seeds
    diverse            k-center greedy on frame features (coverage, blind to the question)
    relevance-diverse  training-free and query-aware (mDP3-like): frame relevance to the
                       question and options through EfficientNet's ImageNet head and the query
                       encoder's embeddings of the 1000 class names, traded off against
                       redundancy by greedy MMR
    framewise          every pool frame scored alone by the reference model with a label-free
                       confidence (max option probability, never the answer); top K. One
                       reference call per pool frame: the expensive reference point
    refocus            one temperature-1 policy sample, first K picks, sorted (the released
                       code's use), mean over seeds
    refocus-greedy     argmax at every step
    refocus-bestofN    N samples, the one with the highest total log-prob under the policy
    refocus-shuffled   the policy gets another video's question (the answering model still
                       gets the true one): how much of refocus' gain comes from the query

Every selection is answered by the reference model and, when the config has an ``answerer:``
section (same fields as ``reference:``), by that model too. Metrics per method, K, model and
question family (+ ``all``): accuracy, mean logit margin, evidence recall (analysis only),
selection wall time per query (frame and question features come from the cache, so this is the
selector's own cost) and reference-model calls per query.

Output in ``<run_dir>/eval/``: ``eval.json``, ``eval.md``, ``accuracy_vs_k.png``,
``recall_by_position.png``, ``recall_heatmap.png``, ``examples/*.png``. Each (method, K, model)
result is kept in ``partial/`` as soon as it is done, so an interrupted run resumes where it
stopped; the framewise confidences (the expensive part) are kept there too.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refocus_ray import selectors
from refocus_ray.bridge import TextImageBridge, bridge_source, bridge_unavailable, load_bridge
from refocus_ray.config import Config, ConfigError, build, file_hash, stable_hash

EVAL_VERSION = 1
METHODS = ("uniform", "random", "diverse", "relevance-diverse", "framewise", "refocus",
           "refocus-greedy", "refocus-bestofN", "refocus-shuffled")
SEEDED = ("random", "refocus", "refocus-shuffled")  # averaged over `seeds` runs


@dataclass
class EvaluateConfig:
    """The ``evaluate:`` section of a run config."""

    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3  # runs averaged for random, refocus and refocus-shuffled
    best_of: int = 8  # N of refocus-bestofN
    diverse_start: str = "medoid"  # or "first"
    relevance_lambda: float = 0.5  # MMR trade-off of relevance-diverse (1 = relevance only)
    imagenet_classes: str | None = None  # class-name file; None = look in IMAGENET_CLASS_FILES
    checkpoint: str | None = None  # policy dir; None = <run_dir>/train/policy
    examples: int = 6  # contact sheets
    example_k: int = 8  # K shown on the contact sheets (the nearest evaluated K)
    batch_size: int = 64  # queries per policy batch

    def check(self, key: str) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"{key}.split: must be train, val or test, got {self.split!r}")
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"{key}.ks: must be a non-empty list of positive ints")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"{key}.methods: unknown {unknown}; known: {list(METHODS)}")
        for name in ("seeds", "best_of", "batch_size", "example_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1")
        if self.diverse_start not in ("medoid", "first"):
            raise ConfigError(f"{key}.diverse_start: must be 'medoid' or 'first'")
        if not 0.0 <= self.relevance_lambda <= 1.0:
            raise ConfigError(f"{key}.relevance_lambda: must be in [0, 1]")


def evaluate_config(cfg: Config) -> EvaluateConfig:
    return build(EvaluateConfig, cfg.section("evaluate"), "evaluate")


def checkpoint_dir(cfg: Config, checkpoint: str | Path | None = None) -> Path:
    """The policy to evaluate: the argument, ``evaluate.checkpoint``, or this run's trained one."""
    d = Path(checkpoint or evaluate_config(cfg).checkpoint or cfg.run_path / "train" / "policy")
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{d}: no model.safetensors; pass --checkpoint DIR (a policy "
                                "saved by `refocus train`: model.safetensors + policy.json)")
    return d


def scorer_configs(cfg: Config) -> dict[str, Any]:
    """{"reference": ReferenceConfig[, "answerer": ...]} (see `train.scorer_config`)."""
    from refocus_ray.train import scorer_config

    out = {"reference": scorer_config(cfg, "reference")}
    if cfg.section("answerer"):
        out["answerer"] = scorer_config(cfg, "answerer")
    return out


def fingerprint(cfg: Config, checkpoint: Path, split: str | None = None,
                report: bool = True) -> dict[str, Any]:
    """What the results depend on. ``report=False`` leaves out settings that only change which
    jobs run or how they are shown (ks, methods, examples): the partial-results key."""
    from refocus_ray.features import cache_key
    from refocus_ray.pipeline import FORGES, forge_record

    e = asdict(evaluate_config(cfg))
    e["split"] = split or e["split"]
    e.pop("checkpoint")
    if not report:
        for key in ("ks", "methods", "examples", "example_k", "batch_size"):
            e.pop(key)
    # the forge records of the forged models that answer (and of the reference, which the
    # bridge reads): re-forging the answering model re-runs evaluation too
    used = {cfg.section(s).get("model") for s in ("reference", "answerer")} | {"forge"}
    return {"version": EVAL_VERSION, "evaluate": e,
            "checkpoint": file_hash(checkpoint / "model.safetensors"),
            "reference": cfg.section("reference"), "answerer": cfg.section("answerer"),
            "table": file_hash(cfg.table_path()), "features": cache_key(cfg),
            "query": cfg.encoders.query, "bridge": bridge_source(cfg),
            **{name: forge_record(cfg, name) for name in FORGES if name in used}}


# ---------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """One method's picks at one K: ``runs[r][i]`` = pool positions for question i in run r."""

    runs: list[list[np.ndarray]]
    ms_per_query: float
    ref_calls_per_query: float


def shuffled_order(rows: list[dict[str, Any]], seed: int = 0) -> np.ndarray:
    """perm[i] = the question whose embeddings question i's policy gets, from another video.

    Questions are grouped by video (videos and questions in random order) and each takes the
    question m places further, m = the largest group: no question gets its own video's question
    whenever no video holds more than half of the questions."""
    n = len(rows)
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i in rng.permutation(n):
        groups.setdefault(rows[i]["video_id"], []).append(int(i))
    vids = list(groups)
    order = np.array([i for v in rng.permutation(len(vids)) for i in groups[vids[v]]])
    m = max(len(g) for g in groups.values())
    shift = m if m < n else 1
    perm = np.empty(n, int)
    perm[order] = order[(np.arange(n) + shift) % n]
    return perm


class _Selector:
    """Computes each method's selections once per K (memoised), timing the selector alone."""

    def __init__(self, rows: list[dict[str, Any]], policy: Any, ecfg: EvaluateConfig,
                 bridge: Callable[[], TextImageBridge], framewise: Callable[[], dict[str, Any]]
                 ) -> None:
        from refocus_ray.policy import example_from_pool

        self.rows, self.policy, self.e = rows, policy, ecfg
        self.bridge, self.framewise = bridge, framewise
        self.examples = [example_from_pool(r["pool"], r["q_emb"], r["opt_emb"]) for r in rows]
        perm = shuffled_order(rows)
        self.shuffled = [example_from_pool(r["pool"], rows[j]["q_emb"], rows[j]["opt_emb"])
                         for r, j in zip(rows, perm)]
        self.memo: dict[tuple[str, int], Selection] = {}

    def __call__(self, method: str, k: int) -> Selection:
        if (method, k) not in self.memo:
            self.memo[(method, k)] = self._select(method, k)
        return self.memo[(method, k)]

    def _timed(self, fn: Callable[[], list[list[np.ndarray]]], extra_ms: float = 0.0,
               calls: float = 0.0) -> Selection:
        t0 = time.perf_counter()
        runs = fn()
        ms = (time.perf_counter() - t0) * 1e3 / (len(self.rows) * len(runs)) + extra_ms
        return Selection(runs, ms, calls)

    def _select(self, method: str, k: int) -> Selection:
        rows, e = self.rows, self.e
        sizes = [len(r["pool"].frames) for r in rows]
        if method == "uniform":
            return self._timed(lambda: [[selectors.uniform(f, k) for f in sizes]])
        if method == "random":
            return self._timed(lambda: [
                [selectors.random(f, k, np.random.default_rng([s, i])) for i, f in enumerate(sizes)]
                for s in range(e.seeds)])
        if method == "diverse":
            return self._timed(lambda: [[selectors.diverse(r["pool"].features, k, e.diverse_start)
                                         for r in rows]])
        if method == "relevance-diverse":
            bridge = self.bridge()  # built once (class-name embeddings cached): not timed

            def run() -> list[list[np.ndarray]]:
                return [[selectors.relevance_diverse(
                    r["pool"].features, bridge.relevance(r["pool"].features, r["q_emb"],
                                                         r["opt_emb"]), k, e.relevance_lambda)
                    for r in rows]]
            return self._timed(run)
        if method == "framewise":
            fw = self.framewise()  # one reference call per pool frame, scored once for every K
            return self._timed(lambda: [[selectors.framewise(np.asarray(c), k)
                                         for c in fw["confidence"]]],
                               extra_ms=fw["ms_per_query"], calls=fw["calls_per_query"])
        if method in ("refocus", "refocus-shuffled"):
            ex = self.examples if method == "refocus" else self.shuffled
            return self._timed(lambda: [selectors.refocus(self.policy, ex, k, seed=s,
                                                          batch_size=e.batch_size)
                                        for s in range(e.seeds)])
        if method == "refocus-greedy":
            return self._timed(lambda: [selectors.refocus(self.policy, self.examples, k,
                                                          greedy=True, batch_size=e.batch_size)])
        if method == "refocus-bestofN":
            return self._timed(lambda: [selectors.refocus_best_of(
                self.policy, self.examples, k, n=e.best_of,
                batch_size=max(1, e.batch_size // e.best_of))])
        raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------ scoring


class _Pools:
    """Scoring clients by model name: the injected ones, else reward pools started on first use
    (and shut down by `close`; pools somebody else passed in are left running)."""

    def __init__(self, configs: dict[str, Any], given: Mapping[str, Any] | None) -> None:
        self.configs, self.clients = configs, dict(given or {})
        self.started: list[Any] = []

    def __getitem__(self, model: str) -> Any:
        if model not in self.clients:
            import ray

            from refocus_ray.reward_pool import RewardPool

            if not ray.is_initialized():
                ray.init(include_dashboard=False, log_to_driver=False)
            self.clients[model] = RewardPool.start(self.configs[model])
            self.started.append(self.clients[model])
        return self.clients[model]

    def close(self) -> None:
        for p in self.started:
            p.shutdown()


def span_hits(t_s: np.ndarray, spans: list[dict]) -> list[float]:
    """1.0 per evidence span with a chosen frame inside, else 0.0 (the parts of recall)."""
    return [float(any(s["start_s"] <= t < s["end_s"] for t in t_s)) for s in spans or []]


def score(client: Any, rows: list[dict[str, Any]], sel: Selection) -> list[dict[str, Any]]:
    """Per-question records of one selection answered by one model (runs in one pool call)."""
    from refocus_ray.heldout import score_selections

    n, runs = len(rows), len(sel.runs)
    correct, margin, _ = score_selections(client, rows * runs,
                                          [p for run in sel.runs for p in run])
    correct, margin = correct.reshape(runs, n), margin.reshape(runs, n)
    out = []
    for i, r in enumerate(rows):
        hits = np.mean([span_hits(r["pool"].t_s[run[i]], r["evidence"]) for run in sel.runs],
                       axis=0) if r["evidence"] else np.zeros(0)
        pos = sel.runs[0][i]
        out.append({"question_id": r["question_id"], "family": r["family"] or "-",
                    "correct": float(correct[:, i].mean()), "margin": float(margin[:, i].mean()),
                    "recall": float(hits.mean()) if len(hits) else None,
                    "span_hits": hits.tolist(), "positions": [int(p) for p in pos],
                    "frames": [int(f) for f in r["pool"].frames[pos]]})
    return out


def aggregate(part: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """Result rows (per family and ``all``) of one (method, K, model) partial."""
    qs = part["questions"]
    out = []
    for fam in ["all", *sorted({q["family"] for q in qs})]:
        sub = [q for q in qs if fam == "all" or q["family"] == fam]
        rec = [q["recall"] for q in sub if q["recall"] is not None]
        out.append({
            "method": part["method"], "k": part["k"], "model": part["model"], "split": split,
            "family": fam, "accuracy": float(np.mean([q["correct"] for q in sub])),
            "margin": float(np.mean([q["margin"] for q in sub])),
            "evidence_recall": float(np.mean(rec)) if rec else None,
            "select_ms_per_query": round(part["select_ms_per_query"], 3),
            "ref_calls_per_query": part["ref_calls_per_query"], "n": len(sub)})
    return out


# --------------------------------------------------------------------------------- driver


def _partial_name(method: str, k: int, model: str) -> str:
    return f"{method}_k{k}_{model}.json"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # atomic: an interrupted run never leaves half a result to resume from


def evaluate(cfg: Config, checkpoint: str | Path | None = None, split: str | None = None,
             pools: Mapping[str, Any] | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the comparison and write the report; returns a summary with the table.

    ``pools`` maps model name ("reference", "answerer") to a client with ``score(requests)``
    (e.g. a running `RewardPool`); missing ones are started here and stopped at the end.
    """
    from tqdm import tqdm

    from refocus_ray.heldout import heldout_questions
    from refocus_ray.policy import load

    e = evaluate_config(cfg)
    split = split or e.split
    ckpt = checkpoint_dir(cfg, checkpoint)
    out = cfg.run_path / "eval"
    partial = out / "partial"
    partial.mkdir(parents=True, exist_ok=True)
    key = stable_hash(fingerprint(cfg, ckpt, split, report=False))
    fp_file = partial / "fingerprint.json"
    if fp_file.exists() and json.loads(fp_file.read_text()).get("key") != key:
        log(f"[eval] config or checkpoint changed: discarding {partial}")
        shutil.rmtree(partial)
        partial.mkdir(parents=True)
    _write_json(fp_file, {"key": key})

    every = heldout_questions(cfg, split)
    rows = [r for r in every if len(r["pool"].frames) >= min(e.ks)]
    if not rows:
        raise ValueError(f"no {split} questions with cached features and a pool of at least "
                         f"{min(e.ks)} frames: run `refocus prepare`")
    smallest = min(len(r["pool"].frames) for r in rows)
    ks = sorted(k for k in e.ks if k <= smallest)
    notes = []
    if len(rows) < len(every):
        notes.append(f"{len(every) - len(rows)} question(s) left out: pool smaller than "
                     f"K = {min(e.ks)}.")
    if dropped := sorted(set(e.ks) - set(ks)):
        notes.append(f"K = {dropped} skipped: the smallest pool has {smallest} frames.")
    configs = scorer_configs(cfg)
    models = list(configs)
    if "answerer" not in configs:
        notes.append("No `answerer:` section in the config: every selection is answered by the "
                     "reference model only (the model whose confidence trained the policy).")

    skipped: dict[str, str] = {}
    bridge_box: list[TextImageBridge] = []

    def bridge() -> TextImageBridge:
        if not bridge_box:
            bridge_box.append(load_bridge(cfg, e.imagenet_classes, out / "cache"))
        return bridge_box[0]

    methods = list(e.methods)
    if "relevance-diverse" in methods and (why := bridge_unavailable(cfg, e.imagenet_classes)):
        skipped["relevance-diverse"] = why
        methods.remove("relevance-diverse")
        log(f"[eval] relevance-diverse skipped: {why}")

    clients = _Pools(configs, pools)
    fw_file = partial / "framewise_confidence.json"

    def framewise() -> dict[str, Any]:
        if fw_file.exists():
            return json.loads(fw_file.read_text())
        t0 = time.perf_counter()
        conf = selectors.framewise_confidence(clients["reference"], rows)
        rec = {"confidence": [c.tolist() for c in conf],
               "ms_per_query": (time.perf_counter() - t0) * 1e3 / len(rows),
               "calls_per_query": float(np.mean([len(c) for c in conf]))}
        _write_json(fw_file, rec)
        return rec

    policy = load(ckpt).eval()
    select = _Selector(rows, policy, e, bridge, framewise)
    jobs = [(m, k, model) for m in methods for k in ks for model in models]
    todo = [j for j in jobs if not (partial / _partial_name(*j)).exists()]
    if len(todo) < len(jobs):
        log(f"[eval] resuming: {len(jobs) - len(todo)} of {len(jobs)} results already done")
    try:
        for method, k, model in tqdm(todo, desc="evaluate", unit="result", disable=not progress):
            sel = select(method, k)
            part = {"method": method, "k": k, "model": model, "split": split,
                    "runs": len(sel.runs), "select_ms_per_query": sel.ms_per_query,
                    "ref_calls_per_query": sel.ref_calls_per_query,
                    "questions": score(clients[model], rows, sel)}
            _write_json(partial / _partial_name(method, k, model), part)
    finally:
        clients.close()

    parts = {j: json.loads((partial / _partial_name(*j)).read_text()) for j in jobs}
    results = [row for p in parts.values() for row in aggregate(p, split)]
    record = {"results": results, "config": cfg.to_dict(),
              "checkpoint_sha256": file_hash(ckpt / "model.safetensors"),
              "checkpoint": str(ckpt), "split": split, "ks": ks, "models": models,
              "methods": methods, "skipped_methods": skipped, "notes": notes,
              "n_questions": len(rows)}
    _write_json(out / "eval.json", record)
    figures = write_figures(out, rows, parts, ks, methods, e, results)
    table = comparison_tables(results, ks, models, methods)
    (out / "eval.md").write_text(report_markdown(record, e, figures, table))
    return {"report": str(out / "eval.md"), "eval_json": str(out / "eval.json"),
            "n_questions": len(rows), "ks": ks, "models": models, "methods": methods,
            "skipped_methods": skipped, "table": table}


# --------------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _lookup(results: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["method"], r["k"], r["model"], r["family"]): r for r in results}


def comparison_tables(results: list[dict[str, Any]], ks: list[int], models: list[str],
                      methods: list[str]) -> str:
    """Overall accuracy per method x K, per answering model (markdown)."""
    by = _lookup(results)
    k0, k1 = ks[0], ks[-1]
    parts = []
    for model in models:
        head = (["method"] + [f"acc K={k}" for k in ks]
                + [f"margin K={k0}", f"recall K={k0}", f"select ms/query K={k1}",
                   "ref calls/query"])
        lines = [f"answered by `{model}`", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for m in methods:
            r0, r1 = by[(m, k0, model, "all")], by[(m, k1, model, "all")]
            cells = ([m] + [_fmt(by[(m, k, model, "all")]["accuracy"]) for k in ks]
                     + [_fmt(r0["margin"], 2), _fmt(r0["evidence_recall"]),
                        _fmt(r1["select_ms_per_query"], 2), _fmt(r1["ref_calls_per_query"], 1)])
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def family_tables(results: list[dict[str, Any]], k: int, model: str, methods: list[str]) -> str:
    """Accuracy per family at K, and each method's gap to framewise per family."""
    by = _lookup(results)
    fams = sorted({r["family"] for r in results if r["family"] != "all"}) + ["all"]
    ns = [by[(methods[0], k, model, f)]["n"] for f in fams]
    head = "| method | " + " | ".join(f"{f} (n={n})" for f, n in zip(fams, ns)) + " |"
    sep = "|" + "---|" * (len(fams) + 1)
    acc = [head, sep] + ["| " + " | ".join([m] + [_fmt(by[(m, k, model, f)]["accuracy"])
                                                  for f in fams]) + " |" for m in methods]
    out = [f"Accuracy per question family at K={k} (`{model}`):", "", *acc]
    ref = "framewise"
    if ref in methods:
        gap = [head, sep]
        for m in (m for m in methods if m != ref):
            diff = [by[(m, k, model, f)]["accuracy"] - by[(ref, k, model, f)]["accuracy"]
                    for f in fams]
            gap.append("| " + " | ".join([m] + [f"{x:+.3f}" for x in diff]) + " |")
        out += ["", f"Gap to `{ref}` (accuracy minus {ref}'s) at K={k} (`{model}`):",
                "", *gap]
    return "\n".join(out)


def report_markdown(record: dict[str, Any], e: EvaluateConfig, figures: dict[str, Any],
                    table: str) -> str:
    ks, models, methods = record["ks"], record["models"], record["methods"]
    intro = (
        f"Checkpoint `{record['checkpoint']}` (model.safetensors sha256 "
        f"`{record['checkpoint_sha256'][:16]}...`). K = {ks}. Seeded methods "
        f"({', '.join(SEEDED)}) are means over {e.seeds} seeds; refocus-bestofN keeps the best "
        f"of N = {e.best_of} samples by the policy's own log-probability."
    )
    metrics = (
        "Accuracy: share of questions whose correct option has the top score; margin: mean "
        "logit margin of the correct option over the strongest wrong one; recall: share of "
        "evidence segments with a chosen frame inside (analysis only, never used for "
        "selection). Selection time is wall time per query with frame and question features "
        "already cached (the selector's own cost; `framewise` includes its reference-model "
        "calls, `relevance-diverse` excludes the one-off embedding of the class names)."
    )
    recall = (f"Evidence recall at K={ks[0]} by the evidence segment's position in the video, "
              "and by position and video length (NIAH-style):")
    examples = (f"Frames each method chose at K={figures['example_k']} (timeline: evidence "
                "green, distractors red, chosen frames black; + / - : answered correctly):")
    lines = [f"# Evaluation: {record['split']} split, {record['n_questions']} questions", "",
             intro, "", metrics, ""]
    lines += [f"> {n}" for n in record["notes"]]
    lines += [f"> `{m}` not run: {why}" for m, why in record["skipped_methods"].items()]
    lines += ["", "## Overall", "", table, "", "![accuracy vs K](accuracy_vs_k.png)", ""]
    lines += ["## Per question family", ""]
    for model in models:
        lines += [family_tables(record["results"], ks[0], model, methods), ""]
    lines += ["## Where the evidence is", "", recall, "",
              "![recall by position](recall_by_position.png)", "",
              "![recall heat-map](recall_heatmap.png)", "", "## Examples", "", examples, ""]
    lines += [f"![{p.stem}](examples/{p.name})" for p in figures["examples"]]
    return "\n".join(lines) + "\n"


def _example_rows(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """~n questions with evidence, round-robin over families, each from a video not shown yet
    while there is one (deterministic)."""
    by_fam: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["evidence"]:
            by_fam.setdefault(r["family"] or "-", []).append(r)
    out: list[dict[str, Any]] = []
    shown: set[str] = set()
    while len(out) < n and any(by_fam.values()):
        for fam in sorted(by_fam):
            if by_fam[fam] and len(out) < n:
                q = next((r for r in by_fam[fam] if r["video_id"] not in shown), by_fam[fam][0])
                by_fam[fam].remove(q)
                shown.add(q["video_id"])
                out.append(q)
    return out


def _thumbnails(video: str, frames: list[int], height: int = 56) -> dict[int, np.ndarray]:
    from PIL import Image

    from refocus_ray.video import decode

    imgs = decode(video, frames)
    out = {}
    for f, img in zip(frames, imgs):
        w = max(1, round(img.shape[1] * height / img.shape[0]))
        out[f] = np.asarray(Image.fromarray(img).resize((w, height)))
    return out


def write_figures(out: Path, rows: list[dict[str, Any]], parts: dict[tuple, dict[str, Any]],
                  ks: list[int], methods: list[str], e: EvaluateConfig,
                  results: list[dict[str, Any]]) -> dict[str, Any]:
    """accuracy_vs_k.png, recall plots (reference model, smallest K) and contact sheets."""
    from refocus_ray import plots

    plots.accuracy_vs_k(results, out / "accuracy_vs_k.png")
    row_by_id = {r["question_id"]: r for r in rows}
    k0 = ks[0]
    pos_hits: dict[str, list[tuple[float, float]]] = {}
    heat: dict[str, list[tuple[float, float, float]]] = {}
    for m in methods:
        pos_hits[m], heat[m] = [], []
        for q in parts[(m, k0, "reference")]["questions"]:
            r = row_by_id[q["question_id"]]
            dur = r["duration_s"] or r["pool"].n_frames / max(r["pool"].fps, 1e-9)
            for span, hit in zip(r["evidence"], q["span_hits"]):
                pos = min(max((span["start_s"] + span["end_s"]) / 2 / dur, 0.0), 1.0)
                pos_hits[m].append((pos, hit))
                heat[m].append((pos, dur, hit))
    plots.recall_by_position(pos_hits, out / "recall_by_position.png",
                             f"evidence recall by needle position, K={k0}")
    plots.recall_heatmap(heat, out / "recall_heatmap.png",
                         f"evidence recall by needle position and video length, K={k0}")
    ek = min(ks, key=lambda k: (abs(k - e.example_k), k))
    ex_dir = out / "examples"
    if ex_dir.exists():
        shutil.rmtree(ex_dir)
    ex_dir.mkdir(parents=True)
    written = []
    for r in _example_rows(rows, e.examples):
        chosen = {m: next(q for q in parts[(m, ek, "reference")]["questions"]
                          if q["question_id"] == r["question_id"]) for m in methods}
        frames = sorted({f for q in chosen.values() for f in q["frames"]})
        thumbs = _thumbnails(r["video"], frames)
        fps = r["pool"].fps
        sheet = [(f"{m} {'+' if q['correct'] >= 0.5 else '-'}", [f / fps for f in q["frames"]],
                  [thumbs[f] for f in q["frames"]]) for m, q in chosen.items()]
        opts = ", ".join(f"{'*' * (i == r['answer'])}{o}" for i, o in enumerate(r["options"]))
        title = f"{r['question_id']} [{r['family']}] {r['question']}  ({opts})  K={ek}"
        dur = r["duration_s"] or r["pool"].n_frames / max(fps, 1e-9)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in r["question_id"])
        written.append(plots.contact_sheet(ex_dir / f"{safe}.png", title, dur, r["evidence"],
                                           r["distractors"], sheet))
    return {"examples": written, "example_k": ek}
