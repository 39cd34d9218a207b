"""The ReFoCUS selector policy: sampling, teacher-forced re-scoring, padding, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refocus_ray.config import ConfigError
from refocus_ray.policy import (
    PolicyBatch,
    PolicyConfig,
    PolicyExample,
    SelectorPolicy,
    collate,
    load,
    save,
    select_frames,
)

BACKBONES = ["transformer", "mamba2"]
DF, DT = 24, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(backbone: str, **kw) -> PolicyConfig:
    return PolicyConfig(backbone=backbone, frame_dim=DF, text_dim=DT, d_model=32, n_layers=2,
                        n_heads=4, state_size=8, head_dim=8, chunk_size=16, **kw)


# the query-aware frame inputs (policy.query_first, novelty, bridge_classes) must keep every
# property below: rescore equals the sampler, padding changes nothing, export round-trips
VARIANTS = {"transformer": ("transformer", {}), "mamba2": ("mamba2", {}),
            "transformer-query-aware": ("transformer", {"query_first": True, "novelty": True,
                                                        "bridge_classes": 10}),
            "transformer-prior": ("transformer", {"bridge_classes": 10, "prior_weight": 1.0,
                                                  "diversity_weight": 2.0}),
            "transformer-query-weights": ("transformer", {"bridge_classes": 10,
                                                          "prior_weight": 1.0,
                                                          "diversity_weight": 2.0,
                                                          "query_weights": True}),
            "transformer-step-weights": ("transformer", {"bridge_classes": 10,
                                                         "prior_weight": 1.0,
                                                         "diversity_weight": 2.0,
                                                         "query_weights": True,
                                                         "step_weights": 2}),
            "transformer-earliness": ("transformer", {"bridge_classes": 10, "prior_weight": 1.0,
                                                      "diversity_weight": 2.0,
                                                      "query_weights": True, "step_weights": 2,
                                                      "earliness": True}),
            "transformer-after-anchor": ("transformer", {"bridge_classes": 10,
                                                         "prior_weight": 1.0,
                                                         "diversity_weight": 2.0,
                                                         "query_weights": True,
                                                         "step_weights": 2, "earliness": True,
                                                         "after_anchor": True})}


@pytest.fixture(scope="module", params=list(VARIANTS))
def policy(request) -> SelectorPolicy:
    torch.manual_seed(0)
    backbone, kw = VARIANTS[request.param]
    p = SelectorPolicy(small_config(backbone, **kw))
    if kw.get("bridge_classes"):
        g = torch.Generator().manual_seed(4)
        p.set_bridge(torch.randn(10, DF, generator=g), torch.randn(10, generator=g),
                     torch.randn(10, DT, generator=g))
    if kw.get("query_weights"):  # as if trained: the weights differ from query to query
        torch.nn.init.normal_(p.weights_q.weight, std=0.5)
    if kw.get("step_weights"):  # and from step to step
        torch.nn.init.normal_(p.weights_step.weight, std=0.5)
    if kw.get("earliness"):
        torch.nn.init.normal_(p.weights_earliest.weight, std=0.5)
    if kw.get("after_anchor"):
        torch.nn.init.normal_(p.weights_after.weight, std=0.5)
    return p


def make_batch(sizes: list[tuple[int, int]], seed: int = 0, t_frac: bool = True) -> PolicyBatch:
    """Pools of F frames and O options per row ((F, O) pairs; O = 0 means no options)."""
    g = torch.Generator().manual_seed(seed)
    exs = [PolicyExample(frames=torch.randn(f, DF, generator=g),
                         q_emb=torch.randn(DT, generator=g),
                         opt_emb=torch.randn(o, DT, generator=g) if o else None,
                         t_frac=torch.rand(f, generator=g).sort().values if t_frac else None)
           for f, o in sizes]
    return collate(exs)


def fill_padding(batch: PolicyBatch, seed: int = 1) -> PolicyBatch:
    """Put large garbage where the masks say padding: it must not change anything."""
    g = torch.Generator().manual_seed(seed)
    frames = batch.frames.clone()
    frames[~batch.frame_mask] = 100 * torch.randn(int((~batch.frame_mask).sum()), DF, generator=g)
    opts = batch.opt_emb.clone()
    opts[~batch.opt_mask] = 100 * torch.randn(int((~batch.opt_mask).sum()), DT, generator=g)
    return PolicyBatch(frames, batch.frame_mask, batch.t_frac, batch.q_emb, opts, batch.opt_mask)


def test_collate_pads_frames_and_options():
    b = make_batch([(5, 3), (9, 0), (7, 4)])
    assert b.frames.shape == (3, 9, DF) and b.opt_emb.shape == (3, 4, DT)
    assert b.frame_mask.sum(1).tolist() == [5, 9, 7]
    assert b.opt_mask.sum(1).tolist() == [3, 0, 4]
    assert not b.frames[0, 5:].any() and b.t_frac is not None
    assert make_batch([(5, 0)], t_frac=False).t_frac is None


def test_picks_never_repeat_and_never_hit_padding(policy):
    sizes = [(6, 4), (31, 0), (12, 2), (9, 5), (20, 3)]
    batch = fill_padding(make_batch(sizes)).index(torch.arange(5).repeat_interleave(40))
    g = torch.Generator().manual_seed(3)
    for k in (1, 6):
        out = policy.sample(batch, k, generator=g)
        assert out.chosen.shape == (200, k)
        assert batch.frame_mask.gather(1, out.chosen).all()  # only real frames
        for row in out.chosen.tolist():
            assert len(set(row)) == k  # no repeats
        assert torch.allclose(out.probs.sum(1), torch.ones(200), atol=1e-5)
        assert (out.probs[~batch.frame_mask] == 0).all()
    # k == pool size: the whole (smallest) pool, each frame exactly once
    out = policy.sample(make_batch([(6, 4)]), 6, generator=g)
    assert sorted(out.chosen[0].tolist()) == list(range(6))


@pytest.mark.parametrize("options", [True, False])
def test_rescore_matches_sampler_logprobs(policy, options):
    batch = fill_padding(make_batch([(11, 4), (23, 2), (8, 0), (17, 5)]))
    if not options:
        batch = batch.without_options()
    out = policy.sample(batch, 8, generator=torch.Generator().manual_seed(5))
    re = policy.rescore(batch, out.chosen)
    assert re.logp.shape == (4, 8) and re.log_dist.shape == (4, 8, 23)
    assert torch.allclose(re.logp, out.logp, atol=1e-5, rtol=0), (re.logp - out.logp).abs().max()
    # the mean selection probability is the mean of the per-step distributions
    assert torch.allclose(re.log_dist.exp().mean(1), out.probs, atol=1e-5)


def test_recompute_path_equals_cached_rollout(policy):
    batch = make_batch([(13, 3), (9, 0)])
    a = policy.sample(batch, 5, generator=torch.Generator().manual_seed(2))
    b = policy.sample(batch, 5, generator=torch.Generator().manual_seed(2), use_cache=False)
    assert torch.equal(a.chosen, b.chosen)
    assert torch.allclose(a.logp, b.logp, atol=1e-5)


def test_group_shares_the_prompt_and_equals_repeated_rows(policy):
    """group=N runs the prompt once per query; it must equal N repeated rows."""
    batch = fill_padding(make_batch([(9, 3), (14, 0), (6, 2)]))
    rows = torch.arange(3).repeat_interleave(4)
    a = policy.sample(batch, 5, generator=torch.Generator().manual_seed(8), group=4)
    b = policy.sample(batch.index(rows), 5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.chosen, b.chosen) and torch.allclose(a.logp, b.logp, atol=1e-5)
    ra = policy.rescore(batch, a.chosen, group=4)
    rb = policy.rescore(batch.index(rows), a.chosen)
    assert torch.allclose(ra.logp, a.logp, atol=1e-5)
    assert torch.allclose(ra.log_dist, rb.log_dist, atol=1e-5)
    policy.zero_grad()
    ra.logp.sum().backward()  # gradient through the shared prompt's repeated cache
    assert torch.isfinite(policy.frame_in[1].weight.grad).all()
    policy.zero_grad()
    with pytest.raises(ValueError, match="chosen has 12 rows"):
        policy.rescore(batch, a.chosen, group=3)


def test_missing_t_frac_means_pool_index_over_pool_length(policy):
    batch = make_batch([(9, 2), (5, 0)], t_frac=False)
    n = batch.frame_mask.sum(1, keepdim=True)
    explicit = PolicyBatch(batch.frames, batch.frame_mask,
                           (torch.arange(9)[None] / (n - 1)).clamp(max=1), batch.q_emb,
                           batch.opt_emb, batch.opt_mask)
    chosen = torch.tensor([[3, 1], [4, 0]])
    assert torch.allclose(policy.rescore(batch, chosen).log_dist,
                          policy.rescore(explicit, chosen).log_dist, atol=1e-6)


def test_padded_row_computes_what_it_computes_alone(policy):
    sizes = [(7, 2), (19, 4), (12, 0)]
    batch = fill_padding(make_batch(sizes))
    chosen = policy.sample(batch, 5, generator=torch.Generator().manual_seed(0)).chosen
    together = policy.rescore(batch, chosen)
    for i in range(len(sizes)):
        alone = policy.rescore(make_batch(sizes).index([i]), chosen[i : i + 1])
        f = sizes[i][0]
        assert torch.allclose(alone.log_dist[0, :, :f], together.log_dist[i, :, :f], atol=1e-5)


def test_greedy_is_deterministic_and_argmax_of_rescored(policy):
    batch = make_batch([(15, 4), (10, 3)])
    a = policy.sample(batch, 6, greedy=True)
    b = policy.sample(batch, 6, greedy=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.chosen, b.chosen)
    re = policy.rescore(batch, a.chosen)
    assert torch.equal(a.chosen[:, 0], re.log_dist[:, 0].argmax(-1))
    assert torch.equal(a.chosen, re.log_dist.argmax(-1))  # and at every later step


def test_entropy_is_exact_over_unmasked_entries(policy):
    batch = make_batch([(9, 3), (14, 0)])
    chosen = policy.sample(batch, 5, generator=torch.Generator().manual_seed(4)).chosen
    re = policy.rescore(batch, chosen)
    assert torch.isfinite(re.entropy).all()
    for i in range(2):
        for t in range(5):
            ld = re.log_dist[i, t]
            live = torch.isfinite(ld)
            assert int(live.sum()) == int(batch.frame_mask[i].sum()) - t
            naive = -(ld[live].exp() * ld[live]).sum()
            assert torch.allclose(re.entropy[i, t], naive, atol=1e-5)
    if policy.prior_w is None:  # at init the scores are small: near uniform over the rest
        assert abs(float(re.entropy[1, 0].detach()) - math.log(14)) < 0.05


def test_k_larger_than_pool_raises_clearly(policy):
    batch = make_batch([(50, 0), (45, 2), (41, 1), (32, 4)])
    with pytest.raises(ValueError, match=r"k=40 is larger than the pool \(32 frames\) of row 3"):
        policy.sample(batch, 40)
    with pytest.raises(ValueError, match="k=40 is larger than the pool"):
        policy.rescore(batch, torch.zeros(4, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be >= 1"):
        policy.sample(batch, 0)


def test_rescore_rejects_repeats_and_padding(policy):
    batch = make_batch([(5, 0), (8, 2)])
    with pytest.raises(ValueError, match="repeats"):
        policy.rescore(batch, torch.tensor([[0, 1, 0], [1, 2, 3]]))
    with pytest.raises(ValueError, match="padded"):
        policy.rescore(batch, torch.tensor([[0, 1, 6], [1, 2, 3]]))


def test_gradient_reaches_heads_sof_and_backbone(policy):
    policy.zero_grad()
    batch = make_batch([(10, 3), (13, 0)])
    chosen = policy.sample(batch, 4, generator=torch.Generator().manual_seed(1)).chosen
    re = policy.rescore(batch, chosen)
    (re.logp.sum() + 1e-3 * re.entropy.sum()).backward()
    named = dict(policy.named_parameters())
    for name in ("key_head.weight", "query_head.weight", "value_head.weight", "value_head.bias",
                 "sof", "logit_scale", "frame_in.1.weight", "text_in.1.weight", "type_emb"):
        g = named[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    backbone = [p.grad for n, p in named.items() if n.startswith("backbone.")]
    assert all(g is not None and torch.isfinite(g).all() for g in backbone)
    assert sum(float(g.abs().sum()) for g in backbone) > 0
    policy.zero_grad()


def test_query_changes_the_distribution_at_init(policy):
    a = make_batch([(16, 4)], seed=0)
    b = PolicyBatch(a.frames, a.frame_mask, a.t_frac, torch.randn(1, DT), a.opt_emb, a.opt_mask)
    c = a.without_options()
    chosen = torch.arange(3)[None]
    pa, pb, pc = (policy.rescore(x, chosen).log_dist[0, 0].exp() for x in (a, b, c))
    assert (pa - pb).abs().max() > 1e-6  # another question
    assert (pa - pc).abs().max() > 1e-6  # same question without its options


def test_select_frames_sorted_and_seeded(policy):
    ex = PolicyExample(frames=torch.randn(30, DF), q_emb=torch.randn(DT),
                       opt_emb=torch.randn(4, DT))
    a = select_frames(policy, ex, 8, seed=7)
    assert a == sorted(a) and len(set(a)) == 8 and all(0 <= i < 30 for i in a)
    assert a == select_frames(policy, ex, 8, seed=7)
    assert select_frames(policy, ex, 8, mode="greedy") == select_frames(policy, ex, 8,
                                                                         mode="greedy")
    with pytest.raises(ConfigError, match="mode: must be one of"):
        select_frames(policy, ex, 8, mode="best")


def test_save_load_round_trip_without_pickle(policy, tmp_path, monkeypatch):
    """Fault injection: torch.load and pickle are made to raise, load must not need them."""
    import pickle

    d = save(policy, tmp_path / "policy")
    raw = (d / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: u64 length + JSON header
    header.pop("__metadata__")
    # every byte after the header is raw tensor data described by it: no room for a pickle
    assert len(raw) - 8 - header_len == max(t["data_offsets"][1] for t in header.values())
    assert b"torch._utils" not in raw and not raw.startswith(b"PK")
    meta = json.loads((d / "policy.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["backbone"] == policy.cfg.backbone

    def refuse(*a, **k):
        raise AssertionError("fault injection: a pickle-based loader was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = load(d)
    batch = make_batch([(12, 3), (7, 0)])
    a = policy.sample(batch, 5, generator=torch.Generator().manual_seed(3))
    b = loaded.sample(batch, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.logp, b.logp)
    assert torch.equal(policy.rescore(batch, a.chosen).log_dist,
                       loaded.rescore(batch, a.chosen).log_dist)


def test_saving_the_same_weights_gives_the_same_bytes(policy, tmp_path):
    """eval.json records the checkpoint's sha256: equal weights must hash equal. safetensors
    alone writes its metadata in hash-map order, which varies from call to call."""
    blobs = {(save(policy, tmp_path / f"p{i}") / "model.safetensors").read_bytes()
             for i in range(12)}
    assert len(blobs) == 1
    raw = blobs.pop()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 : 8 + n].startswith(b'{"__metadata__":{"format":"refocus-ray/selector-policy",'
                                     b'"format_version":"1"}')
    assert torch.equal(load(tmp_path / "p0").state_dict()["frame_in.0.weight"],
                       policy.state_dict()["frame_in.0.weight"])


def test_load_errors_name_the_problem(tmp_path, policy):
    with pytest.raises(FileNotFoundError, match="policy.json: missing"):
        load(tmp_path)
    d = save(policy, tmp_path / "p")
    meta = json.loads((d / "policy.json").read_text())
    meta["format_version"] = 99
    (d / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        load(d)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"policy.backbone: must be one of "
                                          r"\['transformer', 'mamba2'\]"):
        PolicyConfig(backbone="lstm")
    with pytest.raises(ConfigError, match="policy.n_heads: must divide d_model"):
        PolicyConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="policy.temperature: must be > 0"):
        PolicyConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="policy.d_modle: unknown key"):
        PolicyConfig.from_dict({"d_modle": 64})
    with pytest.raises(ConfigError, match="policy.n_layers: expected"):
        PolicyConfig.from_dict({"n_layers": "two"})
    assert PolicyConfig.from_dict({"backbone": "mamba2"}).backbone == "mamba2"


def test_query_aware_inputs_change_picks_and_bridge_shapes_are_checked():
    """The bridge's relevance depends on the options; a wrong-shaped bridge names the field."""
    torch.manual_seed(0)
    p = SelectorPolicy(small_config("transformer", query_first=True, bridge_classes=10))
    with pytest.raises(ValueError, match="bridge_weight has shape"):
        p.set_bridge(torch.zeros(9, DF), torch.zeros(10), torch.zeros(10, DT))
    g = torch.Generator().manual_seed(4)
    p.set_bridge(torch.randn(10, DF, generator=g), torch.randn(10, generator=g),
                 torch.randn(10, DT, generator=g))
    batch = make_batch([(12, 3)])
    rel = p._bridge(batch)
    assert rel.shape == (1, 12, 2)
    assert torch.allclose(rel.mean(1), torch.zeros(1, 2), atol=1e-5)  # z-scored within the pool
    other = PolicyBatch(batch.frames, batch.frame_mask, batch.t_frac, batch.q_emb,
                        torch.randn_like(batch.opt_emb), batch.opt_mask)
    assert not torch.allclose(p._bridge(other)[..., 1], rel[..., 1])
    assert torch.equal(p._bridge(batch.without_options())[..., 1], torch.zeros(1, 12))
    unset = SelectorPolicy(small_config("transformer", bridge_classes=10))
    with pytest.raises(ValueError, match="bridge was never set"):
        unset.sample(batch, 2)
    with pytest.raises(ValueError, match="bridge_classes is 0"):
        SelectorPolicy(small_config("transformer")).set_bridge(None, None, None)


def test_a_batch_where_no_query_has_options(policy):
    """Open-ended questions only (the options dimension is empty): sample and rescore agree."""
    batch = make_batch([(9, 0), (6, 0)])
    assert batch.opt_emb.shape[1] == 0
    out = policy.sample(batch, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(policy.rescore(batch, out.chosen).logp, out.logp, atol=1e-5)


def test_prior_starts_on_relevant_frames_and_diversity_spreads_the_picks():
    """policy.prior_weight: the first pick goes where the prior (bridge relevance + novelty)
    points; policy.diversity_weight: a frame identical to one already chosen is all but
    excluded. Both are learnable weights (GRPO can undo them) and rescore agrees with them."""
    torch.manual_seed(0)
    p = SelectorPolicy(small_config("transformer", bridge_classes=10, prior_weight=10.0,
                                    diversity_weight=50.0))
    g = torch.Generator().manual_seed(4)
    p.set_bridge(torch.randn(10, DF, generator=g), torch.randn(10, generator=g),
                 torch.randn(10, DT, generator=g))
    batch = make_batch([(12, 3)])
    batch.frames[0, 7] = batch.frames[0, 2]  # frame 7 duplicates frame 2
    prior = p._prompt(batch).bias[0, 0]  # the one step slot
    first = p.sample(batch, 1, greedy=True).chosen[0, 0]
    assert int(first) == int(prior.argmax())
    assert {n for n, _ in p.named_parameters()} >= {"prior_w", "div_w"}
    torch.manual_seed(0)
    d = SelectorPolicy(small_config("transformer", diversity_weight=50.0))
    re = d.rescore(batch, torch.tensor([[2, 7, 0]]))
    assert float(re.logp[0, 1].detach()) < -20  # the duplicate right after its twin
    assert float(re.log_dist[0, 0, 7].detach()) > -math.log(12) - 0.1  # but not before it
    with pytest.raises(ConfigError, match="prior_weight: needs policy.bridge_classes"):
        small_config("transformer", prior_weight=1.0)


def test_query_weights_start_as_the_global_weights_and_then_depend_on_the_question():
    """policy.query_weights: w + W q starts at W = 0 (the same policy as without), and once W
    moves, two questions over the same frames get different prior and diversity weights."""
    g = torch.Generator().manual_seed(4)
    bridge = (torch.randn(10, DF, generator=g), torch.randn(10, generator=g),
              torch.randn(10, DT, generator=g))
    kw = {"bridge_classes": 10, "prior_weight": 1.0, "diversity_weight": 2.0}
    policies = []
    for qw, scale in ((False, 1.0), (True, 1.0), (True, 100.0)):
        torch.manual_seed(0)
        p = SelectorPolicy(small_config("transformer", query_weights=qw,
                                        score_weight_scale=scale, **kw))
        p.set_bridge(*bridge)
        policies.append(p)
    plain, conditioned, scaled = policies
    batch = make_batch([(12, 3), (12, 3)])
    batch.frames[1] = batch.frames[0]  # the same frames, two questions
    chosen = torch.tensor([[2, 7, 0], [2, 7, 0]])
    for other in (conditioned, scaled):  # the same policy at the start
        assert torch.allclose(plain.rescore(batch, chosen).logp, other.rescore(batch, chosen).logp)
    # policy.score_weight_scale: stored divided by the scale, so a step moves them 100x further
    assert float(scaled.div_w.detach()) == pytest.approx(2.0 / 100)
    torch.nn.init.normal_(conditioned.weights_q.weight, std=0.5)
    with torch.no_grad():
        pr = conditioned._prompt(batch)
    assert float((pr.div[0] - pr.div[1]).abs()) > 1e-3
    assert float((pr.bias[0] - pr.bias[1]).abs().max()) > 1e-3
    with pytest.raises(ConfigError, match="query_weights: needs"):
        small_config("transformer", query_weights=True, bridge_classes=10, prior_weight=1.0)


def test_step_weights_start_as_the_question_weights_and_then_depend_on_the_step():
    """policy.step_weights: W_s = 0 at the start (the same policy as without); once W_s moves,
    one question's picks get different weights at steps 1, 2 and 3+ (slot 2 is shared by every
    later step), and the sampler and the learner's rescore agree on them."""
    g = torch.Generator().manual_seed(4)
    bridge = (torch.randn(10, DF, generator=g), torch.randn(10, generator=g),
              torch.randn(10, DT, generator=g))
    kw = {"bridge_classes": 10, "prior_weight": 1.0, "diversity_weight": 2.0,
          "query_weights": True}
    policies = []
    for sw in (0, 2):
        torch.manual_seed(0)
        p = SelectorPolicy(small_config("transformer", step_weights=sw, **kw))
        p.set_bridge(*bridge)
        policies.append(p)
    plain, stepped = policies
    batch = make_batch([(12, 3), (9, 2)])
    chosen = torch.tensor([[2, 7, 0, 5], [1, 3, 8, 0]])
    assert torch.allclose(plain.rescore(batch, chosen).logp, stepped.rescore(batch, chosen).logp)
    torch.nn.init.normal_(stepped.weights_step.weight, std=0.5)
    with torch.no_grad():
        pr = stepped._prompt(batch)
    assert pr.bias.shape == (2, 2, 12) and pr.div.shape == (2, 2)
    assert float((pr.bias[:, 0] - pr.bias[:, 1]).abs().max()) > 1e-3
    assert float((pr.div[:, 0] - pr.div[:, 1]).abs().max()) > 1e-3
    assert pr.slot(0) == 0 and pr.slot(5) == 1
    gen = torch.Generator().manual_seed(1)
    out = stepped.sample(batch, 4, generator=gen)
    re = stepped.rescore(batch, out.chosen)
    assert torch.allclose(out.logp, re.logp.detach(), atol=1e-5)
    # changing only slot 1's weights (steps 2+) leaves step 1's distribution as it was
    before = re.log_dist[:, 0].detach()
    with torch.no_grad():
        stepped.weights_step.weight[4:] += 1.0
    after = stepped.rescore(batch, out.chosen)
    assert torch.allclose(before, after.log_dist[:, 0].detach())
    assert not torch.allclose(re.logp[:, 1:].detach(), after.logp[:, 1:].detach())
    with pytest.raises(ConfigError, match="step_weights: needs"):
        small_config("transformer", step_weights=2, bridge_classes=10, prior_weight=1.0,
                     diversity_weight=2.0)


def test_earliness_scores_the_first_frame_of_the_earliest_relevant_segment():
    """policy.earliness: among frames z-scored by relevance, only the first frame of the first
    relevant segment scores high; later frames of it, later relevant segments, and the
    background after them do not. Its weight starts at prior_weight; it needs the prior."""
    rel = torch.tensor([[-0.3, -0.3, 3.0, 3.0, -0.3, 2.8, 2.8, -0.3, 0.0, 0.0]])
    mask = torch.tensor([[True] * 8 + [False] * 2])  # two padded frames
    e = SelectorPolicy._earliest(rel, mask)
    others = e[0, [0, 1, 3, 4, 5, 6, 7]]
    assert int(e[0, :8].argmax()) == 2  # the earliest relevant segment's first frame ...
    assert e[0, 2] - others.max() > 1.5  # ... by far: later frames of it or of a later segment
    assert e[0, 4] == e[0, 7] == others.min()  # background after a relevant frame: lowest
    assert (e[0, 8:] == 0).all()  # padding
    p = SelectorPolicy(small_config("transformer", bridge_classes=10, prior_weight=1.5,
                                    diversity_weight=2.0, query_weights=True, earliness=True))
    c = p.cfg.score_weight_scale
    assert float(p.earliest_w) * c == pytest.approx(1.5) and not p.weights_earliest.weight.any()
    with pytest.raises(ConfigError, match="earliness: needs"):
        small_config("transformer", bridge_classes=10, earliness=True)


def test_after_anchor_scores_the_first_option_frame_after_the_anchor_segment():
    """policy.after_anchor: "which object appears right after X?" The anchor X is related to
    the question and not to the options; the frame the term ranks first is the first frame
    of the first option segment after X's segment, not an option shown before X, not X's
    later frames, not a later option. Turning it on leaves a policy's other weights as they
    were (same seed, same init), and it needs the prior."""
    #                 bg   opt  opt  bg   X    X    X    bg   nxt  nxt  bg   opt  pad
    q = torch.tensor([[0.0, 0.2, 0.2, 0.0, 3.0, 2.5, 2.0, 0.0, 0.3, 0.3, 0.0, 0.3, 9.0]])
    o = torch.tensor([[0.0, 3.0, 3.0, 0.0, 0.1, 0.1, 0.1, 0.0, 2.5, 2.5, 0.0, 2.9, 9.0]])
    mask = torch.tensor([[True] * 12 + [False]])
    e = SelectorPolicy._after_anchor(torch.stack([q, o], -1), mask)
    assert int(e[0].argmax()) == 8  # the next object's first frame ...
    assert e[0, 8] - e[0, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11]].max() > 1.0  # ... by far
    assert (e[0, :7] == e[0, 7:12].min()).all()  # up to the anchor's end: the lowest
    assert e[0, 12] == 0  # padding
    # no frame after the anchor segment: the term is flat (0 everywhere)
    assert torch.equal(SelectorPolicy._after_anchor(torch.stack([q, o], -1)[:, :7], mask[:, :7]),
                       torch.zeros(1, 7))
    kw = {"bridge_classes": 10, "prior_weight": 1.5, "diversity_weight": 2.0,
          "query_weights": True, "step_weights": 2, "earliness": True}
    torch.manual_seed(0)
    without = SelectorPolicy(small_config("transformer", **kw)).state_dict()
    torch.manual_seed(0)
    p = SelectorPolicy(small_config("transformer", after_anchor=True, **kw))
    assert all(torch.equal(v, p.state_dict()[k]) for k, v in without.items())
    assert float(p.after_w) * p.cfg.score_weight_scale == pytest.approx(1.5)
    assert p.weights_after.weight.shape == (2, DT) and not p.weights_after.weight.any()
    with pytest.raises(ConfigError, match="after_anchor: needs"):
        small_config("transformer", bridge_classes=10, after_anchor=True)
