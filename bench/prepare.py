"""Decode and encode throughput of the prepare stage on this machine.

How to run:
    .venv/bin/python bench/prepare.py [--json out.json]

Decodes the candidate pool of real footage (a 2-minute 160x120 clip at 8 fps, re-timed from
scikit-video's bikes.mp4 and re-encoded with h264) with decord, in-process and through the
crash-isolated worker the pipeline uses, and encodes the pool with the embedded frame encoder at
112 and 160 px, both in forward passes of `encoders.batch_size` (16) frames, as prepare does,
and as the whole pool in one pass. Prints frames/s for each, the isolation overhead and the
chunked/whole speed-up as ratios measured in the same run, and checks that chunking leaves the
features unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--max-frames", type=int, default=128)
    args = ap.parse_args()

    import skvideo

    from refocus_ray.encoders import FrameEncoder
    from refocus_ray.evidence import write_mp4
    from refocus_ray.video import decode, decode_isolated, decode_pool

    src = Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"
    frames = decode(src, range(250), size=None)
    sel = np.linspace(0, 249, 960).astype(int)  # 120 s at 8 fps
    small = np.stack([f[::2, ::4][:120, :160] for f in frames[sel]])
    with tempfile.TemporaryDirectory() as d:
        clip = Path(d) / "clip_2min.mp4"
        write_mp4(clip, iter(small), 8.0, 23)
        pool = decode_pool(clip, args.max_frames, 4.0, 112)[2]
        n = len(pool)
        t_dec = best_of(lambda: decode_pool(clip, args.max_frames, 4.0, 112))
        t_iso = best_of(lambda: decode_isolated(clip, args.max_frames, 4.0, 112))
    res = {"pool_frames": n, "decode_fps": n / t_dec, "decode_isolated_fps": n / t_iso,
           "isolation_overhead_ratio": t_iso / t_dec}
    for size in (112, 160):
        x = np.ascontiguousarray(np.stack([np.resize(f, (size, size, 3)) for f in pool]))
        whole = FrameEncoder(size=size, batch_size=len(x))
        chunked = FrameEncoder(size=size)  # the config default, what prepare uses
        chunked(x[:8])  # warm-up
        t_whole = best_of(lambda x=x, f=whole: f(x), repeat=2)
        t_chunk = best_of(lambda x=x, f=chunked: f(x), repeat=2)
        res[f"encode_fps_{size}px"] = len(x) / t_chunk
        res[f"encode_whole_pool_fps_{size}px"] = len(x) / t_whole
        res[f"encode_chunked_vs_whole_{size}px"] = t_whole / t_chunk
        res[f"encode_max_abs_diff_{size}px"] = float(np.abs(whole(x) - chunked(x)).max())
    print(f"pool of {n} frames from a 2-minute 160x120 h264 clip")
    print(f"decode (decord, in-process):   {res['decode_fps']:8.0f} frames/s")
    print(f"decode (isolated worker):      {res['decode_isolated_fps']:8.0f} frames/s "
          f"(x{res['isolation_overhead_ratio']:.2f} time of in-process)")
    for size in (112, 160):
        print(f"encode EfficientNet-Lite0 {size}px, {chunked.batch_size} frames per pass: "
              f"{res[f'encode_fps_{size}px']:6.0f} frames/s; the pool in one pass: "
              f"{res[f'encode_whole_pool_fps_{size}px']:6.0f} frames/s "
              f"(x{res[f'encode_chunked_vs_whole_{size}px']:.2f}; features differ by at most "
              f"{res[f'encode_max_abs_diff_{size}px']:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
