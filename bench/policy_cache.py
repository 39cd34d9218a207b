"""Selector rollout cost with and without carrying the backbone cache between steps.

How to run:
    .venv/bin/python bench/policy_cache.py [--json out.json] [--threads 1] [--repeat 3]

Selects 32 of 512 frames for one query (EfficientNet-Lite0-sized 1280-d frame features,
384-d MiniLM-sized question + 4 option embeddings, random values: the cost does not depend on
them) with a freshly initialised policy, for the 2-layer d_model-256 Transformer and the
2-layer d_model-256 Mamba-2 backbone. Each is timed (a) carrying the KV cache / recurrent
state between steps, as ``SelectorPolicy.sample`` does, and (b) re-running the whole sequence
[frames, query, <sof>, v_c1, ...] at every step. Prints ms per selection (best of --repeat)
and the ratio, all measured in the same run, and checks both paths pick the same frames.
Also times the learner's teacher-forced ``rescore`` of the same picks (forward only) and
prints the largest |log-prob| difference between it and the sampler.

What to expect (2 shared CPU cores, 1 thread): the cached rollout costs about one prompt pass
plus 32 single-token steps; the uncached one about 33 prompt passes, so the ratio is roughly
an order of magnitude (the issue measured 47 ms vs 537 ms for the Transformer). Mamba-2 runs
the plain-torch scan (no mamba_ssm on CPU), so both of its figures are higher.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--backbones", default="transformer,mamba2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from refocus_ray.policy import PolicyConfig, PolicyExample, SelectorPolicy, collate

    g = torch.Generator().manual_seed(0)
    ex = PolicyExample(frames=torch.randn(args.pool, 1280, generator=g),
                       q_emb=torch.randn(384, generator=g),
                       opt_emb=torch.randn(4, 384, generator=g),
                       t_frac=torch.linspace(0, 1, args.pool))
    batch = collate([ex])
    res: dict = {"pool": args.pool, "k": args.k, "threads": args.threads,
                 "d_model": 256, "n_layers": 2}
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        policy = SelectorPolicy(PolicyConfig(backbone=name, d_model=256, n_layers=2)).eval()

        def run(use_cache: bool, policy: SelectorPolicy = policy):
            gen = torch.Generator().manual_seed(1)
            return policy.sample(batch, args.k, generator=gen, use_cache=use_cache)

        out = run(True)
        same = torch.equal(out.chosen, run(False).chosen)  # also warms up
        t_cache = best_of(lambda: run(True), args.repeat)
        t_full = best_of(lambda: run(False), args.repeat)
        # the learner's teacher-forced pass on the same picks (forward only) and its agreement
        with torch.no_grad():
            t_re = best_of(lambda p=policy, c=out.chosen: p.rescore(batch, c), args.repeat)
            diff = float((policy.rescore(batch, out.chosen).logp - out.logp).abs().max())
        res[name] = {"ms_cache": 1e3 * t_cache, "ms_recompute": 1e3 * t_full,
                     "ratio": t_full / t_cache, "same_picks": same,
                     "ms_rescore": 1e3 * t_re, "max_abs_logp_diff_rescore": diff}
        print(f"{name:12s} select {args.k} of {args.pool}: cache {1e3 * t_cache:8.1f} ms   "
              f"recompute {1e3 * t_full:8.1f} ms   ratio {t_full / t_cache:5.1f}x   "
              f"same picks: {same}   rescore {1e3 * t_re:6.1f} ms (|dlogp| {diff:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
