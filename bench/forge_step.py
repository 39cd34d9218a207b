"""Forge training step with the vision tower training vs frozen (its outputs cached).

How to run:
    .venv/bin/python bench/forge_step.py --config configs/embedded.yaml [--json out.json]

Builds the configured forge model (the `forge:` section: sizes, frame labels, threads) at
random init and times one training step (forward, answer loss, backward, AdamW) on a batch
of `batch_size` prompts of K frames each, for K in --ks, two ways, in the same run:
    pixels   the tower runs on every frame and is trained (a forge step before
             ``freeze_vision_at``)
    cached   the tower's outputs on the frames were computed once (`forge._freeze_vision`),
             the connector and text model run and train (a step after it)
It also times caching the tower's outputs on a training pool's worth of frames
(--cache-frames, default: 224 videos x 128 frames, the embedded forge's training half),
and prints ms per step (best of --repeat), the ratio pixels / cached, and the largest
difference between the two paths' hidden states (they must agree: scorers run the pixels).

What to expect (2 CPU cores): the tower is about half of a step's FLOPs at 56 px frames
(16 patches x 2 layers x width 192 per frame against ~5 text tokens x 4 layers x width 256),
so a cached step takes about half as long; caching costs a few tens of steps.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _timing import best_of

from refocus_ray import forge, prompting
from refocus_ray.cli import add_config_args, config_from_args
from refocus_ray.evidence import COUNT_WORDS, OBJECTS, question_text
from refocus_ray.pipeline import forge_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16], help="frames per prompt")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cache-frames", type=int, default=224 * 128)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    cfg = forge_config(config_from_args(args))
    torch.set_num_threads(cfg.threads)

    options = list(OBJECTS[:4])
    question = question_text("first")
    texts = [prompting.build_prompt(question, options, 0, cfg.answer_mode, "")]
    words = [*OBJECTS, *COUNT_WORDS, *forge.RANK_WORDS]
    tok, proc, model = forge.init_model(cfg, texts, prompting.answer_surfaces(words, "content"))
    batcher, opt = forge._Batcher(tok, proc, cfg), torch.optim.AdamW(model.parameters(), lr=1e-4)
    option_ids = prompting.scored_token_ids(tok, options, cfg.answer_mode)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (128, cfg.frame_size, cfg.frame_size, 3), dtype=np.uint8)
    q = forge.Question("q", "v", "first", question, options, 0, [])

    def step(batch, vision_out) -> None:
        h = forge._hidden(model, batch, vision_out)
        logits, z = forge._option_logits(model, batch, [option_ids] * len(h), h)
        n = len(h)
        target, tok_t = torch.zeros(n, dtype=torch.long), torch.tensor([option_ids[0]] * n)
        loss = forge._loss(logits, z, target, tok_t, torch.ones(n, dtype=torch.bool))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    picks = {k: [np.sort(rng.choice(len(pool), k, replace=False)) for _ in range(cfg.batch_size)]
             for k in args.ks}  # fmt: skip
    batches = {k: batcher([(q, pool[p]) for p in ps]) for k, ps in picks.items()}
    pixels_ms = {k: 1e3 * best_of(lambda b=b: step(b, None), args.repeat)
                 for k, b in batches.items()}  # fmt: skip

    big = {"v": (rng.integers(0, 256, (args.cache_frames, cfg.frame_size, cfg.frame_size, 3),
                              dtype=np.uint8), None)}  # fmt: skip
    cache_s = best_of(lambda: forge._freeze_vision(model, big, batcher.lut), 1)
    cached = forge._freeze_vision(model, {"v": (pool, None)}, batcher.lut)["v"]
    vision_out = {k: torch.cat([cached[p] for p in ps]) for k, ps in picks.items()}
    with torch.no_grad():
        b, vis = batches[args.ks[-1]], vision_out[args.ks[-1]]
        diff = (forge._hidden(model, b) - forge._hidden(model, b, vis)).abs().max().item()
    cached_ms = {k: 1e3 * best_of(lambda b=b, v=vision_out[k]: step(b, v), args.repeat)
                 for k, b in batches.items()}  # fmt: skip

    print(f"forge step, batch {cfg.batch_size}, {cfg.threads} threads, best of {args.repeat}:")
    print(f"{'K':>4} {'pixels ms':>10} {'cached ms':>10} {'pixels / cached':>16}")
    for k in args.ks:
        print(f"{k:>4} {pixels_ms[k]:>10.0f} {cached_ms[k]:>10.0f} "
              f"{pixels_ms[k] / cached_ms[k]:>15.2f}x")
    print(f"caching the tower's outputs on {args.cache_frames} frames: {cache_s:.1f} s; "
          f"largest hidden-state difference, cached vs pixels: {diff:.2e}")
    if args.json:
        out = {"ks": args.ks, "pixels_ms": pixels_ms, "cached_ms": cached_ms,
               "ratio_pixels_vs_cached": {k: pixels_ms[k] / cached_ms[k] for k in args.ks},
               "cache_seconds": cache_s, "cache_frames": args.cache_frames,
               "max_hidden_diff": diff}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
