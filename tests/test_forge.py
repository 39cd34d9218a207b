"""Forge: prompt validation, train/score pixel identity, vLLM vs transformers, cluster plumbing.

The vLLM tests start real engines (~20 s each, CPU), one per module-scoped fixture, and are
skipped where vllm is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

for _k, _v in {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)

torch = pytest.importorskip("torch")

from conftest import FORGED_OPTIONS, FORGED_QUESTION

from refocus_ray import forge, prompting

QUESTION, OPTIONS = FORGED_QUESTION, FORGED_OPTIONS
TOL = 1e-4  # fp32 vLLM vs fp32 transformers, log-prob units


def _frames(k: int, seed: int = 0) -> np.ndarray:
    """Native-size frames (the benchmark writes 160x120): the scorer must resize them itself."""
    return np.random.default_rng(seed).integers(0, 256, (k, 120, 160, 3), dtype=np.uint8)


def test_config_validation():
    with pytest.raises(ValueError, match="answer_mode"):
        forge.ForgeConfig(answer_mode="logits")
    with pytest.raises(ValueError, match="frame_size"):
        forge.ForgeConfig(frame_size=50)
    with pytest.raises(ValueError, match="min_k"):
        forge.ForgeConfig(min_k=40)
    with pytest.raises(ValueError, match="no_evidence_target"):
        forge.ForgeConfig(no_evidence_target="answer")
    with pytest.raises(ValueError, match="answer_attention_families.*'when'"):
        forge.ForgeConfig(answer_attention_families=["first", "when"])
    with pytest.raises(ValueError, match="weights"):
        forge.ForgeConfig(anchor_attention_weight=-1)
    with pytest.raises(ValueError, match="text_layers >= 2"):
        forge.ForgeConfig(text_layers=1, word_attention_weight=0.5)


def test_no_evidence_target_never_uses_the_answer():
    """Without evidence the loss pulls toward uniform or toward the first option, whatever the
    answer is (supervising the answer there teaches the model to recall videos)."""
    z = torch.zeros(2, 4, requires_grad=True)
    logits = torch.zeros(2, 10, requires_grad=True)
    with_ev = torch.tensor([True, False])
    for answer in (1, 3):
        target, tok = torch.tensor([2, answer]), torch.tensor([5, 5 + answer])
        z.grad = logits.grad = None
        forge._loss(logits, z, target, tok, with_ev).backward()
        assert torch.allclose(z.grad[1], torch.zeros(4))  # uniform is already optimal
        assert z.grad[0].argmin() == 2  # with evidence: toward the answer
        z.grad = logits.grad = None
        forge._loss(logits, z, target, tok, with_ev, first_tok=torch.tensor([7, 7])).backward()
        assert z.grad[1].argmin() == 0 and logits.grad[1].argmin() == 7  # the first option
        assert z.grad[0].argmin() == 2 and logits.grad[0].argmin() == 5


def test_prompt_rejects_multi_token_option(forged_tiny):
    tok = forged_tiny[2]
    with pytest.raises(prompting.PromptError, match=r"option 1 \('xylophonequartz'\).*tokens"):
        prompting.scored_token_ids(tok, ["cat", "xylophonequartz"], "content")
    assert len(prompting.scored_token_ids(tok, ["cat", "xylophonequartz"], "letter")) == 2


def test_prompt_rejects_options_sharing_a_token(forged_tiny):
    with pytest.raises(prompting.PromptError, match=r"options 0 \('cat'\) and 2 \('cat '\) share"):
        prompting.scored_token_ids(forged_tiny[2], ["cat", "rocket", "cat "], "content")
    with pytest.raises(prompting.PromptError, match="answer mode"):
        prompting.build_prompt("q", ["a", "b"], 1, "logit", "<image>")


def test_every_answer_word_is_one_token(forged_tiny):
    tok = forged_tiny[2]
    for mode in prompting.MODES:
        ids = prompting.scored_token_ids(tok, OPTIONS, mode)
        assert len(set(ids)) == len(OPTIONS)


@pytest.mark.parametrize("labels", [True, False], ids=["frame-labels", "no-labels"])
def test_training_and_scoring_feed_identical_pixels_and_tokens(forged_tiny, labels):
    """What training feeds the model == what the vLLM path's HF processor produces."""
    import dataclasses

    from transformers import AutoProcessor

    from refocus_ray.vllm_scoring import IMAGE_PLACEHOLDER, engine_images

    ckpt, cfg, tok, proc, _ = forged_tiny
    cfg = dataclasses.replace(cfg, frame_labels=labels)
    native = _frames(5)
    q = forge.Question("q0", "v0", "appear", QUESTION, OPTIONS, 1, [])
    ids, _, pix, _ = forge._Batcher(tok, proc, cfg)([(q, forge.preprocess_frames(native, cfg))])

    loaded = AutoProcessor.from_pretrained(ckpt)  # what vLLM builds from the checkpoint
    prompt = prompting.build_prompt(QUESTION, OPTIONS, 5, cfg.answer_mode,
                                    IMAGE_PLACEHOLDER["idefics3"], labels)  # fmt: skip
    enc = loaded(text=prompt, images=engine_images(native, forge.ForgeConfig.load(ckpt)),
                 return_tensors="pt")  # fmt: skip
    assert enc["pixel_values"].shape == (1, 5, 3, cfg.frame_size, cfg.frame_size)
    assert torch.equal(enc["pixel_values"], pix)
    assert enc["input_ids"][0].tolist() == ids[0].tolist()
    numbers = [tok.encode(prompting.frame_label(i), add_special_tokens=False) for i in range(5)]
    if labels:  # each frame number is one token, right before its frame's image block
        assert all(len(n) == 1 for n in numbers)
        starts = np.flatnonzero(ids[0].numpy() == tok.convert_tokens_to_ids("<global-img>"))
        assert [int(ids[0, j - 2]) for j in starts] == [n[0] for n in numbers]  # " 1", then the block's opening token


def test_transformers_backend_numbers_frames_like_vllm(forged_tiny, forged_engine, clip_dir):
    """The `transformers` backend reads the checkpoint's frame_labels and scores what vLLM
    scores (a prompt without the numbers would be another prompt: scores would differ)."""
    from refocus_ray.scoring import ReferenceConfig, ScoreRequest, TransformersBackend

    backend = TransformersBackend(ReferenceConfig(backend="transformers", model=str(forged_tiny[0]),
                                                  answer_mode="content"))  # fmt: skip
    assert backend.frame_labels
    reqs = [ScoreRequest(str(clip_dir / "mid.mp4"), f, QUESTION, tuple(OPTIONS))
            for f in [(3,), (10, 200, 700), tuple(range(0, 800, 100))]]  # fmt: skip
    z_hf = np.array(backend.score(reqs))
    z_vllm = np.array(forged_engine.score(
        [(backend.store.get(r.video, r.frames), r.question, r.options) for r in reqs]))
    assert np.abs(z_hf - z_vllm).max() < TOL, (z_hf, z_vllm)


def test_preprocess_is_idempotent_and_validates(forged_tiny):
    cfg = forged_tiny[1]
    small = forge.preprocess_frames(_frames(3), cfg)
    assert small.shape == (3, cfg.frame_size, cfg.frame_size, 3) and small.dtype == np.uint8
    assert np.array_equal(forge.preprocess_frames(small, cfg), small)
    with pytest.raises(ValueError, match="uint8"):
        forge.preprocess_frames(small.astype(np.float32), cfg)


def test_sample_subset_includes_or_excludes_evidence():
    rng = np.random.default_rng(0)
    ev = [np.arange(10, 13), np.arange(50, 52)]
    for _ in range(50):
        pos = forge.sample_subset(rng, 100, ev, 4, True)
        assert len(pos) == 4 and np.all(np.diff(pos) > 0)
        assert all(np.isin(e, pos).any() for e in ev)
        neg = forge.sample_subset(rng, 100, ev, 8, False)
        assert not np.isin(neg, np.concatenate(ev)).any()
    assert forge.sample_subset(rng, 100, ev, 1, True) is None  # 2 segments do not fit in K=1


def test_dense_subset_shows_evidence_among_other_objects():
    """The forge report's object-dense condition: every evidence segment, then one frame of as
    many other objects as fit."""
    rng = np.random.default_rng(0)
    ev, others = [np.arange(10, 13), np.arange(50, 52)], [np.arange(20, 22), np.arange(70, 75)]
    for k, n_others in [(2, 0), (3, 1), (4, 2), (8, 2)]:
        pos = forge.dense_subset(rng, 100, ev, others, k)
        assert len(pos) == k and np.all(np.diff(pos) > 0)
        assert all(np.isin(e, pos).any() for e in ev)
        assert sum(np.isin(o, pos).any() for o in others) >= n_others
    assert forge.dense_subset(rng, 100, ev, others, 1) is None


@pytest.fixture(scope="module")
def forged_engine(forged_tiny):
    pytest.importorskip("vllm")
    from refocus_ray.vllm_scoring import VLLMScorer

    scorer = VLLMScorer(forged_tiny[0], max_frames=8)
    yield scorer
    scorer.close()


def test_vllm_scores_equal_transformers_fp32(forged_tiny, forged_engine):
    _, cfg, tok, proc, model = forged_tiny
    reqs = [(_frames(k, seed=k), QUESTION, OPTIONS) for k in (1, 4, 8)]
    z_vllm = np.array(forged_engine.score(reqs))
    ids = prompting.scored_token_ids(tok, OPTIONS, cfg.answer_mode)
    batcher = forge._Batcher(tok, proc, cfg)
    for (frames, _, _), zv in zip(reqs, z_vllm):
        q = forge.Question("q", "v", "appear", QUESTION, OPTIONS, 0, [])
        with torch.no_grad():
            logits, _ = forge._option_logits(
                model, batcher([(q, forge.preprocess_frames(frames, cfg))]), [ids]
            )
        z_hf = torch.log_softmax(logits[0].double(), -1)[ids].numpy()
        assert np.abs(z_hf - zv).max() < TOL, (z_hf, zv)
    assert forged_engine.score([]) == []


def test_random_cluster_model_scores_in_letter_mode(tmp_path):
    """SmolVLM-shaped Idefics3 with image tiling, frames at native size, letter answers."""
    pytest.importorskip("vllm")
    from refocus_ray.vllm_scoring import VLLMScorer

    ckpt = forge.build_random_model("idefics3", tmp_path / "idefics3")
    assert not (ckpt / forge.CONFIG_FILE).exists()
    scorer = VLLMScorer(ckpt, max_frames=4)
    try:
        assert scorer.mode == "letter"
        z = scorer.score([(_frames(k), QUESTION, ["cat", "dog", "moon"][:k]) for k in (2, 3)])
    finally:
        scorer.close()
    assert [len(s) for s in z] == [2, 3]
    assert np.isfinite(np.concatenate(z)).all()
    with pytest.raises(ValueError, match="unknown architecture"):
        forge.build_random_model("qwen2_5_vl", tmp_path / "q")


def test_word_ranks_label_each_object_word_by_first_appearance(forged_tiny):
    """Options and listed objects predict when they are first seen ("one", ...) or "none"."""
    tok = forged_tiny[2]
    words = ["cat", "coffee", "rocket", "motorcycle"]
    word_of = {prompting.scored_token_ids(tok, [w], "content")[0]: w for w in words}
    rank_tok = [100 + r for r in range(len(forge.RANK_WORDS))]  # stand-in ids for the ranks
    text = tok.encode(prompting.build_prompt(QUESTION, words, 0, "content", ""),
                      add_special_tokens=False)  # fmt: skip
    ids = torch.tensor([text])
    frames = ["bikes", "rocket", "rocket", "cat", "moon"]  # rocket first, then cat
    rows, cols, targets = forge._word_ranks(ids, [frames], word_of, rank_tok)
    by_word = {word_of[int(ids[0, c])]: t - 100 for c, t in zip(cols, targets)}
    assert rows == [0] * 4 and by_word == {"cat": 2, "coffee": 0, "rocket": 1, "motorcycle": 0}


def test_frame_ranks_count_distinct_objects_at_each_block_end(forged_tiny):
    """Each shown frame's target: how many distinct objects the frames up to it show (an
    object frame: its object's rank of first appearance), read at its image block's last
    token, so its visual token stays its own object's word."""
    _, cfg, tok, proc, _ = forged_tiny
    frames = ["bikes", "rocket", "rocket", "cat", "bikes", "rocket", "moon"]
    rows, idx, ranks = forge._frame_ranks([["bikes"], frames], n_ranks=3)
    assert rows == [0] + [1] * 7 and idx == [0, *range(7)]
    assert ranks == [0, 0, 1, 1, 2, 2, 2, 2]  # moon is the third object: capped at n_ranks - 1
    q = forge.Question("q0", "v0", "appear", QUESTION, OPTIONS, 1, [])
    batcher = forge._Batcher(tok, proc, cfg)
    ids = batcher([(q, forge.preprocess_frames(_frames(len(frames)), cfg))])[0][0].numpy()
    ends = batcher.block_ends(len(frames))
    assert (ids[ends] == tok.convert_tokens_to_ids("<fake_token_around_image>")).all()
    assert (ids[ends - 1] == batcher.image_id).all()  # right after each frame's visual token


def test_frozen_vision_outputs_are_what_the_pixels_give():
    """After `freeze_vision_at`, training feeds the text model the tower's cached outputs
    instead of pixels; they must give the hidden states the pixel path (every scorer's) gives,
    and gradients must still reach the connector and the text model, not the tower."""
    cfg = forge.ForgeConfig(text_layers=2, vision_layers=1, frame_labels=True)
    texts = [prompting.build_prompt(QUESTION, OPTIONS, 0, "content", "")]
    tok, proc, model = forge.init_model(cfg, texts, [" " + o for o in OPTIONS])
    pools = {v: (forge.preprocess_frames(_frames(n, seed=n), cfg), np.arange(n, dtype=float))
             for v, n in (("v0", 6), ("v1", 7))}  # fmt: skip
    batcher = forge._Batcher(tok, proc, cfg)
    cached = forge._freeze_vision(model, pools, batcher.lut, chunk=4)  # chunks inside a pool
    assert {v: tuple(c.shape[:1]) for v, c in cached.items()} == {"v0": (6,), "v1": (7,)}
    picks = [("v0", [0, 2, 5]), ("v1", [1, 3, 6])]
    batch = batcher([(forge.Question("q", v, "appear", QUESTION, OPTIONS, 0, []), pools[v][0][p])
                     for v, p in picks])  # fmt: skip
    with torch.no_grad():
        from_pixels = forge._hidden(model, batch)
    from_cache = forge._hidden(model, batch, torch.cat([cached[v][p] for v, p in picks]))
    assert torch.allclose(from_pixels, from_cache, atol=1e-5)
    from_cache.square().mean().backward()
    assert all(p.grad is None for p in model.model.vision_model.parameters())
    assert all(p.grad is not None for p in model.model.connector.parameters())
    assert model.model.text_model.layers[0].self_attn.q_proj.weight.grad is not None
    with pytest.raises(ValueError, match="freeze_vision_at"):
        forge.ForgeConfig(freeze_vision_at=1.5)


def test_match_heads_start_as_same_word_lookups():
    cfg = forge.ForgeConfig(text_layers=2, vision_layers=1, match_heads=1)
    texts = [prompting.build_prompt(QUESTION, OPTIONS, 0, "content", "")]
    _, _, model = forge.init_model(cfg, texts, [" " + o for o in OPTIONS])
    first, second = (layer.self_attn for layer in model.model.text_model.layers)
    hd = cfg.head_dim
    assert torch.equal(first.q_proj.weight[:hd], first.k_proj.weight[:hd])
    assert not torch.equal(second.q_proj.weight[:hd], second.k_proj.weight[:hd])


def test_train_halves_are_disjoint_and_cover_the_split(tmp_path):
    import pyarrow.parquet as pq

    from refocus_ray.dataset import validate_rows

    rows = [{"question_id": f"q{i}", "video_id": f"v{i // 2}", "video_path": f"v{i // 2}.mp4",
             "question": "Which?", "options": ["a", "b"], "answer": 0, "duration_s": 1.0,
             "split": "train" if i < 16 else "val", "family": "appear"} for i in range(20)]
    table = tmp_path / "q.parquet"
    pq.write_table(validate_rows(rows, "test"), table)
    halves = [{r["video_id"] for r in forge.train_rows(table, h)} for h in ("half0", "half1")]
    assert not halves[0] & halves[1] and len(halves[0]) == len(halves[1]) == 4
    assert halves[0] | halves[1] == {r["video_id"] for r in forge.train_rows(table)}


def test_supervised_head_attention_is_the_models_own():
    """The attention the forge supervises (`_head_attention`, recomputed from a layer's input)
    must be the probabilities the layer itself uses, head by head, or the loss would teach a
    head the model does not have."""
    cfg = forge.ForgeConfig(text_layers=2, vision_layers=1, frame_labels=True)
    texts = [prompting.build_prompt(QUESTION, OPTIONS, 0, "content", "")]
    tok, proc, model = forge.init_model(cfg, texts, [" " + o for o in OPTIONS])
    model.set_attn_implementation("eager")
    layer = model.model.text_model.layers[1].self_attn
    taps = {}
    layer.register_forward_pre_hook(
        lambda m, a, kw: taps.__setitem__("x", (kw["hidden_states"], kw["position_embeddings"])),
        with_kwargs=True)  # fmt: skip
    batcher = forge._Batcher(tok, proc, cfg)
    q = forge.Question("q", "v", "appear", QUESTION, OPTIONS, 0, [])
    batch = batcher([(q, forge.preprocess_frames(_frames(k, seed=k), cfg)) for k in (3, 5)])
    with torch.no_grad():
        out = model.model(input_ids=batch[0], attention_mask=batch[1], pixel_values=batch[2],
                          output_attentions=True)  # fmt: skip
        rows, cols = [0, 1, 1], [int(batch[3][0]), 7, int(batch[3][1])]
        for head in range(cfg.heads):
            mine = forge._head_attention(layer, *taps["x"], rows, cols, head)
            theirs = out.attentions[1][rows, head, cols]
            assert torch.allclose(mine[0, : cols[0] + 1], theirs[0, : cols[0] + 1], atol=1e-6)
            assert torch.allclose(mine[1:], theirs[1:], atol=1e-6)


def test_attention_targets_are_each_objects_frames_and_the_answer_word(forged_tiny):
    """Object words look at the closing tokens of their object's frames; an `after` question's
    answer position at its anchor's word and frames; the answer position at the word it must
    answer."""
    tok = forged_tiny[2]
    word_of = {prompting.scored_token_ids(tok, [w], "content")[0]: w for w in OPTIONS}
    label_ids = lambda ws: [prompting.scored_token_ids(tok, [w], "content")[0] for w in ws]
    after = f"Which object appears right after the {OPTIONS[0]}?"  # anchor: cat
    opts = OPTIONS[1:]  # coffee, rocket, motorcycle
    ids = torch.tensor([tok.encode(prompting.build_prompt(after, opts, 0, "content", ""),
                                   add_special_tokens=False)])  # fmt: skip
    frames = ["bikes", "cat", "cat", "rocket", "moon", "coffee"]  # cat, then rocket
    last = torch.tensor([ids.shape[1] - 1])
    words, anchors, anchor_words = forge._word_frames(ids, last, [frames], ["after"], word_of)
    rows, cols, at = words
    looked = {word_of[int(ids[0, c])]: f for c, f in zip(cols, at)}
    assert rows == [0] * 3 and looked == {"cat": [1, 2], "rocket": [3], "coffee": [5]}
    assert anchors == ([0], [int(last[0])], [[1, 2]])  # the anchor's frames
    cat = prompting.scored_token_ids(tok, ["cat"], "content")[0]
    (where,) = anchor_words[2][0]
    assert anchor_words[:2] == ([0], [int(last[0])]) and int(ids[0, where]) == cat
    assert where < cols[1]  # the question's cat, before the options
    assert forge._word_frames(ids, last, [frames], ["first"], word_of)[1:] == (([], [], []),) * 2
    q = forge.Question("q", "v", "after", after, opts, 1, [])  # rocket
    drawn = [(q, None, True, frames), (q, None, False, frames)]
    both = torch.cat([ids, ids])
    rows, cols, at = forge._answer_words(both, torch.cat([last, last]), drawn, label_ids,
                                         ("after",), first_option=True)  # fmt: skip
    assert [label_ids([w])[0] for w in ("rocket", "coffee")] == [int(both[0, p[0]]) for p in at]
    assert rows == [0, 1] and cols == [int(last[0])] * 2
    assert forge._answer_words(both, torch.cat([last, last]), drawn, label_ids, ("after",),
                               first_option=False)[0] == [0]  # uniform: no word to look at
    assert forge._answer_words(both, torch.cat([last, last]), drawn, label_ids, ("first",),
                               first_option=True)[0] == []  # fmt: skip
