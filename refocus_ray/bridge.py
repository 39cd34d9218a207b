"""The text-image bridge: how far a frame relates to a text, with no text-image model.

The paper's policy reads SigLIP frame features, which live in a space aligned with language, so
it can match "the cat" in a question to frames of a cat. The embedded frame encoder
(EfficientNet-Lite0) is not language-aligned. A bridge gives each frame a distribution over C
named classes, p(c | f) = softmax(W x_f + b), and the query encoder embeds each class name in
the same space as the questions and options: relevance(f, text) = sum_c p(c | f) (cos(e_c, text)
- mean_c cos(e_c, text)) (centring removes what every class shares with any text). The
training-free `relevance-diverse` baseline ranks frames by it; the policy can take it as an
input (``policy.bridge_classes``). Two sources of (W, b, class names), ``policy.bridge``:

- ``imagenet``: EfficientNet's own ImageNet head and its 1000 class names. Five of the embedded
  benchmark's twelve objects have no ImageNet class, so it tells a question's objects from the
  video's other objects poorly (pairwise AUC 0.66 on `count`, docs/benchmarks.md).
- ``reference``: what the forged reference VLM reads in each frame. The forge teaches its vision
  tower to make each frame's visual token read as a word (``forge.frame_label_weight``: the
  object's name, or the footage's), so that tower is language-aligned, as SigLIP is for the
  paper's policy. Its readings of the frames it was forged on are distilled into a linear head
  on the policy's own frame features (soft targets, full-batch Adam), so the policy, export and
  serving keep reading cached features only: the reference model is not called per query.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from refocus_ray.config import Config, ConfigError, file_hash, stable_hash

BRIDGES = ("imagenet", "reference")
DISTILL_STEPS = 300  # full-batch Adam steps of the reference bridge's linear head
DISTILL_LR = 1e-3

# ImageNet-1k class names, one per line in class-index order (Debian's opencv-doc ships them)
IMAGENET_CLASS_FILES = (
    str(Path(__file__).parent / "data" / "imagenet_classes.txt"),  # shipped with the package
    "/usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt",
)


def imagenet_class_names(path: str | None = None) -> list[str]:
    """The 1000 ImageNet class names in index order (first synonym of each line)."""
    candidates = [path] if path else list(IMAGENET_CLASS_FILES)
    for p in candidates:
        if p and Path(p).is_file():
            names = [ln.split(",")[0].strip() for ln in Path(p).read_text().splitlines()
                     if ln.strip()]
            if len(names) != 1000:
                raise ValueError(f"{p}: expected 1000 ImageNet class names, got {len(names)}")
            return names
    raise FileNotFoundError(
        f"no ImageNet class-name file (looked in {candidates}); install Debian's opencv-doc or "
        "set evaluate.imagenet_classes to a file with one class name per line")


def bridge_source(cfg: Config) -> str:
    """The run's ``policy.bridge``, validated and defaulted by PolicyConfig."""
    from refocus_ray.policy import PolicyConfig

    return PolicyConfig.from_dict(cfg.section("policy")).bridge


class TextImageBridge:
    """p(c | f) = softmax(W x_f + b) over named classes, and the names embedded by the query
    encoder: what `relevance` and the policy's bridge buffers (``tensors``) are made of."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, class_emb: np.ndarray,
                 names: list[str]) -> None:
        self.weight = np.asarray(weight, np.float32)  # [C, Df]
        self.bias = np.asarray(bias, np.float32)  # [C]
        self.class_emb = np.asarray(class_emb, np.float32)  # [C, Dt]
        self.names = list(names)

    def relevance(self, features: np.ndarray, q_emb: np.ndarray, opt_emb: np.ndarray
                  ) -> np.ndarray:
        """[F]: each frame's relevance to the question or its most related option."""
        from refocus_ray import selectors

        logits = (np.asarray(features, np.float32) @ self.weight.T + self.bias).astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        texts = np.concatenate([np.atleast_2d(q_emb), np.atleast_2d(opt_emb)])
        return selectors.relevance(p, self.class_emb, texts)

    def tensors(self) -> dict[str, np.ndarray]:
        """What the policy needs to compute relevance itself (``SelectorPolicy.set_bridge``):
        weight [C, Df], bias [C] and the class-name embeddings [C, Dt]."""
        return {"weight": self.weight, "bias": self.bias, "class_emb": self.class_emb}


def _embed_names(cfg: Config, names: list[str], cache_dir: Path) -> np.ndarray:
    """Class names through the query encoder, cached on disk under `cache_dir`."""
    cache = Path(cache_dir) / f"class-names-{stable_hash([names, cfg.encoders.query])}.npy"
    if cache.exists():
        return np.load(cache)
    from refocus_ray.encoders import QueryEncoder

    emb = QueryEncoder(cfg.encoders.query, cfg.encoders.threads)(names)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, emb)
    return emb


def imagenet_bridge(cfg: Config, class_file: str | None, cache_dir: Path) -> TextImageBridge:
    """The frame encoder's ImageNet head and the 1000 class names."""
    from refocus_ray.encoders import FrameEncoder

    names = imagenet_class_names(class_file)
    frame = FrameEncoder(cfg.encoders.frame, cfg.encoders.frame_size, cfg.encoders.threads)
    frame.class_logits(np.zeros((1, frame.dim), np.float32))  # EfficientNet only
    fc = frame.model._fc
    return TextImageBridge(fc.weight.detach().numpy(), fc.bias.detach().numpy(),
                           _embed_names(cfg, names, cache_dir), names)


def _layout(cfg: Config) -> dict[str, Any]:
    path = cfg.table_path().parent / "layout.json"
    if not path.is_file():
        raise FileNotFoundError(f"policy.bridge: reference: {path} is missing; the reference "
                                "bridge reads the words of a forged reference model, which "
                                "needs the evidence benchmark (run `refocus data evidence`)")
    return json.loads(path.read_text())


def reference_words(layout: dict[str, Any]) -> list[str]:
    """The words the forged reference reads frames as: every object, then every footage name."""
    videos = layout["videos"]
    objects = sorted({s["object"] for v in videos for s in v["segments"]})
    return objects + sorted({v["background"] for v in videos})


def reference_bridge(cfg: Config, cache_dir: Path) -> TextImageBridge:
    """Distil the forged reference's frame readings into a linear head on the frame features.

    Teacher: the reference's visual token of each pool frame of the videos it was forged on,
    read through its (tied) output embedding over `reference_words`, softmax over those words.
    Student: softmax(W x + b) on the policy's cached features of the same frames, fitted to the
    teacher's distribution (cross-entropy, standardised inputs folded back into W and b).
    Deterministic; cached by checkpoint, features and words.
    """
    from refocus_ray import features, forge
    from refocus_ray.train import reference_config

    ckpt = Path(reference_config(cfg).model)
    if not (ckpt / forge.CONFIG_FILE).is_file():
        raise ConfigError(f"policy.bridge: reference needs a forged reference model "
                          f"(reference.model: forge); {ckpt} has no {forge.CONFIG_FILE}")
    fcfg = forge.ForgeConfig.load(ckpt)
    if not fcfg.frame_label_weight:
        raise ConfigError("policy.bridge: reference needs a reference forged with "
                          "forge.frame_label_weight > 0 (frames that read as words)")
    words = reference_words(_layout(cfg))
    key = stable_hash({"ckpt": file_hash(ckpt / "model.safetensors"), "words": words,
                       "features": features.cache_key(cfg), "steps": DISTILL_STEPS,
                       "lr": DISTILL_LR, "train_videos": fcfg.train_videos})
    cache = Path(cache_dir) / f"reference-bridge-{key}.npz"
    if not cache.exists():
        _distil(cfg, ckpt, fcfg, words, cache)
    with np.load(cache) as z:
        return TextImageBridge(z["weight"], z["bias"], _embed_names(cfg, words, cache_dir), words)


def _distil(cfg: Config, ckpt: Path, fcfg: Any, words: list[str], cache: Path) -> None:
    """Fit the reference bridge's head (see `reference_bridge`) and write it to `cache`."""
    import torch

    threads = torch.get_num_threads()  # the caller's (e.g. the learner's) layout is restored
    torch.set_num_threads(cfg.encoders.threads)
    try:
        x, target = _teacher_readings(cfg, ckpt, fcfg, words)
        torch.manual_seed(cfg.seed)
        with torch.enable_grad():
            x = torch.from_numpy(x)
            mu, sd = x.mean(0), x.std(0) + 1e-6
            head = torch.nn.Linear(x.shape[1], len(words))
            opt = torch.optim.Adam(head.parameters(), lr=DISTILL_LR)
            xs, p = (x - mu) / sd, torch.softmax(torch.from_numpy(target), 1)
            for _ in range(DISTILL_STEPS):
                loss = -(p * torch.log_softmax(head(xs), 1)).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    loss = float(loss.detach())
    w = (head.weight / sd).detach()  # W ((x - mu) / sd) + b = (W / sd) x + (b - (W / sd) mu)
    b = (head.bias - w @ mu).detach()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, weight=w.numpy(), bias=b.numpy(), loss=loss)
    tmp.replace(cache)  # atomic: processes that build the bridge at once never read half a file
    print(f"[bridge] reference bridge: {len(words)} words, distilled from {len(x)} frames "
          f"(cross-entropy {loss:.4f})")


def _teacher_readings(cfg: Config, ckpt: Path, fcfg: Any, words: list[str]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cached frame features [N, Df] and the reference's word logits [N, C] of the same frames."""
    import torch
    from transformers import AutoTokenizer, Idefics3ForConditionalGeneration

    from refocus_ray import features, forge, prompting

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = prompting.scored_token_ids(tok, words, "content")
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    rows = forge.train_rows(cfg.table_path(), fcfg.train_videos)
    frames = forge.load_pools(cfg.table_path(), rows, forge.cache_dir(ckpt.parent, fcfg), fcfg)
    pools = features.load_pools(cfg)
    lut, xs, ts = forge.pixel_lut(), [], []
    for vid, (fr, times) in frames.items():
        pool = pools.get(vid)
        if pool is None:
            continue  # a video prepare could not read: no features to distil into
        if len(pool.t_s) != len(times) or not np.allclose(pool.t_s, times, atol=1e-3):
            raise ValueError(f"policy.bridge: reference: video {vid} has {len(pool.t_s)} pool "
                             f"frames in the features but {len(times)} in the forge's cache "
                             "(pool.max_frames / max_fps differ from the forge's?)")
        pix = torch.from_numpy(forge.to_pixels(fr, lut))[None]
        with torch.inference_mode():
            vis = model.model.get_image_features(pixel_values=pix).pooler_output  # [F, t, d]
            ts.append(model.lm_head(vis.mean(1))[:, ids].float().numpy())
        xs.append(pool.features)
    if not xs:
        raise ValueError("policy.bridge: reference: no training video has cached features")
    return np.concatenate(xs).astype(np.float32), np.concatenate(ts)


def load_bridge(cfg: Config, class_file: str | None = None, cache_dir: Path | None = None
                ) -> TextImageBridge:
    """The run's bridge (``policy.bridge``). ImageNet class-name embeddings are cached in
    `cache_dir` (default: the run's features dir), the distilled reference head there too."""
    features_dir = cfg.run_path / "features"
    if bridge_source(cfg) == "reference":  # one distilled head per run, whoever asks
        return reference_bridge(cfg, features_dir)
    return imagenet_bridge(cfg, class_file, Path(cache_dir) if cache_dir else features_dir)


def bridge_unavailable(cfg: Config, class_file: str | None = None) -> str | None:
    """Why the run's bridge (``policy.bridge``) cannot be built (None if it can), loading no
    model."""
    from refocus_ray.encoders import EFFICIENTNET
    from refocus_ray.forge import CONFIG_FILE
    from refocus_ray.pipeline import FORGES

    if bridge_source(cfg) == "reference":
        model = str(cfg.section("reference").get("model", ""))
        if model in FORGES or (Path(model) / CONFIG_FILE).is_file():
            return None
        return (f"the reference bridge reads a forged reference model (reference.model: "
                f"forge); reference.model is {model!r}")
    if cfg.encoders.frame != EFFICIENTNET:
        return (f"needs the {EFFICIENTNET} frame encoder's ImageNet head; this run's frame "
                f"encoder is {cfg.encoders.frame}")
    try:
        imagenet_class_names(class_file)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def bridge_tensors(cfg: Config) -> dict[str, np.ndarray]:
    """The run's bridge tensors (cached in the run's features dir)."""
    _require_bridge(cfg)
    return load_bridge(cfg).tensors()


def _require_bridge(cfg: Config) -> None:
    if why := bridge_unavailable(cfg):
        raise ConfigError(f"policy.bridge_classes: {why}")


def check_policy_bridge(cfg: Config, n_classes: int) -> None:
    """Config-time check of ``policy.bridge_classes`` (0 = off): the run can build its bridge
    and it has that many classes (the reference bridge's count is checked once the benchmark's
    layout exists). Raises ConfigError naming the key."""
    if not n_classes:
        return
    _require_bridge(cfg)
    if bridge_source(cfg) == "imagenet":
        n, what = len(imagenet_class_names()), "the ImageNet bridge"
    elif (cfg.table_path().parent / "layout.json").is_file():
        n, what = len(reference_words(_layout(cfg))), "the reference bridge (objects + footage)"
    else:
        return
    if n_classes != n:
        raise ConfigError(f"policy.bridge_classes: {what} has {n} classes, got {n_classes}")
