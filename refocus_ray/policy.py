"""The ReFoCUS selector: an autoregressive, query-conditioned pointer network over a frame pool.

The method (paper notes 2.3-2.7, the released ``modeling_refocus.py``), in paper symbols:

    sequence  = [frame tokens x_1..x_F, question token, option tokens, <sof>, v_{c_1}, ...]
    h_f       = backbone hidden state at frame f's token (causal: sees frames 1..f only)
    k_f = W_k h_f                     frame key     (query-independent, as in the paper)
    v_f = W_v h_f + b_v               frame value   (fed back after frame f is picked)
    h_t       = backbone state after <sof>, v_{c_1}, ..., v_{c_{t-1}}  (carries the query)
    q_t = W_q h_t                     step query
    s_t(f) = (q_t . k_f) * softplus(w) / tau   [ / sqrt(d) if attention_scaling ]
    s_t(f) = -inf for padded frames and frames already chosen (no replacement)
    p_t = softmax_f(s_t) in fp32;  c_t ~ p_t (argmax when greedy);  x_{t+1} = v_{c_t}

Because the frames precede the question in a causal backbone, the keys cannot see the query;
the query reaches the scores only through the state carried into the selection steps (h_t).
That is the paper's design and the default here. The paper's backbone is a pretrained 1.3B
video LM over language-aligned SigLIP features; a small policy trained from scratch on
EfficientNet features cannot match "the cat" in a question to cat frames that way, so three
config options make the frame keys query-aware (docs/design-choices.md): ``query_first``
(the question and options precede the frames, so each frame's hidden state attends to them),
``novelty`` (a frame's distance to its pool's mean feature) and ``bridge_classes`` (a frame's
text-image relevance to the question and options, refocus_ray/bridge.py).

Two passes share the same code:
  * ``sample``: the rollout, under inference mode, one backbone step per pick carrying the KV
    cache (Transformer) or the recurrent conv/SSM state (Mamba-2) between steps.
  * ``rescore``: the teacher-forced, differentiable pass for the learner. The prompt is run
    once; the selection segment [<sof>, v_{c_1}, ..., v_{c_{k-1}}] is run in parallel from the
    prompt's cache. It returns per-step log-probs of the chosen frames, the full per-step
    log-distributions and their exact entropies. For the same parameters it reproduces the
    sampler's log-probs (the importance ratio of GRPO/PPO starts at exactly 1).

Pools of different sizes share a batch by *left packing*: each row's real tokens (its real
frames, the question, its real options) are packed to the right end of the prompt and the row
is left-padded. The Transformer excludes the padding with a key mask; Mamba-2 zeroes padded
inputs, and with zero initial state a left-padded prefix leaves the state exactly zero, so a
padded row computes exactly what it would alone.

Backbones: ``transformer`` (a small pre-LN causal Transformer written here, with an explicit KV
cache) and ``mamba2`` (transformers' ``Mamba2Model`` on its plain-torch path, stepped through
its ``DynamicCache``). Export is safetensors + JSON, never pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refocus_ray.bridge import BRIDGES
from refocus_ray.config import ConfigError, _one_of, _positive, build

BACKBONES = ("transformer", "mamba2")
FORMAT = "refocus-ray/selector-policy"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "policy.json"


# ----------------------------------------------------------------------------------- config


@dataclass
class PolicyConfig:
    """Architecture of the selector. Validated on construction; errors name ``policy.<field>``."""

    backbone: str = "transformer"  # "transformer" | "mamba2"
    frame_dim: int = 1280  # Df: cached frame features (EfficientNet-Lite0 pooled = 1280)
    text_dim: int = 384  # Dt: question / option embeddings (MiniLM = 384)
    d_model: int = 256
    n_layers: int = 2
    # transformer
    n_heads: int = 4
    mlp_ratio: int = 4
    # mamba2 (num_heads = d_model * expand / head_dim)
    state_size: int = 64
    expand: int = 2
    head_dim: int = 32
    conv_kernel: int = 4
    chunk_size: int = 64
    # temporal position of a frame: sin/cos of t_frac at `time_frequencies` octaves
    time_frequencies: int = 16
    # token order: False = [frames, question, options] (the paper: keys cannot see the query);
    # True = [question, options, frames]: frame keys attend to the query (a from-scratch policy
    # cannot rely on a pretrained backbone to carry the query into the step state)
    query_first: bool = False
    # a label-free saliency input per frame: its cosine distance to the pool's mean feature,
    # standardised within the pool (what the `diverse` baseline exploits, given to the policy)
    novelty: bool = False
    # > 0: frames also get their text-image bridge relevance (refocus_ray/bridge.py) to the
    # question and to the most related option, z-scored within the pool; the bridge's head and
    # class-name embeddings are frozen buffers of this many classes, saved with the weights
    # (set by `set_bridge`). The paper's SigLIP features are language-aligned; EfficientNet's
    # are not, and this restores that.
    bridge_classes: int = 0
    # where the bridge comes from: "imagenet" (EfficientNet's ImageNet head, 1000 classes) or
    # "reference" (the forged reference's frame readings, distilled: one class per object and
    # per footage name); the training-free relevance-diverse baseline uses the same one
    bridge: str = "imagenet"
    # != 0: each frame's score also gets a learnable per-frame prior, w . [relevance to the
    # question, to the best option, novelty] (the bridge and novelty inputs above, z-scored),
    # with every w starting at this value (needs bridge_classes). A from-scratch policy starts
    # uniform, and uniform samples meet partial evidence, which the reference punishes, far
    # more often than complete evidence (docs/benchmarks.md, "Training"); this starts it where
    # the training-free relevance-diverse selector is. GRPO moves w like any other weight.
    prior_weight: float = 0.0
    # != 0: and minus w_div * (max cosine similarity of the frame's feature to the frames
    # already chosen, floored at 0), w_div learnable, starting here: the diversity half of
    # relevance-diverse, so one segment does not take every pick
    diversity_weight: float = 0.0
    # the prior's and the diversity term's weights also depend on the question: w + W q_emb,
    # W starting at 0. Whether a question wants its listed objects covered ("how many of
    # these appear?") or two moments and nothing else ("right after X?") is the question's
    # business; global weights made every `after` selection show every object of the video
    query_weights: bool = False
    # > 0: the four score weights also depend on the pick: w + W q + W_s q for the first this
    # many steps (later steps share the last slot), W_s starting at 0. `after` wants its anchor
    # and the object right after it, then nothing else (another object in view costs its
    # reward most of the way to none, docs/benchmarks.md); one set of weights per question
    # cannot say "objects first, then background"
    step_weights: int = 0
    # the prior also scores each frame by how much more related to the options it is than
    # every frame before it: high on the first frame of the earliest option shown, nowhere
    # else (`_earliest`), weighted like the other prior terms (w + W q per step slot, w
    # starting at prior_weight). "Which appears first?" wants that frame and no other option,
    # while the reference pays for every option in view: without this term 1 of 5 training
    # seeds learned to pick it (docs/benchmarks.md "Training", session 21)
    earliness: bool = False
    # and how much more related to the options a frame is than every frame between the
    # question's anchor and it: high on the first frame of the first option shown after the
    # anchor (`_after_anchor`; the anchor is the frame most related to the question and least
    # to the options, with its segment). "Which object appears right after X?" wants X and
    # that frame and no other option; the term peaks on it in every val and test `after`
    # question, but at its initial weight it adds nothing: the policy learns per question
    # when to use it (docs/benchmarks.md "Training", session 22). Weighted like `earliness`.
    after_anchor: bool = False
    # the score terms' weights (prior, diversity, W) are stored divided by this and used
    # multiplied by it, so the optimizer moves them this many times faster: Adam moves every
    # weight by ~lr per step, and at lr 1.5e-4 a weight of 10 moved by 0.02 in 450 iterations
    score_weight_scale: float = 1.0
    # scoring, as the released code: s = (q.k) * softplus(w) / temperature [/ sqrt(d)]
    temperature: float = 1.0
    logit_scale_init: float = 1.0  # softplus(w) at init
    attention_scaling: bool = False
    # reinit_for_finetune: orthogonal heads with this gain, <sof> ~ N(0, sof_std)
    head_gain: float = 0.1
    sof_std: float = 0.02

    def __post_init__(self) -> None:
        self.check("policy")

    def check(self, key: str = "policy") -> None:
        _one_of(f"{key}.backbone", self.backbone, BACKBONES)
        for name in ("frame_dim", "text_dim", "d_model", "n_layers", "n_heads", "mlp_ratio",
                     "state_size", "expand", "head_dim", "conv_kernel", "chunk_size",
                     "temperature", "logit_scale_init", "head_gain", "score_weight_scale"):
            _positive(f"{key}.{name}", getattr(self, name))
        if self.time_frequencies < 0:
            raise ConfigError(f"{key}.time_frequencies: must be >= 0, got {self.time_frequencies}")
        _one_of(f"{key}.bridge", self.bridge, BRIDGES)
        if self.bridge_classes < 0:
            raise ConfigError(f"{key}.bridge_classes: must be >= 0, got {self.bridge_classes}")
        if self.sof_std < 0:
            raise ConfigError(f"{key}.sof_std: must be >= 0, got {self.sof_std}")
        if self.prior_weight and not self.bridge_classes:
            raise ConfigError(f"{key}.prior_weight: needs {key}.bridge_classes > 0 (the prior "
                              f"scores frames by their bridge relevance)")
        if self.query_weights and not (self.prior_weight and self.diversity_weight):
            raise ConfigError(f"{key}.query_weights: needs {key}.prior_weight and "
                              f"{key}.diversity_weight (the weights it makes depend on the question)")
        if self.step_weights < 0:
            raise ConfigError(f"{key}.step_weights: must be >= 0, got {self.step_weights}")
        for name in ("earliness", "after_anchor"):
            if getattr(self, name) and not self.prior_weight:
                raise ConfigError(f"{key}.{name}: needs {key}.prior_weight (it is a prior term)")
        if self.step_weights and not self.query_weights:
            raise ConfigError(f"{key}.step_weights: needs {key}.query_weights (it refines the "
                              f"per-question weights step by step)")
        if self.backbone == "transformer" and self.d_model % self.n_heads:
            raise ConfigError(f"{key}.n_heads: must divide d_model={self.d_model}, "
                              f"got {self.n_heads}")
        if self.backbone == "mamba2" and (self.d_model * self.expand) % self.head_dim:
            raise ConfigError(f"{key}.head_dim: must divide d_model * expand = "
                              f"{self.d_model * self.expand}, got {self.head_dim}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, key: str = "policy") -> PolicyConfig:
        """Build from a config section (unknown keys and wrong types name the key)."""
        return build(cls, dict(data or {}), key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ batch


@dataclass
class PolicyExample:
    """One (pool, question) pair, unpadded. ``opt_emb`` may be None or have 0 rows."""

    frames: Any  # [F, Df]
    q_emb: Any  # [Dt]
    opt_emb: Any = None  # [O, Dt] or None (open-ended, or options withheld)
    t_frac: Any = None  # [F] frame time / video length; None -> pool index / (F - 1)


def example_from_pool(pool: Any, q_emb: Any, opt_emb: Any = None) -> PolicyExample:
    """An example from a cached pool (``features.PoolFeatures``: frames, features, n_frames):
    t_frac is the original frame number over the video's last frame number."""
    t = np.asarray(pool.frames, np.float32) / max(int(pool.n_frames) - 1, 1)
    return PolicyExample(frames=pool.features, q_emb=q_emb, opt_emb=opt_emb, t_frac=t)


@dataclass
class PolicyBatch:
    """A padded batch of queries. Masks are True on real entries."""

    frames: Tensor  # float [B, F, Df]
    frame_mask: Tensor  # bool [B, F]
    t_frac: Tensor | None  # float [B, F] or None
    q_emb: Tensor  # float [B, Dt]
    opt_emb: Tensor  # float [B, O, Dt] (O may be 0)
    opt_mask: Tensor  # bool [B, O]

    def __len__(self) -> int:
        return self.frames.shape[0]

    def to(self, device: torch.device | str) -> PolicyBatch:
        return PolicyBatch(**{f.name: None if (v := getattr(self, f.name)) is None
                              else v.to(device) for f in fields(self)})

    def index(self, rows: Tensor | Sequence[int]) -> PolicyBatch:
        """Rows `rows` (e.g. ``repeat_interleave`` indices to make a GRPO group per query)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return PolicyBatch(**{f.name: None if (v := getattr(self, f.name)) is None
                              else v[rows] for f in fields(self)})

    def without_options(self) -> PolicyBatch:
        """The same queries with every option hidden (opt_mask all False)."""
        return PolicyBatch(self.frames, self.frame_mask, self.t_frac, self.q_emb, self.opt_emb,
                           torch.zeros_like(self.opt_mask))


def _field(ex: Any, name: str) -> Any:
    return ex.get(name) if isinstance(ex, Mapping) else getattr(ex, name, None)


def collate(examples: Sequence[PolicyExample | Mapping[str, Any]]) -> PolicyBatch:
    """Pad examples (PolicyExample or mappings with the same keys) to a PolicyBatch.

    Pools (F) and option lists (O) may differ in length; t_frac is kept only if every example
    has one (otherwise the policy derives it from the pool index)."""
    if not examples:
        raise ValueError("collate: no examples")
    frames = [torch.as_tensor(np.asarray(_field(e, "frames")), dtype=torch.float32)
              for e in examples]
    q = [torch.as_tensor(np.asarray(_field(e, "q_emb")), dtype=torch.float32).reshape(-1)
         for e in examples]
    dt = q[0].shape[0]
    opts = []
    for e in examples:
        o = _field(e, "opt_emb")
        o = torch.zeros(0, dt) if o is None else torch.as_tensor(np.asarray(o), dtype=torch.float32)
        opts.append(o.reshape(-1, dt))
    ts = [_field(e, "t_frac") for e in examples]
    B, Fm, Om = len(examples), max(f.shape[0] for f in frames), max(o.shape[0] for o in opts)
    for i, f in enumerate(frames):
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"collate: example {i} has frames of shape {tuple(f.shape)}; "
                             "expected [F >= 1, Df]")
    out = PolicyBatch(
        frames=torch.zeros(B, Fm, frames[0].shape[1]),
        frame_mask=torch.zeros(B, Fm, dtype=torch.bool),
        t_frac=torch.zeros(B, Fm) if all(t is not None for t in ts) else None,
        q_emb=torch.stack(q),
        opt_emb=torch.zeros(B, Om, dt),
        opt_mask=torch.zeros(B, Om, dtype=torch.bool),
    )
    for i, (f, o) in enumerate(zip(frames, opts)):
        out.frames[i, : len(f)] = f
        out.frame_mask[i, : len(f)] = True
        out.opt_emb[i, : len(o)] = o
        out.opt_mask[i, : len(o)] = True
        if out.t_frac is not None:
            out.t_frac[i, : len(f)] = torch.as_tensor(np.asarray(ts[i]), dtype=torch.float32)
    return out


# -------------------------------------------------------------------------------- backbones


@dataclass
class _TState:
    """Transformer KV cache: per layer (K, V) [B, H, T, hd] and which positions are real."""

    kv: list[tuple[Tensor, Tensor]]
    valid: Tensor  # bool [B, T]


class _Block(nn.Module):
    """Pre-LN causal Transformer block (nanoGPT), attending over cached K/V."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(),
                                 nn.Linear(mlp_ratio * d, d))

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None,
                allowed: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, d = x.shape
        q, k, v = (z.view(B, T, self.n_heads, -1).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=-1))
        if past is not None:  # functional concat (not in-place) so rescore stays differentiable
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x)), (k, v)


class TransformerBackbone(nn.Module):
    """Small causal Transformer with an explicit KV cache.

    No positional embedding: frames carry their time (t_frac) and token types are embedded by
    the policy; causal masking orders the rest. Padded positions are never attended to; a
    padded position attends to itself only, so no softmax row is empty (its output is unused).
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def _run(self, x: Tensor, valid: Tensor, past: list | None) -> tuple[Tensor, _TState]:
        Tq, Tk = x.shape[1], valid.shape[1]
        qpos = torch.arange(Tk - Tq, Tk, device=x.device)[:, None]
        kpos = torch.arange(Tk, device=x.device)[None, :]
        allowed = ((kpos <= qpos) & valid[:, None, None, :]) | (kpos == qpos)  # [B, 1, Tq, Tk]
        kv = []
        for i, blk in enumerate(self.blocks):
            x, layer_kv = blk(x, None if past is None else past[i], allowed)
            kv.append(layer_kv)
        return self.ln_f(x), _TState(kv, valid)

    def prefill(self, x: Tensor, valid: Tensor) -> tuple[Tensor, _TState]:
        return self._run(x, valid, None)

    def extend(self, x: Tensor, state: _TState) -> tuple[Tensor, _TState]:
        """Continue after `state` with tokens x [B, T', d] (all real)."""
        ones = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        return self._run(x, torch.cat([state.valid, ones], 1), state.kv)

    @staticmethod
    def select_rows(state: _TState, rows: Tensor) -> _TState:
        """The cache of rows `rows` (differentiable; used to share a prompt across a group)."""
        return _TState([(k[rows], v[rows]) for k, v in state.kv], state.valid[rows])


class Mamba2Backbone(nn.Module):
    """transformers' Mamba2Model fed with ``inputs_embeds`` (its token embedding is unused).

    On CPU without mamba_ssm / causal_conv1d it runs the plain-torch chunked scan for
    multi-token inputs and the recurrent update for single tokens; its DynamicCache holds the
    conv and SSM states and is updated in place by every call that receives it.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        from transformers import Mamba2Config, Mamba2Model

        self.config = Mamba2Config(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=cfg.state_size,
            expand=cfg.expand, head_dim=cfg.head_dim,
            num_heads=cfg.d_model * cfg.expand // cfg.head_dim, n_groups=1,
            conv_kernel=cfg.conv_kernel, chunk_size=cfg.chunk_size, vocab_size=1,
            pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=True,
        )
        self.model = Mamba2Model(self.config)
        self.model.embeddings = None  # inputs_embeds only: no unused (grad-less) parameters

    def prefill(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Any]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        out = self.model(inputs_embeds=x, attention_mask=valid.long(), cache_params=cache,
                         use_cache=True)
        return out.last_hidden_state, out.cache_params

    def extend(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Continue after `state` with tokens x [B, T', d] (all real). Mutates `state`."""
        out = self.model(inputs_embeds=x, cache_params=state, use_cache=True)
        return out.last_hidden_state, out.cache_params

    @staticmethod
    def select_rows(state: Any, rows: Tensor) -> Any:
        """The cache of rows `rows` (index_select per layer, differentiable). Mutates `state`."""
        state.reorder_cache(rows)
        return state


# ----------------------------------------------------------------------------------- policy


@dataclass
class SampleOut:
    chosen: Tensor  # long [B, k] pool indices, in pick order
    logp: Tensor  # float [B, k] log-prob of each pick under the sampler
    probs: Tensor  # float [B, F] mean selection probability over the k steps


@dataclass
class RescoreOut:
    logp: Tensor  # float [B, k] log pi(c_t | c_<t, video, query)
    log_dist: Tensor  # float [B, k, F] per-step log-distributions (-inf where masked)
    entropy: Tensor  # float [B, k] exact per-step entropy -sum_f p log p


@dataclass
class _Prompt:
    h_frames: Tensor  # [B, F, d] hidden state at each frame's token
    state: Any  # backbone cache after the prompt
    seq: Tensor  # [B, P, d] the packed prompt (for the no-cache path)
    valid: Tensor  # bool [B, P]
    bias: Tensor | None  # [B, S, F] the per-frame score prior (policy.prior_weight) per step slot
    div: Tensor | None  # [B, S] the diversity weight (policy.diversity_weight) per step slot

    def slot(self, t: Tensor | int) -> Tensor | int:
        """Step t's weight slot (policy.step_weights; S = 1 without: every step shares it)."""
        w = self.bias if self.bias is not None else self.div
        s = 1 if w is None else w.shape[1]
        return t.clamp(max=s - 1) if isinstance(t, Tensor) else min(t, s - 1)


def _pool_zscore(x: Tensor, m: Tensor) -> Tensor:
    """x [B, F, C] standardised over each pool's real frames (m [B, F, 1]); padding -> 0."""
    n = m.sum(1, keepdim=True).clamp(min=1)
    mu = (x * m).sum(1, keepdim=True) / n
    sd = (((x - mu) * m) ** 2).sum(1, keepdim=True).div(n).sqrt()
    return (x - mu) / (sd + 1e-6) * m


class SelectorPolicy(nn.Module):
    """The ReFoCUS pointer selector. See the module docstring for the math."""

    def __init__(self, cfg: PolicyConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PolicyConfig()
        d = cfg.d_model
        # token embeddings: frames (+ time), question, options
        self.frame_in = nn.Sequential(nn.LayerNorm(cfg.frame_dim), nn.Linear(cfg.frame_dim, d))
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.time_in = nn.Linear(2 * cfg.time_frequencies, d) if cfg.time_frequencies else None
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # 0 frame, 1 question, 2 option
        self.novelty_in = nn.Linear(1, d) if cfg.novelty else None
        self.bridge_in = None
        if cfg.bridge_classes:
            c = cfg.bridge_classes
            self.register_buffer("bridge_weight", torch.zeros(c, cfg.frame_dim))
            self.register_buffer("bridge_bias", torch.zeros(c))
            self.register_buffer("bridge_class_emb", torch.zeros(c, cfg.text_dim))
            self.bridge_in = nn.Linear(2, d)
        # learnable score terms (0 = absent: checkpoints without them load unchanged)
        c = cfg.score_weight_scale
        self.prior_w = (nn.Parameter(torch.full((3,), float(cfg.prior_weight) / c))
                        if cfg.prior_weight else None)
        self.div_w = (nn.Parameter(torch.tensor(float(cfg.diversity_weight) / c))
                      if cfg.diversity_weight else None)
        self.backbone = (TransformerBackbone(cfg) if cfg.backbone == "transformer"
                         else Mamba2Backbone(cfg))
        # pointer heads, reinit_for_finetune
        self.key_head = nn.Linear(d, d, bias=False)  # W_k
        self.query_head = nn.Linear(d, d, bias=False)  # W_q
        self.value_head = nn.Linear(d, d, bias=True)  # W_v, b_v
        for head in (self.key_head, self.query_head, self.value_head):
            nn.init.orthogonal_(head.weight, gain=cfg.head_gain)
        nn.init.zeros_(self.value_head.bias)
        self.sof = nn.Parameter(torch.randn(d) * cfg.sof_std)  # <sof>
        # w with softplus(w) = logit_scale_init (inverse softplus)
        w0 = cfg.logit_scale_init + math.log(-math.expm1(-cfg.logit_scale_init))
        self.logit_scale = nn.Parameter(torch.tensor(float(w0)))
        # W for policy.query_weights, made last so every other weight starts as without it
        self.weights_q = nn.Linear(cfg.text_dim, 4) if cfg.query_weights else None
        if self.weights_q is not None:
            nn.init.zeros_(self.weights_q.weight)
            nn.init.zeros_(self.weights_q.bias)
        # W_s for policy.step_weights, after W for the same reason
        self.weights_step = (nn.Linear(cfg.text_dim, 4 * cfg.step_weights)
                             if cfg.step_weights else None)
        if self.weights_step is not None:
            nn.init.zeros_(self.weights_step.weight)
            nn.init.zeros_(self.weights_step.bias)
        # policy.earliness, after_anchor: a weight w (+ W q per step slot) each, made after
        # the rest, in this order
        self.earliest_w, self.weights_earliest = self._term_weights(cfg, cfg.earliness)
        self.after_w, self.weights_after = self._term_weights(cfg, cfg.after_anchor)

    @staticmethod
    def _term_weights(cfg: PolicyConfig, on: bool) -> tuple[nn.Parameter | None,
                                                             nn.Linear | None]:
        """A prior term's w (starting at prior_weight, stored / score_weight_scale) and its
        W q per step slot (starting at 0; only with query_weights); (None, None) when off."""
        if not on:
            return None, None
        w = nn.Parameter(torch.tensor(float(cfg.prior_weight) / cfg.score_weight_scale))
        W = nn.Linear(cfg.text_dim, max(cfg.step_weights, 1)) if cfg.query_weights else None
        if W is not None:
            nn.init.zeros_(W.weight)
            nn.init.zeros_(W.bias)
        return w, W

    # -- prompt ----------------------------------------------------------------------------

    def _time_features(self, batch: PolicyBatch) -> Tensor:
        t = batch.t_frac
        if t is None:  # pool indices are uniform over the video (linspace): index / (F_b - 1)
            n = batch.frame_mask.sum(1, keepdim=True).clamp(min=2) - 1
            t = torch.arange(batch.frames.shape[1], device=n.device)[None] / n
        t = t.to(self.sof.dtype).clamp(0, 1)
        freqs = math.pi * 2.0 ** torch.arange(self.cfg.time_frequencies, device=t.device)
        ang = t[..., None] * freqs
        return torch.cat([ang.sin(), ang.cos()], -1)

    @staticmethod
    def _novelty(batch: PolicyBatch) -> Tensor:
        """[B, F, 1]: 1 - cos(x_f, mean of the pool's real frames), z-scored within the pool."""
        m = batch.frame_mask[..., None].to(batch.frames.dtype)
        x = F.normalize(batch.frames, dim=-1)
        mean = F.normalize((x * m).sum(1, keepdim=True), dim=-1)
        return _pool_zscore(1.0 - (x * mean).sum(-1, keepdim=True), m)

    def set_bridge(self, weight: Any, bias: Any, class_emb: Any) -> None:
        """Load the frozen bridge (``bridge.TextImageBridge.tensors()``)."""
        if self.bridge_in is None:
            raise ValueError("set_bridge: policy.bridge_classes is 0")
        for name, v in (("bridge_weight", weight), ("bridge_bias", bias),
                        ("bridge_class_emb", class_emb)):
            buf = getattr(self, name)
            v = torch.as_tensor(np.asarray(v), dtype=buf.dtype)
            if v.shape != buf.shape:
                raise ValueError(f"set_bridge: {name} has shape {tuple(v.shape)}, the policy "
                                 f"expects {tuple(buf.shape)} (policy.bridge_classes, "
                                 "frame_dim, text_dim)")
            buf.copy_(v)

    def _bridge(self, batch: PolicyBatch) -> Tensor:
        """[B, F, 2]: relevance of each frame to the question and to its most related option
        (0 without options), each z-scored within the pool (see refocus_ray/bridge.py)."""
        if not bool(self.bridge_weight.any()):
            raise ValueError("policy.bridge_classes > 0 but the bridge was never set: call "
                             "set_bridge(**bridge.bridge_tensors(cfg)) (training does) or load "
                             "a saved policy")
        p = torch.softmax(batch.frames.float() @ self.bridge_weight.T + self.bridge_bias, -1)
        e = F.normalize(self.bridge_class_emb, dim=-1)
        texts = torch.cat([batch.q_emb[:, None], batch.opt_emb], 1).float()  # [B, 1+O, Dt]
        sim = torch.einsum("cd,btd->btc", e, F.normalize(texts, dim=-1))
        sim = sim - sim.mean(-1, keepdim=True)  # centred over classes
        rel = torch.einsum("bfc,btc->bft", p, sim)  # [B, F, 1+O]
        if batch.opt_mask.shape[1]:
            rel_o = rel[..., 1:].masked_fill(~batch.opt_mask[:, None, :], float("-inf")).amax(-1)
            rel_o = torch.where(torch.isfinite(rel_o), rel_o, torch.zeros_like(rel_o))
        else:  # no row of the batch has options
            rel_o = torch.zeros_like(rel[..., 0])
        return _pool_zscore(torch.stack([rel[..., 0], rel_o], -1),
                            batch.frame_mask[..., None].float())

    @staticmethod
    def _rise(rel: Tensor, m: Tensor) -> Tensor:
        """[B, F]: rel minus the highest (positive) rel of any earlier frame in m; -inf
        outside m. `rel` is z-scored, so background sits near 0: the first frame of the first
        relevant segment keeps its full relevance, later frames of it or of later relevant
        segments ~0 or less, background before it ~0, after it below."""
        r = rel.masked_fill(~m, float("-inf"))
        before = torch.cummax(r, 1).values
        before = torch.cat([torch.full_like(before[:, :1], float("-inf")), before[:, :-1]], 1)
        return r - torch.relu(before)  # relu(-inf) = 0: nothing before the first frame

    @classmethod
    def _earliest(cls, rel: Tensor, m: Tensor) -> Tensor:
        """[B, F]: `_rise` over the pool (rel [B, F]: relevance to the best option), z-scored:
        high on the first frame of the earliest listed object shown."""
        e = torch.where(m, cls._rise(rel, m), torch.zeros_like(rel))
        return _pool_zscore(e[..., None], m[..., None].float())[..., 0]

    @classmethod
    def _after_anchor(cls, rel: Tensor, m: Tensor) -> Tensor:
        """[B, F]: `_rise` of the relevance to the options from the end of the question's
        anchor segment on, z-scored: high on the first frame of the first listed object after
        it. rel [B, F, 2] is the bridge's (question, best option) relevance. The anchor peak
        is the frame most related to the question minus the options (X is in the question,
        not among the options); its segment runs on while that stays above half the peak.
        Frames up to its end score as low as the lowest frame after it."""
        a = (rel[..., 0] - rel[..., 1]).masked_fill(~m, float("-inf"))
        peak = a.argmax(1, keepdim=True)  # [B, 1]
        idx = torch.arange(a.shape[1], device=a.device)[None]
        ends = (idx > peak) & ~(a > 0.5 * a.gather(1, peak))  # the first such frame ends it
        after = m & (idx >= torch.where(ends, idx, a.shape[1]).amin(1, keepdim=True))
        e = cls._rise(rel[..., 1], after)
        low = e.masked_fill(~after, float("inf")).amin(1, keepdim=True)  # inf: none after
        e = torch.where(after, e, torch.where(torch.isfinite(low), low, 0.0))  # finite
        return _pool_zscore(e[..., None], m[..., None].float())[..., 0]

    def _unit_frames(self, batch: PolicyBatch, group: int) -> Tensor | None:
        """[B * group, F, D] unit-norm frame features for the diversity term, or None."""
        if self.div_w is None:
            return None
        return F.normalize(batch.frames.float(), dim=-1).repeat_interleave(group, 0)

    def _prompt(self, batch: PolicyBatch, group: int = 1) -> _Prompt:
        """Embed and left-pack [real frames, question, real options]; run the backbone once
        per query, then repeat each row's results `group` times (a GRPO group shares its
        prompt: the prompt is most of the compute)."""
        dtype = self.sof.dtype
        x_f = self.frame_in(batch.frames.to(dtype)) + self.type_emb[0]
        if self.time_in is not None:
            x_f = x_f + self.time_in(self._time_features(batch))
        # computed once: frame inputs and the score prior share them
        use_nov = self.novelty_in is not None or self.prior_w is not None
        nov = self._novelty(batch) if use_nov else None
        rel = self._bridge(batch) if self.bridge_in is not None else None
        if self.novelty_in is not None:
            x_f = x_f + self.novelty_in(nov.to(dtype))
        if self.bridge_in is not None:
            x_f = x_f + self.bridge_in(rel.to(dtype))
        # score terms: bias = w . [relevance to question, to best option, novelty], and w_div
        c = self.cfg.score_weight_scale
        w_prior = None if self.prior_w is None else self.prior_w * c
        w_div = None if self.div_w is None else self.div_w * c
        B = len(batch.frame_mask)
        if self.weights_q is not None:  # w + W q, per query; + W_s q per step slot
            q = batch.q_emb.float()
            w = (torch.cat([w_prior, w_div[None]]) + c * self.weights_q(q))[:, None]  # [B,1,4]
            if self.weights_step is not None:
                w = w + c * self.weights_step(q).view(B, self.cfg.step_weights, 4)
            w_prior, w_div = w[..., :3], w[..., 3]
        else:  # global weights: one slot shared by every query and step
            w_prior = None if w_prior is None else w_prior.expand(B, 1, 3)
            w_div = None if w_div is None else w_div.expand(B, 1)
        bias = None if w_prior is None else torch.einsum(  # [B, S, F]
            "bfj,bsj->bsf", torch.cat([rel, nov.float()], -1), w_prior)
        terms = []  # + w . (earliest relevance to the options [after the anchor])
        if self.earliest_w is not None:
            terms.append((self.earliest_w, self.weights_earliest,
                          self._earliest(rel[..., 1], batch.frame_mask)))
        if self.after_w is not None:
            terms.append((self.after_w, self.weights_after,
                          self._after_anchor(rel, batch.frame_mask)))
        for w, W, x in terms:
            w = w.expand(B, 1) if W is None else w + W(batch.q_emb.float())  # [B, S]
            bias = bias + x[:, None] * (c * w)[..., None]
        div = w_div  # [B, S]
        x_q = self.text_in(batch.q_emb.to(dtype))[:, None] + self.type_emb[1]
        x_o = self.text_in(batch.opt_emb.to(dtype)) + self.type_emb[2]
        Fp = batch.frame_mask.shape[1]
        q_real = torch.ones(B, 1, dtype=torch.bool, device=x_f.device)
        if self.cfg.query_first:
            tokens = torch.cat([x_q, x_o, x_f], 1)
            real = torch.cat([q_real, batch.opt_mask, batch.frame_mask], 1)
            f0 = 1 + batch.opt_mask.shape[1]  # where the frames start
        else:
            tokens = torch.cat([x_f, x_q, x_o], 1)
            real = torch.cat([batch.frame_mask, q_real, batch.opt_mask], 1)
            f0 = 0
        n = real.sum(1)  # real tokens per row
        P = int(n.max())
        # destination of each real token: packed to the right end, in original order
        dest = (P - n)[:, None] + real.long().cumsum(1) - 1
        rows = torch.arange(B, device=tokens.device)[:, None].expand_as(dest)
        seq = tokens.new_zeros(B, P, tokens.shape[-1])
        seq = seq.index_put((rows[real], dest[real]), tokens[real])
        valid = torch.zeros(B, P, dtype=torch.bool, device=tokens.device)
        valid[rows[real], dest[real]] = True
        h, state = self.backbone.prefill(seq, valid)
        # padded frames: any index, masked later
        frame_pos = dest[:, f0 : f0 + Fp].clamp(min=0, max=P - 1)
        h_frames = h.gather(1, frame_pos[..., None].expand(-1, -1, h.shape[-1]))
        if group > 1:
            r = torch.arange(B, device=h.device).repeat_interleave(group)
            return _Prompt(h_frames[r], self.backbone.select_rows(state, r), seq[r], valid[r],
                           None if bias is None else bias[r], None if div is None else div[r])
        return _Prompt(h_frames, state, seq, valid, bias, div)

    def _scores(self, h_t: Tensor, keys: Tensor) -> Tensor:
        """s_t(f) = (q_t . k_f) * softplus(w) / tau [/ sqrt(d)]; h_t [B, T, d] -> [B, T, F]."""
        q = self.query_head(h_t)  # q_t = W_q h_t
        s = torch.einsum("btd,bfd->btf", q, keys) * F.softplus(self.logit_scale)
        s = s / self.cfg.temperature
        if self.cfg.attention_scaling:
            s = s / math.sqrt(keys.shape[-1])
        return s.float()  # the softmax is taken in fp32

    @staticmethod
    def _check_k(batch: PolicyBatch, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        sizes = batch.frame_mask.sum(1)
        bad = (sizes < k).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise ValueError(f"k={k} is larger than the pool ({int(sizes[row])} frames) "
                             f"of row {row}")

    # -- rollout ---------------------------------------------------------------------------

    def sample(self, batch: PolicyBatch, k: int, greedy: bool = False,
               generator: torch.Generator | None = None, use_cache: bool = True,
               group: int = 1) -> SampleOut:
        """Pick k distinct frames per row, one backbone step per pick, under inference mode.

        ``use_cache=False`` re-runs the whole sequence at every step instead of carrying the
        cache; it exists for the benchmark (bench/policy_cache.py) and gives the same result.
        Sampling uses the Gumbel-max trick (exact for softmax, never picks a -inf entry).
        Outputs are cloned out of inference mode so callers can use them with autograd.

        ``group=N`` draws N rollouts per query from one prompt pass: output row ``i * N + j`` is
        rollout j of query i (the order of ``batch.index(arange(B).repeat_interleave(N))``).
        """
        self._check_k(batch, k)
        _positive("group", group)
        with torch.inference_mode():
            out = self._sample(batch, k, greedy, generator, use_cache, group)
        return SampleOut(out.chosen.clone(), out.logp.clone(), out.probs.clone())

    def _sample(self, batch: PolicyBatch, k: int, greedy: bool,
                generator: torch.Generator | None, use_cache: bool, group: int) -> SampleOut:
        pr = self._prompt(batch, group)
        keys, values = self.key_head(pr.h_frames), self.value_head(pr.h_frames)  # k_f, v_f
        frame_mask = batch.frame_mask.repeat_interleave(group, 0).to(keys.device)
        B, Fp = frame_mask.shape
        rows = torch.arange(B, device=keys.device)
        blocked = ~frame_mask
        x = self.sof.expand(B, 1, -1)  # x_1 = <sof>
        state, seq, valid = pr.state, pr.seq, pr.valid
        bias, unit = pr.bias, self._unit_frames(batch, group)
        near = torch.zeros(B, Fp, device=keys.device)  # max cos to the frames chosen so far
        chosen = torch.empty(B, k, dtype=torch.long, device=keys.device)
        logps = torch.empty(B, k, device=keys.device)
        psum = torch.zeros(B, Fp, device=keys.device)
        for t in range(k):
            if use_cache:
                h, state = self.backbone.extend(x, state)  # h_t from the carried state
            else:
                seq = torch.cat([seq, x], 1)
                valid = torch.cat([valid, valid.new_ones(B, 1)], 1)
                h, _ = self.backbone.prefill(seq, valid)
            logit = self._scores(h[:, -1:], keys)[:, 0]
            if bias is not None:
                logit = logit + bias[:, pr.slot(t)]
            if unit is not None:
                logit = logit - pr.div[:, pr.slot(t), None] * near
            logp = torch.log_softmax(logit.masked_fill(blocked, float("-inf")), -1)
            if greedy:
                c = logp.argmax(-1)
            else:
                u = torch.rand(logp.shape, generator=generator, device=logp.device)
                gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
                c = (logp + gumbel).argmax(-1)
            chosen[:, t], logps[:, t] = c, logp[rows, c]
            psum += logp.exp()
            blocked[rows, c] = True
            if unit is not None:
                near = torch.maximum(near, (unit * unit[rows, c][:, None]).sum(-1))
            x = values[rows, c][:, None]  # x_{t+1} = v_{c_t}
        return SampleOut(chosen, logps, psum / k)

    # -- teacher-forced pass ---------------------------------------------------------------

    def rescore(self, batch: PolicyBatch, chosen: Tensor, group: int = 1) -> RescoreOut:
        """Re-score picks `chosen` [B * group, k] in one parallel pass (differentiable).

        The prompt runs once per query; the selection segment [<sof>, v_{c_1}, ...,
        v_{c_{k-1}}] runs in parallel from its cache. ``group`` as in ``sample``.
        """
        _positive("group", group)
        chosen = chosen.to(torch.long)
        B, k = chosen.shape
        self._check_k(batch, k)
        frame_mask = batch.frame_mask.repeat_interleave(group, 0).to(chosen.device)
        if B != frame_mask.shape[0]:
            raise ValueError(f"rescore: chosen has {B} rows; the batch has {len(batch)} queries "
                             f"x group {group}")
        in_range = (chosen >= 0) & (chosen < frame_mask.shape[1])
        real = frame_mask.gather(1, chosen.clamp(0, frame_mask.shape[1] - 1))
        if not bool((in_range & real).all()):
            raise ValueError("rescore: chosen contains padded or out-of-range frame indices")
        pr = self._prompt(batch, group)
        keys, values = self.key_head(pr.h_frames), self.value_head(pr.h_frames)
        rows = torch.arange(B, device=keys.device)[:, None]
        x = torch.cat([self.sof.expand(B, 1, -1), values[rows, chosen[:, :-1]]], 1)
        h, _ = self.backbone.extend(x, pr.state)  # h_1..h_k in parallel
        logit = self._scores(h, keys)  # [B, k, F]
        slots = pr.slot(torch.arange(k, device=keys.device))
        if pr.bias is not None:
            logit = logit + pr.bias[:, slots]
        if (unit := self._unit_frames(batch, group)) is not None:
            sims = torch.einsum("bkd,bfd->bkf", unit[rows, chosen], unit).clamp(min=0)
            near = torch.cummax(sims, 1).values  # step t sees the picks before t
            near = torch.cat([torch.zeros_like(near[:, :1]), near[:, :-1]], 1)
            logit = logit - pr.div[:, slots, None] * near
        onehot = torch.zeros(B, k, frame_mask.shape[1], device=logit.device)
        onehot.scatter_(2, chosen[..., None], 1.0)
        before = (onehot.cumsum(1) - onehot) > 0  # picked at an earlier step
        if bool((before.gather(2, chosen[..., None])).any()):
            raise ValueError("rescore: chosen repeats a frame within a row")
        blocked = before | ~frame_mask[:, None, :]
        log_dist = torch.log_softmax(logit.masked_fill(blocked, float("-inf")), -1)
        logp = log_dist.gather(2, chosen[..., None])[..., 0]
        # exact entropy; where() keeps 0 * -inf (and its gradient) out of masked entries
        p = torch.where(blocked, 0.0, log_dist.exp())
        entropy = -(p * torch.where(blocked, 0.0, log_dist)).sum(-1)
        return RescoreOut(logp, log_dist, entropy)


# ----------------------------------------------------------------------------- convenience


def select_frames(policy: SelectorPolicy, batch_row: PolicyBatch | PolicyExample | Mapping,
                  k: int, mode: str = "sample", seed: int | None = None) -> list[int]:
    """K pool indices for one query, sorted chronologically, as the released export does.

    ``sample`` is the released default: one temperature-1 rollout (its first K picks; a K-step
    rollout has the same law as the first K picks of a longer one). ``greedy`` takes the argmax
    at each step.
    """
    _one_of("mode", mode, ("sample", "greedy"))
    batch = batch_row if isinstance(batch_row, PolicyBatch) else collate([batch_row])
    if len(batch) != 1:
        raise ValueError(f"select_frames takes one query, got a batch of {len(batch)}")
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    out = policy.sample(batch, k, greedy=mode == "greedy", generator=gen)
    return sorted(int(i) for i in out.chosen[0])


# ---------------------------------------------------------------------------------- export


def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose header lists its keys sorted.

    safetensors writes ``__metadata__`` in hash-map order, which changes from call to
    call: identical weights gave different files, and so a different checkpoint sha256 in
    eval.json. Sorting the header's keys keeps its length (same compact JSON, ASCII names), so
    the data offsets stand.
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), separators=(",", ":"), sort_keys=True)
    if len(header) > n:  # never for ASCII names; keep safetensors' own bytes then
        return blob
    return blob[:8] + header.encode().ljust(n, b" ") + blob[8 + n :]


def save(policy: SelectorPolicy, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``policy.json`` (config + format version) to directory;
    the same weights always give the same bytes."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in policy.state_dict().items()}
    blob = _safetensors_bytes(tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (d / WEIGHTS_FILE).write_bytes(blob)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": policy.cfg.to_dict()}
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load(directory: str | Path, device: str | torch.device = "cpu") -> SelectorPolicy:
    """Read a saved policy with safetensors and JSON only (no pickle, no torch.load)."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing; a saved policy has {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}")
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d / CONFIG_FILE}: format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; this build reads {FORMAT!r} "
                         f"version {FORMAT_VERSION}")
    policy = SelectorPolicy(PolicyConfig.from_dict(meta.get("config")))
    policy.load_state_dict(load_file(str(d / WEIGHTS_FILE), device=str(device)), strict=True)
    return policy.to(device)
