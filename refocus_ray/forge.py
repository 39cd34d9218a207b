"""Forge: train a small reference VLM here, in an architecture vLLM serves unchanged.

No pretrained vision-language model installs on the embedded machines, yet the reward must come
from a real VLM on vLLM. So we train one on the evidence benchmark's train split: an
Idefics3ForConditionalGeneration (the architecture of SmolVLM-256M/500M/2.2B-Instruct) with a
SigLIP-style vision tower, pixel-shuffle connector and a Llama text model, all tiny. Idefics3 is
chosen because vLLM's Idefics3 path and its PIL image processor need no torchvision (PyPI's
torchvision is a CUDA build that breaks beside CPU torch); Qwen2-VL, LLaVA and InternVL import
torchvision inside vLLM.

The model answers with the option's content token (``prompting`` content mode): from scratch in
~10 minutes it learns to recognise objects but not to point at letters (PLATFORM.md).
Frames reach the model only through `preprocess_frames`, in training and in every scorer, so the
pixels it was trained on are the pixels it is scored on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refocus_ray import prompting
from refocus_ray.dataset import read_table, resolve_video
from refocus_ray.evidence import COUNT_WORDS, FAMILIES, OBJECTS
from refocus_ray.forge_questions import load_tracks, synthesize
from refocus_ray.video import decode_pool

RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
SPECIAL_TOKENS = [  # Idefics3 processor token names (its real vocabulary, not test doubles)
    "<|pad|>", "<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>",
    "<end_of_utterance>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # fmt: skip
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
)
CONFIG_FILE = "forge_config.json"  # the ForgeConfig a checkpoint was trained with
EVAL_K = (4, 8)
# evaluate_forge's subsets: every evidence segment shown among random frames; none shown; and
# every evidence segment shown among as many of the video's other objects as fit, one frame
# each (the object-dense subsets a selector shows, where the forged readers fail first)
CONDITIONS = {"with": "with_evidence", "without": "without_evidence", "dense": "dense"}
TRAIN_VIDEOS = ("all", "half0", "half1")
NO_EVIDENCE_TARGETS = ("uniform", "first_option")
AUX_LOGGED = ("frame_acc", "rank_acc", "frame_rank_acc", "word_att", "anchor_word_att",
              "anchor_att", "answer_att")
RANK_WORDS = ("none", "one", "two", "three", "four", "five", "six", "seven", "eight")


@dataclass
class ForgeConfig:
    """How to forge the reference model; defaults are the embedded setting (2 cores, <10 min)."""

    frame_size: int = 56  # frames are squashed to frame_size x frame_size (PIL, `resample`)
    resample: str = "bilinear"
    patch_size: int = 14
    scale_factor: int = 4  # pixel shuffle: (56/14)^2 / 4^2 = 1 visual token per frame
    steps: int = 1300
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    text_layers: int = 4
    hidden_size: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64  # vLLM's CPU attention kernels want a common head size
    mlp_size: int = 512
    vision_layers: int = 2
    vision_width: int = 192
    vision_heads: int = 3
    vocab_size: int = 1024
    answer_mode: str = "content"  # "content" | "letter" (see refocus_ray.prompting)
    max_frames: int = 128  # the candidate pool: at most max_frames at at most max_fps
    max_fps: float = 4.0
    # training subsets have min_k..max_k chronological frames; K = 1..3 subsets are where the
    # model first learns to match option words to frames (min_k 4: appear 0.84, first 0.53
    # after 400 steps; min_k 1: 0.97, 0.76); the embedded reward and evaluation use K <= 16
    min_k: int = 1
    max_k: int = 16
    p_evidence: float = 0.55  # share of training subsets forced to hold all evidence
    # what the model is taught to answer when the frames show none of the objects the question
    # is about: "uniform" (no margin either way) or "first_option" (a confident guess: the first
    # listed option, "one" for how-many). Uniform makes partial evidence, which a reader of the
    # frames answers confidently and often wrongly (one of three listed objects seen: "one"),
    # pay less than none, so a selector learns to avoid objects (docs/benchmarks.md, "reward
    # landscape"); a fixed guess makes "nothing seen" as wrong as a wrong reading
    no_evidence_target: str = "uniform"
    # which training videos (sorted by id): "all", or alternate halves "half0" / "half1", so
    # two forged models (the reference and the answering model) share no training video
    train_videos: str = "all"
    # auxiliary loss weight: each frame's visual tokens, as they enter the text model, are
    # classified against the (tied) word embeddings as the frame's label (the object's word,
    # or the footage's name): a cat frame then enters the text model looking like the word
    # " cat", and questions about listed objects become "is this word earlier in the input?"
    frame_label_weight: float = 0.5
    # auxiliary loss weight: every object word in the prompt text (options, listed objects,
    # the anchor of "after") predicts when that object is first seen among the frames ("one",
    # "two", ... in order of first appearance, or "none"): dense supervision of the matching
    # every family needs (appear: the seen option; first: the smallest rank; count: how many
    # ranks; after X: rank(X) + 1); the prompt puts the frames first, so words can see them.
    word_rank_weight: float = 0.5
    # auxiliary loss weight: the closing token of each shown frame's image block, halfway
    # through the text model, predicts how many distinct objects the frames have shown so far
    # (for an object frame: its object's rank of first appearance). A running count at every
    # frame, which the object words then only need to copy: among four object frames the
    # words' ranks were 51% right without it (85% among background frames)
    frame_rank_weight: float = 0.0
    # number each shown frame in the prompt (`prompting.frame_label`, one token each): "which
    # appears first / right after X" then compares the numbers before the matching frames
    # instead of positions the model must infer from rotary attention alone
    frame_labels: bool = False
    # auxiliary loss weights on where three heads look (-log of a head's attention on the
    # right positions). The order questions need a chain of lookups that the answer loss alone
    # never assembled: words answered `first` and `after` from which objects they saw. Head 0
    # of the text layer right after the frame ranks (text_layers // 2): from every object word
    # the frames show, at the closing tokens of that object's frames, so the word copies the
    # running count there (its rank of first appearance)
    word_attention_weight: float = 0.0
    # and head 1 of that layer, from the answer position of each `after` question, at the
    # anchor's frames: the answer then holds the anchor's rank one layer before the last, where
    # "the option ranked one later" can be read off the words
    anchor_attention_weight: float = 0.0
    # and head 1 of the layer before, from the same position, at the anchor's word: which
    # object the anchor is, before the answer looks for its frames. Unsupervised, this link
    # formed in 3 forges of 4; in the fourth (the demo's, session 25) the anchor head's
    # attention stayed at ~0.6 and object-dense `after` read 0.70 / 0.32
    anchor_word_attention_weight: float = 0.0
    # and head 0 of the last text layer, from the answer position of each question of
    # `answer_attention_families`, at the word it is taught to answer among the options (with
    # evidence the answer; without, the first option under ``first_option``). `count` is left
    # out: with it, `count` trained slower (val 0.90 / 0.88 at K = 4 / 8, without 0.96 / 0.93)
    answer_attention_weight: float = 0.0
    answer_attention_families: tuple[str, ...] = ("first", "after", "appear", "global")
    match_heads: int = 2  # layers whose first head starts as a "same word" head (see build_model)
    # how often each question family is drawn after the curriculum (missing: 1.0), e.g.
    # {"count": 2.0, "global": 0.25}: multi-segment families learn slowest, "global" fastest
    family_weights: dict[str, float] = field(default_factory=dict)
    # curriculum: the first `curriculum` share of steps trains "appear" (one object) only, with
    # evidence always present and K <= warm_k; then all families, and K's upper bound grows
    # to max_k by the `ramp` share of steps
    curriculum: float = 0.15
    warm_k: int = 8
    ramp: float = 0.5
    # share of steps after which the vision tower is frozen: its outputs on every training frame
    # are then computed once, and later steps run the connector and the text model only. The
    # tower only has to tell 18 frame labels apart (frame-label accuracy 1.00 from step ~300),
    # and it was ~half of a step's FLOPs (1.0: never frozen)
    freeze_vision_at: float = 1.0
    eval_subsets: int = 4  # per question, K and condition in evaluate_forge
    threads: int = 2

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"ForgeConfig: {msg}")

        for name in ("frame_size", "patch_size", "scale_factor", "steps", "batch_size",
                     "text_layers", "hidden_size", "heads", "kv_heads", "head_dim", "mlp_size",
                     "vision_layers", "vision_width", "vision_heads", "max_frames", "min_k",
                     "eval_subsets", "threads"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frame_size % (self.patch_size * self.scale_factor):
            bad(f"frame_size {self.frame_size} must be a multiple of patch_size * scale_factor")
        if self.resample not in RESAMPLE:
            bad(f"resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if self.answer_mode not in prompting.MODES:
            bad(f"answer_mode must be one of {prompting.MODES}, got {self.answer_mode!r}")
        if self.heads % self.kv_heads or self.vision_width % self.vision_heads:
            bad("heads must be a multiple of kv_heads and vision_width of vision_heads")
        if not self.min_k <= self.max_k <= self.max_frames:
            bad(f"need min_k <= max_k <= max_frames, got {self.min_k}, {self.max_k}")
        if not (self.lr > 0 and self.max_fps > 0 and self.warmup_steps >= 0):
            bad("lr and max_fps must be > 0, warmup_steps >= 0")
        if not (0 <= self.p_evidence <= 1 and 0 <= self.curriculum <= self.ramp <= 1):
            bad("need 0 <= p_evidence <= 1 and 0 <= curriculum <= ramp <= 1")
        if not 0 <= self.freeze_vision_at <= 1:
            bad(f"freeze_vision_at must be in [0, 1], got {self.freeze_vision_at}")
        if not self.min_k <= self.warm_k <= self.max_k:
            bad(f"need min_k <= warm_k <= max_k, got warm_k={self.warm_k}")
        if self.no_evidence_target not in NO_EVIDENCE_TARGETS:
            bad(f"no_evidence_target must be one of {NO_EVIDENCE_TARGETS}, "
                f"got {self.no_evidence_target!r}")
        if self.train_videos not in TRAIN_VIDEOS:
            bad(f"train_videos must be one of {TRAIN_VIDEOS}, got {self.train_videos!r}")
        heads = (self.word_attention_weight, self.anchor_attention_weight,
                 self.anchor_word_attention_weight, self.answer_attention_weight)
        if min(self.frame_label_weight, self.word_rank_weight, self.frame_rank_weight,
               *heads) < 0:
            bad("the auxiliary loss weights (*_weight) must be >= 0")
        if max(heads) > 0 and (self.text_layers < 2 or self.heads < 2):
            bad("the supervised heads (*_attention_weight) need text_layers >= 2 and heads >= 2")
        if unknown := set(self.answer_attention_families) - set(FAMILIES):
            bad(f"answer_attention_families: unknown families {sorted(unknown)}; "
                f"choose from {FAMILIES}")
        if any(w < 0 for w in self.family_weights.values()):
            bad(f"family_weights must be >= 0, got {self.family_weights}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + 64:
            bad(f"vocab_size {self.vocab_size} is too small for a byte-level BPE")

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> ForgeConfig:
        """The config a forged checkpoint was trained with."""
        return cls(**json.loads((Path(checkpoint_dir) / CONFIG_FILE).read_text()))


# ---------------------------------------------------------------- frames


def preprocess_frames(frames: np.ndarray, cfg: ForgeConfig) -> np.ndarray:
    """Squash-resize uint8 [k, H, W, 3] frames to [k, s, s, 3] with one fixed PIL resample.

    The only way frames reach the forged model, in training and in every scorer.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [k, H, W, 3], got {frames.dtype} {frames.shape}")
    s = cfg.frame_size
    if frames.shape[1:3] == (s, s):
        return frames
    resample = Image.Resampling(RESAMPLE[cfg.resample])
    return np.stack([np.asarray(Image.fromarray(f).resize((s, s), resample)) for f in frames])


def pixel_lut() -> np.ndarray:
    """uint8 -> float32 pixel value, computed as the image processor does (rescale, normalize).

    A lookup table keeps training fast and bit-identical to the processor vLLM runs.
    """
    v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (v - np.float32(0.5)) / np.float32(0.5)


def to_pixels(frames: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Preprocessed uint8 [..., s, s, 3] frames -> float32 [..., 3, s, s] model pixels."""
    return np.moveaxis(lut[frames], -1, -3)


# ---------------------------------------------------------------- tokenizer, model, processor


def train_tokenizer(texts: Sequence[str], required: Sequence[str], vocab_size: int):
    """Byte-level BPE trained offline; every `required` string must come out as one token.

    Required strings (answer surfaces such as " cat", " three", " A") are repeated in the corpus
    so BPE merges them whole; if one still splits, that is an error naming it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) + [" ".join([r.strip()] * 4) for r in sorted(set(required))] * 400
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    split = [r for r in required if len(fast.encode(r, add_special_tokens=False)) != 1]
    if split:
        raise ValueError(f"tokenizer: these answer strings are not single tokens: {split[:10]}")
    return fast


def build_model(cfg: ForgeConfig, tokenizer):
    """A random-init Idefics3ForConditionalGeneration of the configured size."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}  # fmt: skip
    vision = Idefics3VisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.frame_size, patch_size=cfg.patch_size,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, max_position_embeddings=2048,
        tie_word_embeddings=True, **ids,
    )  # fmt: skip
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=cfg.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=True,
        **ids,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = Idefics3ForConditionalGeneration(config)
    if cfg.match_heads:
        _init_match_heads(model, cfg)
    return model


def _init_match_heads(model, cfg: ForgeConfig) -> None:
    """Start the first query head of each of the first `match_heads` layers as a "same word"
    head: its query and key projections are one shared random projection, so a token attends
    to tokens that look like itself (a cat frame, once it reads as the word " cat", and that
    word). Questions about listed objects need exactly this lookup; learnt from a random
    start, it did not form within the forge's budget (word-rank accuracy stayed at its prior).
    """
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    d, hd = cfg.hidden_size, cfg.head_dim
    for layer in model.model.text_model.layers[: cfg.match_heads]:
        proj = torch.linalg.qr(torch.randn(d, hd, generator=g))[0].T  # [hd, d], orthonormal rows
        with torch.no_grad():
            layer.self_attn.q_proj.weight[:hd] = proj
            layer.self_attn.k_proj.weight[:hd] = proj


def build_processor(cfg: ForgeConfig, tokenizer, splitting: int | None = None):
    """Idefics3Processor with the PIL image processor; no torchvision anywhere.

    The forge feeds pre-resized s x s frames, so resize is the identity and splitting is off.
    `splitting` (a longest edge) turns on SmolVLM-style tiling, for cluster-shaped test models.
    """
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    s = cfg.frame_size
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": splitting or s}, max_image_size={"longest_edge": s},
        do_image_splitting=bool(splitting), resample=RESAMPLE[cfg.resample],
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
    )  # fmt: skip
    seq_len = (s // cfg.patch_size) ** 2 // cfg.scale_factor**2
    return Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=seq_len,
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def init_model(cfg: ForgeConfig, texts: Sequence[str], required: Sequence[str]):
    """(tokenizer, processor, random-init model) for a corpus and its single-token answers
    (and, with ``frame_labels``, single-token frame numbers)."""
    if cfg.frame_labels:
        required = [*required, *(prompting.frame_label(i) for i in range(cfg.max_frames))]
    tok = train_tokenizer(texts, required, cfg.vocab_size)
    return tok, build_processor(cfg, tok), build_model(cfg, tok)


def save_checkpoint(model, processor, cfg: ForgeConfig, out: str | Path) -> Path:
    """An HF directory that vLLM and transformers load unchanged, plus forge_config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # pin the PIL backend so a machine with torchvision loads the very same preprocessing
    pp = out / "processor_config.json"
    conf = json.loads(pp.read_text())
    conf["image_processor"]["image_processor_type"] = "Idefics3ImageProcessorPil"
    pp.write_text(json.dumps(conf, indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return out


# ---------------------------------------------------------------- data


@dataclass
class Question:
    qid: str
    video_id: str
    family: str
    question: str
    options: list[str]
    answer: int
    evidence: list[np.ndarray]  # per evidence segment: pool positions inside it
    others: list[np.ndarray] = field(default_factory=list)  # the same, per distractor segment


def _evidence_positions(times: np.ndarray, spans: Sequence[dict[str, float]]) -> list[np.ndarray]:
    """Pool positions per span; frame time t is in a span iff start_s <= t < end_s."""
    return [np.flatnonzero((times >= s["start_s"]) & (times < s["end_s"])) for s in spans]


def load_pools(
    table_path: str | Path, rows: Sequence[dict[str, Any]], cache: Path, cfg: ForgeConfig
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """video_id -> (preprocessed pool frames uint8 [F, s, s, 3], frame times [F] s).

    Decoded once at native size, squashed by `preprocess_frames`, cached as .npz in `cache`.
    """
    cache.mkdir(parents=True, exist_ok=True)
    pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in rows:
        vid = r["video_id"]
        if vid in pools:
            continue
        f = cache / f"{vid}.npz"
        if not f.exists():
            path = resolve_video(table_path, r["video_path"])
            info, idx, frames = decode_pool(path, cfg.max_frames, cfg.max_fps)
            np.savez(f, frames=preprocess_frames(frames, cfg), times=idx / info.fps)
        with np.load(f) as z:
            pools[vid] = (z["frames"], z["times"])
    return pools


def cache_dir(out: str | Path, cfg: ForgeConfig) -> Path:
    """Where pools are cached: keyed by everything that changes the cached pixels."""
    name = f"frames_{cfg.frame_size}_{cfg.resample}_{cfg.max_frames}f_{cfg.max_fps:g}fps"
    return Path(out) / name


def train_rows(table_path: str | Path, which: str = "all") -> list[dict[str, Any]]:
    """The train split's rows, or those of alternate videos (sorted ids) for "half0"/"half1"."""
    rows = [r for r in read_table(table_path).to_pylist() if r["split"] == "train"]
    if which != "all":
        vids = sorted({r["video_id"] for r in rows})[int(which[-1]) :: 2]
        rows = [r for r in rows if r["video_id"] in set(vids)]
    if not rows:
        raise ValueError(f"{table_path}: no train rows to forge on ({which})")
    return rows


def _questions(rows, pools) -> list[Question]:
    def pos(r, spans):
        return _evidence_positions(pools[r["video_id"]][1], spans)

    # evidence is required (a table without it cannot be scored with and without evidence);
    # distractors are optional and only feed the dense condition
    return [Question(r["question_id"], r["video_id"], r["family"], r["question"], r["options"],
                     r["answer"], pos(r, r["evidence"]), pos(r, r.get("distractors") or []))
            for r in rows]  # fmt: skip


def sample_subset(
    rng: np.random.Generator, n_pool: int, evidence: list[np.ndarray], k: int, with_evidence: bool
) -> np.ndarray | None:
    """Chronological k pool positions holding >= 1 frame of every evidence segment, or none.

    None when impossible (more segments than k, a segment without pool frames, too few
    non-evidence frames).
    """
    if with_evidence:
        return _subset(rng, n_pool, evidence, [], k)
    return _subset(rng, n_pool, [], evidence, k)


def dense_subset(
    rng: np.random.Generator, n_pool: int, evidence: list[np.ndarray], others: list[np.ndarray],
    k: int,
) -> np.ndarray | None:
    """Like `sample_subset` with evidence, and one frame of as many `others` (the video's other
    objects) as fit: the object-dense subsets a selector shows. None when impossible."""
    order = [others[i] for i in rng.permutation(len(others)) if len(others[i])]
    room = max(0, k - len(evidence))
    return _subset(rng, n_pool, [*evidence, *order[:room]], [], k)


def _subset(rng, n_pool: int, include: list[np.ndarray], exclude: list[np.ndarray], k: int):
    """k sorted positions with >= 1 from each `include` group and none from any `exclude` one."""
    if len(include) > k or any(len(e) == 0 for e in include):
        return None
    picks = np.unique([rng.choice(e) for e in include]).astype(int)
    banned = np.concatenate([picks, *exclude]) if exclude else picks
    rest = np.setdiff1d(np.arange(n_pool), banned)
    if len(rest) < k - len(picks):
        return None
    return np.sort(np.concatenate([picks, rng.choice(rest, k - len(picks), replace=False)]))


# ---------------------------------------------------------------- training


class _Batcher:
    """Builds model inputs exactly as the Idefics3 processor would, without its per-call cost."""

    def __init__(self, tokenizer, processor, cfg: ForgeConfig) -> None:
        blank = Image.new("RGB", (cfg.frame_size, cfg.frame_size))
        self.block = processor(text=IMAGE_TOKEN, images=[blank])["input_ids"][0]
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.tokens_per_frame = sum(t == self.image_id for t in self.block)
        self.tok, self.cfg, self.lut = tokenizer, cfg, pixel_lut()
        self.text_ids: dict[str, list[int]] = {}
        label = [tokenizer.encode(prompting.frame_label(i), add_special_tokens=False)
                 for i in range(cfg.max_frames)] if cfg.frame_labels else [[]] * cfg.max_frames
        self.frame_ids = [ids + list(self.block) for ids in label]  # per shown frame

    def block_ends(self, k: int) -> np.ndarray:
        """Sequence position of the last token of each of k shown frames' image blocks."""
        return np.cumsum([len(f) for f in self.frame_ids[:k]]) - 1

    def text(self, q: Question) -> list[int]:
        if q.qid not in self.text_ids:
            prompt = prompting.build_prompt(q.question, q.options, 0, self.cfg.answer_mode, "")
            self.text_ids[q.qid] = self.tok.encode(prompt, add_special_tokens=False)
        return self.text_ids[q.qid]

    def __call__(self, items: Sequence[tuple[Question, np.ndarray]], pixels: bool = True):
        """items: (question, preprocessed frames [k, s, s, 3]) -> tensors, last positions.

        pixels=False: no pixel tensor (None), for steps fed the frozen tower's outputs.
        """
        import torch

        seqs = [[*chain.from_iterable(self.frame_ids[: len(fr)]), *self.text(q)] for q, fr in items]
        n, width = len(seqs), max(map(len, seqs))
        ids = torch.full((n, width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        last = torch.tensor([len(s) - 1 for s in seqs])
        if not pixels:
            return ids, mask, None, last
        kmax, s = max(len(fr) for _, fr in items), self.cfg.frame_size
        pix = np.zeros((n, kmax, 3, s, s), np.float32)  # all-zero images are padding to HF
        for i, (_, fr) in enumerate(items):
            pix[i, : len(fr)] = to_pixels(fr, self.lut)
        return ids, mask, torch.from_numpy(pix), last


def _hidden(model, batch, vision_out=None):
    """The text model's last hidden states [n, width, d].

    `vision_out`: the frozen vision tower's outputs for the batch's frames, in order
    [frames, patches, width], given instead of running the tower on the batch's pixels.
    """
    ids, mask, pix, _ = batch
    if vision_out is None:
        return model.model(input_ids=ids, attention_mask=mask, pixel_values=pix).last_hidden_state
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    image = BaseModelOutputWithPooling(pooler_output=model.model.connector(vision_out))
    return model.model(input_ids=ids, attention_mask=mask,
                       mm_encoder_outputs={"image": image}).last_hidden_state


def _freeze_vision(model, pools, lut, chunk: int = 512) -> dict:
    """Freeze the vision tower; return its outputs on every pool frame, video_id -> [F, p, w].

    The tower is what `get_image_features` runs before the connector, so the cached outputs are
    what a scorer's forward computes from the same pixels.
    """
    import torch

    vision = model.model.vision_model
    vision.requires_grad_(False)
    out = {}
    with torch.no_grad():
        for vid in sorted(pools):
            pix = torch.from_numpy(to_pixels(pools[vid][0], lut))
            out[vid] = torch.cat([vision(pixel_values=pix[i : i + chunk]).last_hidden_state
                                  for i in range(0, len(pix), chunk)])  # fmt: skip
    return out


def _option_logits(model, batch, option_ids, h=None):
    """Full-vocab logits at each sequence's last position, and the option logits z."""
    import torch

    h = _hidden(model, batch) if h is None else h
    last = batch[3]
    logits = model.lm_head(h[torch.arange(len(last)), last])
    width = max(map(len, option_ids))  # questions have 2-4 options: pad z with -inf
    idx = torch.tensor([o + [o[0]] * (width - len(o)) for o in option_ids])
    pad = torch.tensor([[j >= len(o) for j in range(width)] for o in option_ids])
    return logits, logits.gather(1, idx).masked_fill(pad, float("-inf"))


def _schedule(step: int, cfg: ForgeConfig) -> tuple[bool, int, float]:
    """(single-object family only?, largest K, share with evidence) at this step.

    Learning to recognise one object among few frames first makes everything after it train
    (from scratch, mixing all families and K up to 32 at once stayed near chance for 400 steps).
    """
    c, r = cfg.curriculum * cfg.steps, cfg.ramp * cfg.steps
    if step < c:
        return True, cfg.warm_k, 1.0
    grow = min(1.0, (step - c) / max(1.0, r - c))
    return False, round(cfg.warm_k + grow * (cfg.max_k - cfg.warm_k)), cfg.p_evidence


def _draw_k(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Subset size, log-uniform in [lo, hi]: small K (where evidence is scarce) dominates.

    One K per step keeps a batch free of padding, halving the cost of a step.
    """
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi + 0.49))))


def _draw(rng, tracks, families, k: int, p_ev: float, pools, clips, cfg: ForgeConfig):
    """One training example: a synthesized question about a chronological k-subset of a pool.

    Returns (question, pool positions, with evidence?, per-frame label words).
    """
    w = np.array([cfg.family_weights.get(f, 1.0) for f in families])
    while True:
        fam = families[rng.choice(len(families), p=w / w.sum())]
        track = tracks[rng.integers(len(tracks))]
        ex = synthesize(rng, track, fam, k, rng.random() < p_ev, clips)
        if ex is not None:
            q = Question(f"{ex.question}|{'|'.join(ex.options)}", track.video_id, fam,
                         ex.question, ex.options, ex.answer, [])  # fmt: skip
            labels = [o or track.background for o in track.labels[ex.positions]]
            return q, ex.positions, ex.with_evidence, labels


def _frame_ranks(frame_labels, n_ranks: int) -> tuple[list[int], list[int], list[int]]:
    """(example, frame, rank) for every shown frame: how many distinct objects the frames up
    to it show (an object frame: its object's rank of first appearance), capped below n_ranks."""
    rows, frames, ranks = [], [], []
    for i, labels in enumerate(frame_labels):
        seen: set[str] = set()
        for j, o in enumerate(labels):
            if o in OBJECTS:
                seen.add(o)
            rows.append(i)
            frames.append(j)
            ranks.append(min(len(seen), n_ranks - 1))
    return rows, frames, ranks


def _word_ranks(ids, frame_labels, word_of: dict[int, str], rank_tok: list[int]):
    """(rows, cols, target token ids) for every object word in the prompts: the word's rank of
    first appearance among the objects its example's frames show, or "none"."""
    rows, cols, targets = [], [], []
    for i, labels in enumerate(frame_labels):
        seen = list(dict.fromkeys(o for o in labels if o in OBJECTS))
        for j in np.flatnonzero(np.isin(ids[i].numpy(), list(word_of))):
            o = word_of[int(ids[i, j])]
            r = seen.index(o) + 1 if o in seen else 0
            if r < len(rank_tok):
                rows.append(i)
                cols.append(int(j))
                targets.append(rank_tok[r])
    return rows, cols, targets


def _word_frames(ids, last, frame_labels, families, word_of: dict[int, str]):
    """Where the supervised heads should look, as (rows, cols, targets) each:

    - words: every object word in the prompts whose object the example's frames show, at the
      shown frames (indices) that show it;
    - anchors: the answer position of each `after` question whose anchor is shown, at the
      anchor's frames (the running count there is the anchor's rank);
    - anchor_words: the same answer positions, at the anchor's word in the question (sequence
      positions): where the answer learns which object the anchor is.
    """
    words, anchors, anchor_words = ([], [], []), ([], [], []), ([], [], [])
    for i, labels in enumerate(frame_labels):
        cols = np.flatnonzero(np.isin(ids[i].numpy(), list(word_of)))
        for n, j in enumerate(cols):
            at = [f for f, o in enumerate(labels) if o == word_of[int(ids[i, j])]]
            if not at:
                continue
            targets = [(words, int(j), at)]
            if families[i] == "after" and n == 0:  # the anchor: the question's object word
                targets += [(anchors, int(last[i]), at), (anchor_words, int(last[i]), [int(j)])]
            for out, col, where in targets:
                out[0].append(i)
                out[1].append(col)
                out[2].append(where)
    return words, anchors, anchor_words


def _answer_words(ids, last, drawn, label_ids, families, first_option: bool):
    """(rows, cols, positions): the answer position of each example of `families`, and where
    the word it is taught to answer stands among the options (its last occurrence in the
    prompt): the answer with evidence; without, the first option if `first_option` (the
    ``first_option`` target), else none."""
    rows, cols, at = [], [], []
    for i, (q, _, with_ev, _) in enumerate(drawn):
        if q.family in families and (with_ev or first_option):
            word = q.options[q.answer if with_ev else 0]
            where = np.flatnonzero(ids[i].numpy() == label_ids([word])[0])
            if len(where):
                rows.append(i)
                cols.append(int(last[i]))
                at.append([int(where[-1])])
    return rows, cols, at


def _head_attention(attn, x, pos_emb, rows, cols, head: int = 0):
    """Causal attention probabilities [R, T] of `head` of Llama attention `attn` (input `x`
    [n, T, d], rotary `pos_emb`) from positions (rows, cols) over their sequences."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import rotate_half

    hd = attn.head_dim
    kv = head // attn.num_key_value_groups
    cos, sin = (e.expand(x.shape[0], -1, -1) for e in pos_emb)
    # this head's rows of the projections only (Llama's have no bias)
    q = F.linear(x[rows, cols], attn.q_proj.weight[head * hd : (head + 1) * hd])
    k = F.linear(x, attn.k_proj.weight[kv * hd : (kv + 1) * hd])  # each sequence once
    q = q * cos[rows, cols] + rotate_half(q) * sin[rows, cols]
    k = (k * cos + rotate_half(k) * sin)[rows]
    s = torch.einsum("rtd,rd->rt", k, q) * attn.scaling
    later = torch.arange(x.shape[1])[None, :] > torch.tensor(cols)[:, None]
    return torch.softmax(s.masked_fill(later, float("-inf")), -1)


def _loss(logits, z, target, answer_tok, with_ev, first_tok=None):
    """With evidence: cross-entropy on the answer (its token over the vocabulary, and over the
    options). Without: cross-entropy to the uniform distribution over the options or, given
    `first_tok` (``no_evidence_target: first_option``), on the first option.

    Supervising evidence-free subsets with the true answer teaches the model to recognise the
    *video* (its background footage) and recall the answer: train accuracy without evidence
    reached 95% while val stayed at chance. Either target here is independent of the answer, so
    evidence is the only way to be right.
    """
    import torch
    import torch.nn.functional as F

    if first_tok is not None:
        target = torch.where(with_ev, target, torch.zeros_like(target))
        answer_tok = torch.where(with_ev, answer_tok, first_tok)
    ce = F.cross_entropy(logits, answer_tok, reduction="none")
    ce = ce + F.cross_entropy(z, target, reduction="none")
    if first_tok is not None:
        return ce.mean()
    valid = torch.isfinite(z)
    logp = torch.log_softmax(z, -1).masked_fill(~valid, 0.0)
    uniform = -logp.sum(-1) / valid.sum(-1)
    return torch.where(with_ev, ce, uniform).mean()


def _recent(log: list[dict[str, Any]]) -> str:
    tot: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for x in log:
        for fam, (h, n) in x["with_evidence_hits"].items():
            tot[fam][0] += h
            tot[fam][1] += n
    return " ".join(f"{f} {h / n:.2f}" for f, (h, n) in sorted(tot.items()))


def forge(table_path: str | Path, out_dir: str | Path, cfg: ForgeConfig | None = None) -> Path:
    """Train the reference model on the table's train split; return the checkpoint dir.

    out_dir gets ``checkpoint/`` (an HF directory vLLM and transformers load unchanged),
    ``frames_*/`` (the decoded pool cache, see `cache_dir`) and ``train_log.json``.
    """
    import torch
    import torch.nn.functional as F

    cfg = cfg or ForgeConfig()
    out = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    rows = train_rows(table_path, cfg.train_videos)
    t0 = time.time()
    pools = load_pools(table_path, rows, cache_dir(out, cfg), cfg)
    cache_s = time.time() - t0
    layout = Path(table_path).parent / "layout.json"
    if not layout.is_file():
        raise FileNotFoundError(
            f"{layout}: the forge trains on the evidence benchmark's ground truth (layout.json "
            f"beside the table); for other datasets use a pretrained reference model"
        )
    tracks, clips = load_tracks(layout, {vid: times for vid, (_, times) in pools.items()})
    modes = prompting.MODES  # the table's questions only seed the tokenizer and the families
    texts = [prompting.build_prompt(r["question"], r["options"], 0, m, "") for r in rows
             for m in modes]  # fmt: skip
    words = [*OBJECTS, *COUNT_WORDS, *clips, *RANK_WORDS]  # answers and auxiliary labels
    required = sorted(
        {s for r in rows for m in modes for s in prompting.answer_surfaces(r["options"], m)}
        | set(prompting.answer_surfaces(words, "content"))
    )
    tok, processor, model = init_model(cfg, texts, required)
    model.train()
    batcher = _Batcher(tok, processor, cfg)
    ids_cache: dict[tuple[str, ...], list[int]] = {}

    def option_ids(q: Question) -> list[int]:
        key = tuple(q.options)
        if key not in ids_cache:
            ids_cache[key] = prompting.scored_token_ids(tok, q.options, cfg.answer_mode)
        return ids_cache[key]

    label_cache: dict[str, int] = {}

    def label_ids(words: list[str]) -> list[int]:
        for w in set(words) - set(label_cache):
            label_cache[w] = prompting.scored_token_ids(tok, [w], "content")[0]
        return [label_cache[w] for w in words]

    # forward-hook taps: the connector's visual tokens [frames, tokens, d] ("tokens") and,
    # with frame ranks, the text model's hidden states halfway ("mid")
    taps: dict[str, Any] = {}

    def tap(module, name: str) -> None:
        module.register_forward_hook(
            lambda m, i, o: taps.__setitem__(name, o[0] if isinstance(o, tuple) else o))

    text_model = model.model.text_model
    tap(model.model.connector, "tokens")
    if cfg.frame_rank_weight:  # frame ranks are read halfway, so later layers can use them
        tap(text_model.layers[max(0, cfg.text_layers // 2 - 1)], "mid")
    mid = cfg.text_layers // 2  # the layer right after the frame ranks
    supervised = {mid} if cfg.word_attention_weight or cfg.anchor_attention_weight else set()
    supervised |= {mid - 1} if cfg.anchor_word_attention_weight else set()
    supervised |= {cfg.text_layers - 1} if cfg.answer_attention_weight else set()
    for layer in supervised:  # the supervised heads' input and rotary embeddings
        text_model.layers[layer].self_attn.register_forward_pre_hook(
            lambda m, a, kw, layer=layer: taps.__setitem__(
                f"att{layer}", (kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True)  # fmt: skip
    word_of = {label_ids([o])[0]: o for o in OBJECTS}  # object word token -> object
    rank_tok = label_ids(list(RANK_WORDS))

    families = sorted({r["family"] for r in rows})
    first = ["appear"] if "appear" in families else families
    track_list = [tracks[v] for v in sorted(tracks)]
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * p))

    log, t0 = [], time.time()
    frozen, freeze_step = None, round(cfg.freeze_vision_at * cfg.steps)
    for step in range(cfg.steps):
        if step == freeze_step:
            frozen = _freeze_vision(model, pools, batcher.lut)
            print(f"forge step {step}: vision tower frozen, outputs on "
                  f"{sum(len(v) for v in frozen.values())} frames cached "
                  f"({time.time() - t0:.0f}s)", flush=True)
        warm, kmax, p_ev = _schedule(step, cfg)
        k = _draw_k(rng, cfg.min_k, kmax)
        fams = first if warm else families
        drawn = [_draw(rng, track_list, fams, k, p_ev, pools, clips, cfg)
                 for _ in range(cfg.batch_size)]
        items = [(q, pools[q.video_id][0][pos]) for q, pos, _, _ in drawn]
        batch = batcher(items, pixels=frozen is None)
        h = _hidden(model, batch, None if frozen is None else
                    torch.cat([frozen[q.video_id][pos] for q, pos, _, _ in drawn]))
        logits, z = _option_logits(model, batch, [option_ids(q) for q, _ in items], h)
        target = torch.tensor([q.answer for q, _ in items])
        answer_tok = torch.tensor([option_ids(q)[q.answer] for q, _ in items])
        first_tok = (torch.tensor([option_ids(q)[0] for q, _ in items])
                     if cfg.no_evidence_target == "first_option" else None)  # fmt: skip
        loss = _loss(logits, z, target, answer_tok, torch.tensor([w for _, _, w, _ in drawn]),
                     first_tok)  # fmt: skip
        aux: dict[str, float] = {}  # auxiliary accuracies, logged
        if cfg.frame_label_weight:  # each frame's visual token reads as its label word
            words = [w for _, _, _, labels in drawn for w in labels]
            label_tok = torch.tensor(label_ids(words)).repeat_interleave(batcher.tokens_per_frame)
            frame_logits = model.lm_head(taps["tokens"].flatten(0, 1))
            loss = loss + cfg.frame_label_weight * F.cross_entropy(frame_logits, label_tok)
            aux["frame_acc"] = (frame_logits.argmax(-1) == label_tok).float().mean().item()
        if cfg.word_rank_weight:  # each object word predicts its rank of first appearance
            rows, cols, targets = _word_ranks(batch[0], [labels for *_, labels in drawn],
                                              word_of, rank_tok)  # fmt: skip
            if rows:
                rank_logits, rank_t = model.lm_head(h[rows, cols]), torch.tensor(targets)
                loss = loss + cfg.word_rank_weight * F.cross_entropy(rank_logits, rank_t)
                aux["rank_acc"] = (rank_logits.argmax(-1) == rank_t).float().mean().item()
        if cfg.frame_rank_weight:  # each frame block counts the distinct objects so far
            rows, frames, ranks = _frame_ranks([labels for *_, labels in drawn], len(rank_tok))
            cols = batcher.block_ends(k)[frames]
            fr_logits = model.lm_head(text_model.norm(taps["mid"][rows, cols]))
            fr_t = torch.tensor([rank_tok[r] for r in ranks])
            loss = loss + cfg.frame_rank_weight * F.cross_entropy(fr_logits, fr_t)
            aux["frame_rank_acc"] = (fr_logits.argmax(-1) == fr_t).float().mean().item()
        looks = []  # (layer, head, weight, name, (rows, cols, target positions))
        if cfg.word_attention_weight or cfg.anchor_attention_weight or (
                cfg.anchor_word_attention_weight):  # fmt: skip
            ends = batcher.block_ends(k)  # a frame's targets are its block's closing token
            words, anchors, anchor_words = _word_frames(
                batch[0], batch[3], [labels for *_, labels in drawn],
                [q.family for q, *_ in drawn], word_of)  # fmt: skip
            words, anchors = ((r, c, [ends[f] for f in at]) for r, c, at in (words, anchors))
            looks += [(mid, 0, cfg.word_attention_weight, "word_att", words),
                      (mid, 1, cfg.anchor_attention_weight, "anchor_att", anchors),
                      (mid - 1, 1, cfg.anchor_word_attention_weight, "anchor_word_att",
                       anchor_words)]  # fmt: skip
        if cfg.answer_attention_weight:
            looks.append((cfg.text_layers - 1, 0, cfg.answer_attention_weight, "answer_att",
                          _answer_words(batch[0], batch[3], drawn, label_ids,
                                        cfg.answer_attention_families,
                                        cfg.no_evidence_target == "first_option")))  # fmt: skip
        for layer, head, w, name, (rows, cols, at) in looks:
            if not (w and rows):
                continue
            p = _head_attention(text_model.layers[layer].self_attn, *taps[f"att{layer}"], rows,
                                cols, head)  # fmt: skip
            on = torch.zeros_like(p, dtype=torch.bool)
            for r, positions in enumerate(at):
                on[r, positions] = True
            mass = (p * on).sum(-1)  # attention where the head should look
            loss = loss - w * torch.log(mass + 1e-6).mean()
            aux[name] = mass.mean().item()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hit = (z.argmax(-1) == target).tolist()
        fam_hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # with evidence only
        for h, (q, _, w, _) in zip(hit, drawn):
            if w:
                fam_hits[q.family][0] += h
                fam_hits[q.family][1] += 1
        log.append({"step": step, "k": k, "loss": round(loss.item(), 4),
                    "acc": round(float(np.mean(hit)), 3), "with_evidence_hits": fam_hits,
                    **{k: round(v, 3) for k, v in aux.items()},
                    "seconds": round(time.time() - t0, 1)})  # fmt: skip
        if step % 50 == 0 or step == cfg.steps - 1:
            recent = log[-50:]
            shown = dict.fromkeys(a for x in recent for a in x if a in AUX_LOGGED)
            print(f"forge step {step}/{cfg.steps} K<={kmax} loss {loss.item():.3f} "
                  f"{time.time() - t0:.0f}s; train acc with evidence, last 50 steps: "
                  f"{_recent(recent)}", *(f"{a} {np.mean([x[a] for x in recent if a in x]):.2f}"
                  for a in shown), flush=True)  # fmt: skip
    train_s = time.time() - t0
    ckpt = save_checkpoint(model.eval(), processor, cfg, out / "checkpoint")
    meta = {"train_seconds": round(train_s, 1), "cache_seconds": round(cache_s, 1),
            "train_questions": len(rows), "params": sum(p.numel() for p in model.parameters()),
            "log": log}  # fmt: skip
    (out / "train_log.json").write_text(json.dumps(meta))
    return ckpt


# ---------------------------------------------------------------- evaluation


def _chance(qs: Sequence[Question], mode: str) -> float:
    """max(1/#options, share of the most frequent answer) (content or position, per mode)."""
    keys = [q.options[q.answer] if mode == "content" else q.answer for q in qs]
    top = Counter(keys).most_common(1)[0][1] / len(qs)
    return max(float(np.mean([1 / len(q.options) for q in qs])), top)


def _summary(scores: list[tuple[list[float], int]]) -> tuple[float | None, float | None]:
    if not scores:
        return None, None
    z = [(np.asarray(s), a) for s, a in scores]
    acc = float(np.mean([int(np.argmax(s) == a) for s, a in z]))
    margin = float(np.mean([s[a] - np.max(np.delete(s, a)) for s, a in z]))
    return round(acc, 4), round(margin, 4)


def evaluate_forge(
    checkpoint_dir: str | Path,
    table_path: str | Path,
    cfg: ForgeConfig | None = None,
    split: str = "val",
    scorer=None,
) -> dict[str, Any]:
    """Score K = 4 and 8 subsets with and without evidence through vLLM; write the report.

    The report goes to ``forge_report.json`` next to the checkpoint directory. `scorer` (a
    `VLLMScorer`) may be passed to reuse a running engine.
    """
    from refocus_ray.vllm_scoring import VLLMScorer

    ckpt = Path(checkpoint_dir)
    cfg = cfg or ForgeConfig.load(ckpt)
    rows = [r for r in read_table(table_path).to_pylist() if r["split"] == split]
    if not rows:
        raise ValueError(f"{table_path}: no {split} rows to evaluate")
    pools = load_pools(table_path, rows, cache_dir(ckpt.parent, cfg), cfg)
    qs = _questions(rows, pools)
    rng, rng_dense = np.random.default_rng([cfg.seed, 1]), np.random.default_rng([cfg.seed, 2])
    jobs = []  # (question, k, condition, positions)
    for q in qs:
        n = len(pools[q.video_id][0])
        for k in EVAL_K:
            for cond in CONDITIONS if q.family != "global" else ("with", "dense"):
                for _ in range(cfg.eval_subsets):
                    pos = (dense_subset(rng_dense, n, q.evidence, q.others, k) if cond == "dense"
                           else sample_subset(rng, n, q.evidence, k, cond == "with"))
                    if pos is not None:
                        jobs.append((q, k, cond, pos))
    own = scorer is None
    scorer = scorer or VLLMScorer(ckpt, max_frames=max(EVAL_K))
    t0 = time.time()
    try:
        z = scorer.score([(pools[q.video_id][0][p], q.question, q.options) for q, _, _, p in jobs])
    finally:
        if own:
            scorer.close()
    score_s = time.time() - t0

    groups: dict[tuple[str, int, str], list] = defaultdict(list)
    for (q, k, cond, _), s in zip(jobs, z):
        groups[(q.family, k, cond)].append((s, q.answer))
    by_fam: dict[str, list[Question]] = defaultdict(list)
    for q in qs:
        by_fam[q.family].append(q)
    per_family = []
    for fam in sorted(by_fam):
        for k in EVAL_K:
            row: dict[str, Any] = {"family": fam, "k": k}
            for cond, name in CONDITIONS.items():
                row[f"acc_{name}"], row[f"margin_{name}"] = _summary(groups[(fam, k, cond)])
                row[f"n_{cond}"] = len(groups[(fam, k, cond)])
            row["chance"] = round(_chance(by_fam[fam], cfg.answer_mode), 4)
            row["max_segments"] = max(len(q.evidence) for q in by_fam[fam])
            per_family.append(row)
    overall: dict[str, Any] = {}
    for cond, name in CONDITIONS.items():
        cell = [x for key, g in groups.items() if key[2] == cond for x in g]
        overall[f"acc_{name}"], overall[f"margin_{name}"] = _summary(cell)
    n_wo = sum(f["n_without"] for f in per_family)
    chance = sum(f["chance"] * f["n_without"] for f in per_family) / max(1, n_wo)
    log = ckpt.parent / "train_log.json"
    report = {
        "split": split, "answer_mode": cfg.answer_mode, "k": list(EVAL_K), **overall,
        "chance": round(chance, 4),  # per-family chance weighted by n_without
        "train_seconds": json.loads(log.read_text())["train_seconds"] if log.exists() else None,
        "score_seconds": round(score_s, 1), "prompts": len(jobs),
        "per_family": per_family,
    }  # fmt: skip
    (ckpt.parent / "forge_report.json").write_text(json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------- cluster-shaped test models

RANDOM_ARCHS = ("idefics3",)


def build_random_model(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random-init model of a cluster architecture, saved as an HF dir (plumbing tests).

    ``idefics3`` is the architecture of SmolVLM-256M/500M/2.2B-Instruct and Idefics3-8B, with
    SmolVLM-style image tiling on (frames are not pre-resized), scored in letter mode.
    Qwen2.5-VL and InternVL3 are not offered: vLLM's code for both imports torchvision.
    """
    if arch not in RANDOM_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {RANDOM_ARCHS}")
    cfg = ForgeConfig(frame_size=64, patch_size=16, text_layers=2, seed=seed, answer_mode="letter")
    letters = [" " + c for c in prompting.LETTERS[:8]]
    words = ["Which object appears in the video?", "How many objects appear?", "Options:"]
    texts = [prompting.build_prompt(w, ["cat", "dog", "moon", "page"], 0, "letter", "")
             for w in words]  # fmt: skip
    tok = train_tokenizer(texts, letters, 512)
    processor = build_processor(cfg, tok, splitting=2 * cfg.frame_size)
    out = save_checkpoint(build_model(cfg, tok).eval(), processor, cfg, Path(out_dir))
    (out / CONFIG_FILE).unlink()  # not forged: scorers pass frames as they are
    return out
