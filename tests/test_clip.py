"""Tests for the BiomedCLIP section: CPU, tiny random models, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from utils import COARSE_CLASSES, LABEL_TO_COARSE, LABELS
from utils import (
    COARSE_CLASS_TEXTS,
    FINE_CLASS_TEXTS,
    PROMPT_TEMPLATES,
    add_description_prompts,
    alpha_query_expansion,
    build_tiny_clip,
    choose_prototype_weight,
    choose_rerank_beta,
    build_class_prompts,
    choose_query_expansion,
    cosine_topk,
    description_queries,
    embed_images,
    embed_texts,
    image_prototypes,
    joint_prototypes,
    load_clip,
    mean_reciprocal_rank,
    plot_embedding_projection,
    plot_retrieval_gallery,
    prototype_classify,
    prototype_confidence,
    prototype_logits,
    recall_at_k,
    rerank_by_region,
    retrieval_hits,
    split_finding_lines,
    text_prototypes,
    text_to_image,
)

matplotlib.use("Agg")

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
    return load_clip("tiny", CPU)


@pytest.fixture
def image_paths(tmp_path: Path) -> list[Path]:
    """Six small noise images (one grayscale) of different contents."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        a = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        im = Image.fromarray(a).convert("L") if i == 5 else Image.fromarray(a)
        paths.append(tmp_path / f"img{i}.png")
        im.save(paths[-1])
    return paths


def count_images_encoded(monkeypatch, model) -> list[int]:
    """Wrap model.encode_image; the returned list gets each call's batch size."""
    calls: list[int] = []
    original = model.encode_image

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", counting)
    return calls


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def naive_topk(q: np.ndarray, g: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
    """Per query: sort by (-cosine, gallery index), drop excluded pairs, keep k."""
    out = []
    for i, qi in enumerate(q):
        sims = g @ qi
        order = [j for j in np.lexsort((np.arange(len(g)), -sims)) if exclude is None or not exclude[i, j]]
        out.append(order[:k])
    return np.array(out)


# ----------------------------------------------------------------------------------- loading, embeddings


def test_tiny_clip_embeds_images_and_texts_as_unit_vectors(tiny, image_paths):
    model, preprocess, tokenizer = tiny
    img = embed_images(model, preprocess, image_paths, CPU, batch_size=4, num_workers=0, progress=False)
    with_workers = embed_images(model, preprocess, image_paths, CPU, batch_size=4, num_workers=2, progress=False)
    assert torch.allclose(img, with_workers, atol=1e-6)  # same order and values through worker processes
    txt = embed_texts(model, tokenizer, ["an endoscopic image of the ear.", "nose"], CPU)
    assert img.shape == (6, 32) and txt.shape == (2, 32)
    assert img.dtype == torch.float32 and txt.dtype == torch.float32
    assert torch.allclose(img.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not model.training


def test_tiny_clip_depends_only_on_seed_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_clip(0)[0], build_tiny_clip(0)[0], build_tiny_clip(1)[0]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.visual.conv1.weight, b.visual.conv1.weight)
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)


def test_bf16_autocast_embeddings_close_to_fp32(tiny, image_paths):
    model, preprocess, _ = tiny
    fp32 = embed_images(model, preprocess, image_paths, CPU, num_workers=0, amp_dtype=None, progress=False)
    bf16 = embed_images(model, preprocess, image_paths, CPU, num_workers=0, amp_dtype=torch.bfloat16, progress=False)
    assert bf16.dtype == torch.float32
    assert (fp32 * bf16).sum(1).min() > 0.98  # cosine between the two runs


def test_cache_second_call_never_calls_the_model(monkeypatch, image_paths, tmp_path):
    model, preprocess, _ = build_tiny_clip(0)
    calls = count_images_encoded(monkeypatch, model)
    kw = dict(num_workers=0, amp_dtype=None, cache_dir=tmp_path / "cache", progress=False)
    first = embed_images(model, preprocess, image_paths, CPU, **kw)
    assert sum(calls) == 6
    calls.clear()
    second = embed_images(model, preprocess, image_paths[::-1], CPU, **kw)
    assert calls == []
    assert torch.equal(second, first.flip(0))


def test_cache_reencodes_only_the_changed_file(monkeypatch, image_paths, tmp_path):
    model, preprocess, _ = build_tiny_clip(0)
    calls = count_images_encoded(monkeypatch, model)
    kw = dict(num_workers=0, amp_dtype=None, cache_dir=tmp_path / "cache", progress=False)
    before = embed_images(model, preprocess, image_paths, CPU, **kw)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image_paths[2])  # same name, new content
    calls.clear()
    after = embed_images(model, preprocess, image_paths, CPU, **kw)
    assert calls == [1]
    fresh = embed_images(model, preprocess, [image_paths[2]], CPU, num_workers=0, amp_dtype=None, progress=False)
    assert torch.allclose(after[2], fresh[0], atol=1e-6)
    assert not torch.allclose(after[2], before[2], atol=1e-3)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(after[keep], before[keep])


def test_cache_misses_for_a_different_model(monkeypatch, image_paths, tmp_path):
    cache = tmp_path / "cache"
    m0, pre0, _ = build_tiny_clip(0)
    a = embed_images(m0, pre0, image_paths, CPU, num_workers=0, amp_dtype=None, cache_dir=cache, progress=False)
    m1, pre1, _ = build_tiny_clip(1)
    calls = count_images_encoded(monkeypatch, m1)
    b = embed_images(m1, pre1, image_paths, CPU, num_workers=0, amp_dtype=None, cache_dir=cache, progress=False)
    assert sum(calls) == 6
    assert not torch.allclose(a, b, atol=1e-3)
    assert len(list(cache.glob("clip_image_feats_*.safetensors"))) == 2


def _tamper(cache_file):
    """Edit one embedding in place and save a valid safetensors file with the old metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(cache_file), framework="pt") as f:
        meta, feats = f.metadata(), f.get_tensor("feats")
    feats[0] = -feats[0]
    save_file({"feats": feats}, str(cache_file), metadata=meta)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper"])
def test_corrupt_cache_is_detected_and_rebuilt(monkeypatch, image_paths, tmp_path, damage):
    model, preprocess, _ = build_tiny_clip(0)
    kw = dict(num_workers=0, amp_dtype=None, cache_dir=tmp_path / "cache", progress=False)
    good = embed_images(model, preprocess, image_paths, CPU, **kw)
    (cache_file,) = (tmp_path / "cache").glob("*.safetensors")
    data = cache_file.read_bytes()
    if damage == "tamper":
        _tamper(cache_file)
    else:
        cache_file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    calls = count_images_encoded(monkeypatch, model)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = embed_images(model, preprocess, image_paths, CPU, **kw)
    assert sum(calls) == 6
    assert torch.allclose(rebuilt, good, atol=1e-6)
    calls.clear()
    embed_images(model, preprocess, image_paths, CPU, **kw)  # the rebuilt cache is valid again
    assert calls == []


# ----------------------------------------------------------------------------------- prototypes


def test_image_prototypes_equal_naive_class_means():
    feats, labels = unit(40, 8, 0), torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))
    protos = image_prototypes(feats, labels, 4)
    for c in range(4):
        mean = feats[labels == c].mean(0)
        assert torch.allclose(protos[c], mean / mean.norm(), atol=1e-6)


def test_empty_class_raises_or_gives_a_zero_prototype():
    feats, labels = unit(6, 8, 0), [0, 0, 1, 1, 3, 3]
    with pytest.raises(ValueError, match=r"class ids \[2\]"):
        image_prototypes(feats, labels, 4)
    protos = image_prototypes(feats, labels, 4, allow_empty=True)
    assert torch.isfinite(protos).all() and protos[2].abs().sum() == 0
    text = unit(4, 8, 5)
    assert torch.allclose(joint_prototypes(protos, text, 0.7)[2], text[2], atol=1e-6)  # falls back to text


def test_prototype_classifier_equals_per_class_loop():
    feats, protos, temperature = unit(10, 8, 0), unit(4, 8, 1), 0.05
    probs = prototype_classify(feats, protos, temperature)
    for n in range(10):
        logits = [float(feats[n] @ protos[c]) / temperature for c in range(4)]
        expected = np.exp(logits - np.max(logits)) / np.exp(logits - np.max(logits)).sum()
        assert np.allclose(probs[n].numpy(), expected, atol=1e-6)
    conf, margin = prototype_confidence(probs)
    ordered = probs.sort(dim=1, descending=True).values
    assert torch.equal(conf, ordered[:, 0]) and torch.allclose(margin, ordered[:, 0] - ordered[:, 1])
    assert torch.allclose(prototype_logits(feats, protos, 100.0), 100.0 * feats @ protos.T)


def test_joint_prototypes_are_unit_and_reduce_to_each_side():
    img, txt = unit(4, 8, 0), unit(4, 8, 1)
    assert torch.allclose(joint_prototypes(img, txt, 1.0), img, atol=1e-6)
    assert torch.allclose(joint_prototypes(img, txt, 0.0), txt, atol=1e-6)
    mid = joint_prototypes(img, txt, 0.5)
    assert torch.allclose(mid.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(mid, F.normalize(img + txt, dim=-1), atol=1e-6)


def test_text_prototypes_are_renormalised_means_of_prompt_embeddings(tiny):
    model, _, tokenizer = tiny
    prompts = build_class_prompts(COARSE_CLASSES, COARSE_CLASS_TEXTS)
    protos = text_prototypes(model, tokenizer, prompts, CPU, amp_dtype=None)
    assert protos.shape == (4, 32)
    ear = embed_texts(model, tokenizer, prompts["ear"], CPU, amp_dtype=None).mean(0)
    assert torch.allclose(protos[COARSE_CLASSES.index("ear")], ear / ear.norm(), atol=1e-5)
    fine = text_prototypes(model, tokenizer, build_class_prompts(LABELS, FINE_CLASS_TEXTS), CPU, amp_dtype=None)
    assert fine.shape == (7, 32)
    with pytest.raises(ValueError, match="No prompts"):
        text_prototypes(model, tokenizer, {"ear": ["ear"], "nose": []}, CPU)


def test_prompts_cover_both_levels_and_take_description_lines():
    assert set(COARSE_CLASS_TEXTS) == set(COARSE_CLASSES) and set(FINE_CLASS_TEXTS) == set(LABELS)
    prompts = build_class_prompts(COARSE_CLASSES, COARSE_CLASS_TEXTS)
    assert prompts["vc"][1] == PROMPT_TEMPLATES[1].format("vocal cords")
    extended = add_description_prompts(
        prompts, ["ear-left", "ear-right", "nose-left", "unknown"],
        ["the tympanic membrane is intact\r\nno discharge", "no discharge", "a spur on the septum", "x"],
        label_map=LABEL_TO_COARSE,
    )
    assert extended["ear"][-2:] == ["the tympanic membrane is intact", "no discharge"]
    assert extended["nose"][-1] == "a spur on the septum"
    assert extended["throat"] == prompts["throat"] and "x" not in sum(extended.values(), [])
    assert len(prompts["ear"]) == len(COARSE_CLASS_TEXTS["ear"]) * len(PROMPT_TEMPLATES)  # input untouched


def test_coarse_of_follows_label_to_coarse():
    from utils import coarse_of
    ids = coarse_of(range(len(LABELS)))
    assert [COARSE_CLASSES[i] for i in ids] == [LABEL_TO_COARSE[name] for name in LABELS]
    fine = np.arange(35) % 7  # both levels run through the same prototype code
    feats = unit(35, 8, 0)
    coarse_protos = image_prototypes(feats, coarse_of(fine), len(COARSE_CLASSES))
    fine_protos = image_prototypes(feats, fine, len(LABELS))
    assert prototype_classify(feats, coarse_protos).shape == (35, 4)
    assert prototype_classify(feats, fine_protos).shape == (35, 7)


def test_choose_prototype_weight_prefers_the_informative_prototypes():
    g = torch.Generator().manual_seed(0)
    centres = unit(4, 16, 3)
    labels = torch.arange(4).repeat(25)
    feats = F.normalize(centres[labels] + 0.3 * torch.randn(100, 16, generator=g), dim=-1)
    noise = unit(4, 16, 9)  # prototypes unrelated to the classes
    by_image = choose_prototype_weight(feats, labels, centres, noise)
    by_text = choose_prototype_weight(feats, labels, noise, centres)
    assert by_image.weight >= 0.8 and by_text.weight <= 0.2
    at_w = by_image.table[by_image.table.weight == by_image.weight]
    assert by_image.temperature == at_w.loc[at_w.log_loss.idxmin(), "temperature"]
    assert by_image.table.macro_f1.max() == at_w.macro_f1.max()


# ----------------------------------------------------------------------------------- retrieval


def test_cosine_topk_equals_bruteforce_and_never_returns_self():
    feats = unit(23, 8, 0)
    scores, idx = cosine_topk(feats, feats, k=5, exclude_self=True, chunk_size=4)
    expected = naive_topk(feats.numpy(), feats.numpy(), 5, np.eye(23, dtype=bool))
    assert np.array_equal(idx.numpy(), expected)
    assert not (idx == torch.arange(23)[:, None]).any()
    assert torch.allclose(scores, (feats[:, None, :] * feats[idx]).sum(-1), atol=1e-6)


def test_cosine_topk_excludes_equal_ids_across_different_sets():
    gallery = unit(12, 8, 0)
    query, q_ids, g_ids = gallery[[3, 7]], ["d.png", "h.png"], [f"{ch}.png" for ch in "abcdefghijkl"]
    _, idx = cosine_topk(query, gallery, k=11, query_ids=q_ids, gallery_ids=g_ids, chunk_size=1)
    assert 3 not in idx[0].tolist() and 7 not in idx[1].tolist() and idx.shape == (2, 11)
    _, plain = cosine_topk(query, gallery, k=1)
    assert plain[:, 0].tolist() == [3, 7]  # without ids the query finds itself


def test_ties_are_broken_by_lower_gallery_index_and_scored_accordingly():
    q = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])  # 1 and 3 tie
    _, idx = cosine_topk(q, gallery, k=4)
    assert idx[0].tolist() == [1, 3, 2, 0]
    assert recall_at_k(idx, [3], 1) == 0.0 and recall_at_k(idx, [3], 2) == 1.0
    assert mean_reciprocal_rank(idx, [3]) == 0.5


def test_recall_and_mrr_hand_worked_with_several_relevant_items():
    ranked = np.array([[4, 2, 9], [1, 0, 3], [5, 6, 7]])
    relevant = [{2, 9}, 1, {8}]  # first hit at rank 2, rank 1, none
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(2 / 3)
    assert mean_reciprocal_rank(ranked, relevant) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert retrieval_hits(ranked, relevant).tolist()[0] == [False, True, True]


def test_recall_and_mrr_equal_bruteforce_on_random_data():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(30)[:10] for _ in range(50)])
    relevant = [set(rng.choice(30, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(50)]
    for k in (1, 5, 10):
        brute = np.mean([any(g in rel for g in row[:k]) for row, rel in zip(ranked, relevant)])
        assert recall_at_k(ranked, relevant, k) == pytest.approx(brute)
    rr = []
    for row, rel in zip(ranked, relevant):
        ranks = [r + 1 for r, g in enumerate(row) if g in rel]
        rr.append(1.0 / ranks[0] if ranks else 0.0)
    assert mean_reciprocal_rank(ranked, relevant) == pytest.approx(np.mean(rr))


def test_region_reranking_permutes_each_shortlist():
    feats = unit(20, 8, 0)
    scores, idx = cosine_topk(feats, feats, k=6, exclude_self=True)
    probs = torch.softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(2)) * 3, dim=1)
    s0, i0 = rerank_by_region(scores, idx, probs, probs, beta=0.0)
    assert torch.equal(i0, idx) and torch.allclose(s0, scores)
    s1, i1 = rerank_by_region(scores, idx, probs, probs, beta=5.0)
    assert torch.equal(i1.sort(dim=1).values, idx.sort(dim=1).values)
    assert (s1[:, :-1] >= s1[:, 1:]).all()
    hard = torch.eye(4)[probs.argmax(1)]  # one-hot regions: a boost of 5 > any cosine gap of 2
    _, i2 = rerank_by_region(scores, idx, hard, hard, beta=5.0)
    agree = (hard[:, None, :] * hard[i2]).sum(-1)  # (Q, K) 1 = same region
    assert (agree[:, :-1] >= agree[:, 1:]).all()


def test_choose_rerank_beta_uses_only_the_pairs_it_is_given():
    # 4 queries, shortlist of 2: the partner is ranked 2nd; region agreement points at it in "val"
    # data and away from it in "other" data, so the two choices must differ.
    scores = torch.tensor([[0.9, 0.8]] * 4)
    idx = torch.tensor([[1, 2], [0, 3], [3, 0], [2, 1]])
    q_probs = torch.eye(2)[[0, 1, 0, 1]]  # one-hot coarse regions of the queries
    g_val = torch.eye(2)[[0, 1, 0, 1]]  # ... and of the gallery: each partner shares its query's region
    relevant = [2, 3, 0, 1]
    before = (scores.clone(), idx.clone())
    beta, table = choose_rerank_beta(scores, idx, q_probs, g_val, relevant, betas=(0.0, 0.05, 0.2, 1.0))
    assert beta == 0.2 and table.loc[table.beta == 0.2, "R@1"].item() == 1.0
    assert table.loc[table.beta == 0.0, "R@1"].item() == 0.0
    assert torch.equal(scores, before[0]) and torch.equal(idx, before[1])
    other_beta, _ = choose_rerank_beta(scores, idx, q_probs, torch.eye(2)[[1, 0, 1, 0]], relevant)
    assert other_beta == 0.0  # agreement points away from the partners: no re-ranking


def test_alpha_query_expansion_is_identity_at_n0_and_pulls_towards_neighbours():
    feats = unit(10, 8, 0)
    scores, idx = cosine_topk(feats, feats, k=3, exclude_self=True)
    assert torch.allclose(alpha_query_expansion(feats, feats, scores, idx, n=0), feats, atol=1e-6)
    expanded = alpha_query_expansion(feats, feats, scores, idx, n=2, alpha=1.0)
    assert torch.allclose(expanded.norm(dim=1), torch.ones(10), atol=1e-6)
    first = feats[idx[:, 0]]
    assert ((expanded * first).sum(1) >= (feats * first).sum(1) - 1e-6).all()
    _, again = cosine_topk(expanded, feats, k=3, exclude_self=True)
    assert not (again == torch.arange(10)[:, None]).any()


def test_choose_query_expansion_picks_n_on_the_given_pairs():
    # two tight clusters of 4 views; a query's partner is a far view of its own cluster, so expanding
    # with the nearest same-cluster views pulls the query towards it
    g = torch.Generator().manual_seed(0)
    centres = unit(2, 16, 1)
    feats = F.normalize(centres[torch.arange(8) // 4] + 0.6 * torch.randn(8, 16, generator=g), dim=-1)
    scores, idx = cosine_topk(feats, feats, k=7, exclude_self=True)
    relevant = [int(row[2]) for row in idx]  # the 3rd neighbour counts as the partner
    n, table = choose_query_expansion(feats, feats, relevant, ns=(0, 1, 2), alpha=1.0, k=7, exclude_self=True)
    assert table.n.tolist() == [0, 1, 2] and table.loc[table.n == 0, "R@1"].item() == 0.0
    best = table.sort_values(["R@1", "MRR"], ascending=False, kind="stable").iloc[0]
    assert n == best.n and table.loc[table.n == n, "MRR"].item() >= table.loc[table.n == 0, "MRR"].item()


# ----------------------------------------------------------------------------------- Track 3


def test_description_queries_split_dedupe_and_collect_images():
    descriptions = [
        "The tympanic membrane is intact\r\nno discharge",
        "no discharge.\n",
        "",
        "A spur on the septum\r\n  the tympanic membrane is intact ",
    ]
    queries, relevant = description_queries(descriptions)
    assert queries == ["The tympanic membrane is intact", "no discharge", "A spur on the septum"]
    assert relevant == [{0, 3}, {0, 1}, {3}]
    assert split_finding_lines("a\r\n\r\nb\rc\n") == ["a", "b", "c"]


def test_text_to_image_ranks_the_gallery_by_text_cosine(tiny):
    model, _, tokenizer = tiny
    gallery = unit(9, 32, 0)
    scores, idx = text_to_image(model, tokenizer, ["ear", "a spur on the septum"], gallery, CPU, k=4, amp_dtype=None)
    text = embed_texts(model, tokenizer, ["ear", "a spur on the septum"], CPU, amp_dtype=None)
    assert idx.shape == (2, 4)
    assert np.array_equal(idx.numpy(), naive_topk(text.numpy(), gallery.numpy(), 4, None))


# ----------------------------------------------------------------------------------- plots


def test_retrieval_gallery_frames_hits_green_and_misses_red(image_paths):
    hits = np.array([[True, False, False], [False, False, True]])
    fig = plot_retrieval_gallery(image_paths[:2], [image_paths[2:5], image_paths[3:6]], hits, k=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 8
    colour = lambda ax: matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor())  # noqa: E731
    assert colour(fig.axes[1]) == matplotlib.colors.to_hex("tab:green")
    assert colour(fig.axes[2]) == matplotlib.colors.to_hex("tab:red")
    assert colour(fig.axes[7]) == matplotlib.colors.to_hex("tab:green")


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_projection_draws_every_class_and_prototype(method):
    feats, labels = unit(30, 8, 0), np.arange(30) % 3
    protos = image_prototypes(feats, labels, 3)
    fig = plot_embedding_projection(feats, labels, ["ear", "nose", "vc"], protos, ["P-ear", "P-nose", "P-vc"], method)
    ax = fig.axes[0]
    assert isinstance(fig, Figure) and len(ax.collections) == 6
    assert [t.get_text() for t in ax.texts] == ["P-ear", "P-nose", "P-vc"]


# ----------------------------------------------------------------------------------- offline local-dir


def write_biomedclip_shaped_folder(root: Path, text_dir_in_config: str | None) -> tuple[Path, torch.nn.Module]:
    """A tiny checkpoint folder shaped like the BiomedCLIP hub repo: open_clip_config.json (timm ViT +
    HF BERT text tower, BiomedCLIP's pooler/projection) + open_clip_pytorch_model.bin; the BERT
    config.json + vocab.txt in a sub-folder named after the hub repo, or at `text_dir_in_config`."""
    import open_clip
    from transformers import BertConfig

    hub_id = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    text_dir = Path(text_dir_in_config) if text_dir_in_config else root / "BiomedNLP-BiomedBERT-base-uncased-abstract"
    root.mkdir(parents=True, exist_ok=True)
    text_dir.mkdir(parents=True)
    words = "an endoscopic image of the ear nose throat vocal cords left right open closed a spur septum".split()
    (text_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(text_dir)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"hf_model_name": text_dir_in_config or hub_id, "hf_tokenizer_name": text_dir_in_config or hub_id,
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32},
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                         "std": [0.26862954, 0.26130258, 0.27577711]}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    build_cfg = json.loads(json.dumps(model_cfg))
    build_cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_model_pretrained=False)
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**build_cfg).eval()
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    return root, model


OFFLINE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")
    socket.socket.connect = no_network
    socket.create_connection = no_network
    socket.getaddrinfo = no_network
    import torch
    from test_clip import probe_embeddings
    from utils import embed_images, embed_texts, load_clip
    out = {}
    for folder in sys.argv[3:]:
        model, preprocess, tokenizer = load_clip("local-dir:" + folder, "cpu", cache_dir=sys.argv[1])
        img = embed_images(model, preprocess, [sys.argv[2]], "cpu", num_workers=0, amp_dtype=None, progress=False)
        txt = embed_texts(model, tokenizer, ["an endoscopic image of the left ear", "a spur"], "cpu", amp_dtype=None)
        out[folder] = {"img": img.tolist(), "txt": txt.tolist(), "tokenizer": type(tokenizer).__name__,
                       "probe": [t.tolist() for t in probe_embeddings(model)]}
    print("RESULT" + json.dumps(out))
""")


def probe_embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of fixed inputs (no preprocessing or tokenizer involved)."""
    pixels = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    tokens = torch.tensor([[2, 5, 6, 7, 8, 9, 3] + [0] * 25])
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(tokens)


def test_biomedclip_shaped_local_dir_loads_and_embeds_fully_offline(tmp_path, image_paths):
    """HF_HUB_OFFLINE + TRANSFORMERS_OFFLINE and no sockets, in a fresh interpreter: the text tower
    found in a sub-folder named after its hub repo, or at an absolute hf_model_name path."""
    sub_folder, model = write_biomedclip_shaped_folder(tmp_path / "biomedclip", None)
    abs_path, _ = write_biomedclip_shaped_folder(tmp_path / "biomedclip2", str(tmp_path / "bert_elsewhere"))
    listing = sorted(tmp_path.rglob("*"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(cache), str(image_paths[0]), str(sub_folder), str(abs_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert [p for p in sorted(tmp_path.rglob("*")) if cache not in p.parents and p != cache] == listing  # untouched
    for folder in (sub_folder, abs_path):
        got = result[str(folder)]
        img, txt = torch.tensor(got["img"]), torch.tensor(got["txt"])
        assert img.shape == (1, 16) and txt.shape == (2, 16) and got["tokenizer"] == "HFTokenizer"
        assert torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
        assert not torch.allclose(txt[0], txt[1], atol=1e-3)  # the tokenizer tells the texts apart
    saved_img, saved_txt = probe_embeddings(model)  # the weights loaded are the ones saved
    assert torch.allclose(torch.tensor(result[str(sub_folder)]["probe"][0]), saved_img, atol=1e-5)
    assert torch.allclose(torch.tensor(result[str(sub_folder)]["probe"][1]), saved_txt, atol=1e-5)


def test_local_dir_without_text_tower_files_says_what_to_put_where(tmp_path):
    folder, _ = write_biomedclip_shaped_folder(tmp_path / "biomedclip", None)
    for f in (folder / "BiomedNLP-BiomedBERT-base-uncased-abstract").iterdir():
        f.unlink()
    (folder / "BiomedNLP-BiomedBERT-base-uncased-abstract").rmdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json and vocab\.txt.*BiomedNLP-BiomedBERT"):
        load_clip(f"local-dir:{folder}", CPU, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}", CPU)
    with pytest.raises(ValueError, match="hf-hub:"):
        load_clip("ViT-B-32", CPU)


def test_fit_prototype_classifier_chooses_on_validation_and_predicts_probabilities():
    model, _, tokenizer = load_clip("tiny", "cpu")
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=1)
    y = torch.arange(60) % 3
    feats = torch.nn.functional.normalize(centers[y] + 0.3 * torch.randn(60, 32, generator=g), dim=1)
    from utils import fit_prototype_classifier
    clf = fit_prototype_classifier(model, tokenizer, "cpu", feats[:40], y[:40].tolist(), feats[40:], y[40:].tolist(),
                                   ["a", "b", "c"], {"a": ["ear"], "b": ["nose"], "c": ["throat"]},
                                   train_labels=["a", "b", "c"] * 13 + ["a"],
                                   train_descriptions=["red ear", "", "tonsils"] * 13 + [""])
    probs = clf.predict_proba(feats[40:])
    assert probs.shape == (20, 3) and torch.allclose(probs.sum(1), torch.ones(20))
    text_only = clf.table.loc[clf.table["weight"] == 0.0, "macro_f1"].max()
    assert clf.weight > 0.0 and text_only < clf.table["macro_f1"].max()  # random text alone loses
    assert (probs.argmax(1) == y[40:]).float().mean() > 0.9
    assert set(clf.table.columns) >= {"weight", "temperature", "macro_f1"}


def test_take_and_i2i_eval_set():
    import pandas as pd
    from utils import i2i_eval_set, take
    feats = torch.arange(12.0).reshape(4, 3)
    assert take(feats, {"a": 2, "b": 0}, ["b", "a"]).tolist() == [[0, 1, 2], [6, 7, 8]]
    i2i = pd.DataFrame({"query_path": ["x", "y", "z"], "match_path": ["y", "x", "x"]})
    gallery, queries, relevant = i2i_eval_set(i2i)
    assert gallery == ["x", "y", "z"] and queries == [0, 1, 2] and relevant == [{1}, {0}, {0}]


def test_evaluate_i2i_chooses_the_embedding_that_finds_partners_on_held_out_pairs():
    from utils import evaluate_i2i
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    partners = base.repeat_interleave(2, 0)  # rows 2i and 2i+1 are near-duplicates
    good = torch.nn.functional.normalize(partners + 0.05 * torch.randn(20, 16, generator=g), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
    queries = list(range(20))
    relevant = [{i ^ 1} for i in queries]
    region = torch.full((20, 4), 0.25)
    table, choice = evaluate_i2i({"noise": noise, "good": good}, region, queries, relevant, held_out=range(10), k=5)
    assert choice["embedding"] == "good" and choice["ranked"].shape == (20, 5)
    assert (choice["ranked"] != torch.arange(20)[:, None]).all()  # never the query itself
    row = table[(table.embedding == "good") & (table.pairs == "all pairs") & (table.ranking == "plain")].iloc[0]
    assert row["R@1"] == 1.0 and row["n"] == 20
