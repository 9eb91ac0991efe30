"""retrieval.py (Tracks 2 and 3): exact top-k search against a brute-force reference, region re-ranking,
Recall@k / MRR and their bootstrap intervals, the choices made on held-out pairs only (evaluate_i2i,
evaluate_t2i), the held-out images and the validation query sets, the training set of the learned
retrieval, score fusion, text-to-image ranking and the gallery figure. CPU, tiny seeded data, no network.
(retrieval.gallery_images is tested in test_data.py; the retrieval fine-tuning in test_training.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

import retrieval
import utils
from plots import plot_retrieval_gallery
from retrieval import (
    RERANK_BETA_GRID,
    caption_queries,
    choose_rerank_beta,
    cosine_topk,
    description_queries,
    evaluate_i2i,
    evaluate_t2i,
    fuse_embeddings,
    held_out_images,
    i2i_eval_set,
    rank_gallery,
    rerank_by_region,
    retrieval_hits,
    retrieval_metrics,
    retrieval_training_set,
    text_to_image,
    validation_distractors,
)
from runtime import Runtime
from utils import (
    FINE_CLASS_TEXTS,
    PROMPT_TEMPLATES,
    FeatureTable,
    embed_texts,
    exam_id,
    split_finding_lines,
    split_train_val,
)

matplotlib.use("Agg")

CPU = torch.device("cpu")
RT = Runtime(CPU, progress=False)  # fp32 on the CPU
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------- data and references


def random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    """Unit rows from numpy's generator (the same numbers on every machine)."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()


def sign_unit(n: int, d: int, seed: int, n_dup: int = 0) -> torch.Tensor:
    """Tie-heavy integer-valued rows: entries +-1 scaled by 1/sqrt(d) (d = 4, 16: a power of two), so every
    row is a unit vector and every cosine a multiple of 1/d, exact in float32 whatever the summation
    order. Few distinct values and `n_dup` copied rows make many equal scores."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], size=(n, d)) / np.sqrt(d)
    if n_dup:
        x[rng.choice(n, n_dup, replace=False)] = x[rng.choice(n, n_dup, replace=False)]
    return torch.from_numpy(x).float()


def brute_force(q: torch.Tensor, g: torch.Tensor, k: int, exclude: np.ndarray | None = None):
    """Reference, one query at a time: cosine in float64, excluded pairs dropped, a full stable sort
    (equal cosines by lower gallery index), the first k; slots left empty hold -1 and -inf."""
    qn, gn = F.normalize(q.double(), dim=1).numpy(), F.normalize(g.double(), dim=1).numpy()
    k = min(k, len(g))
    scores, indices = np.full((len(q), k), NEG_INF), np.full((len(q), k), -1)
    for i, qi in enumerate(qn):
        sims = gn @ qi
        order = [j for j in np.lexsort((np.arange(len(g)), -sims)) if exclude is None or not exclude[i, j]][:k]
        scores[i, :len(order)], indices[i, :len(order)] = sims[order], order
    return scores, indices


def min_gap(q: torch.Tensor, g: torch.Tensor) -> float:
    """Smallest distance between two cosines of one query: float32 rounding cannot swap gaps above ~1e-6."""
    sims = np.sort(F.normalize(q.double(), dim=1).numpy() @ F.normalize(g.double(), dim=1).numpy().T, axis=1)
    return float(np.diff(sims, axis=1).min())


def one_hot(regions) -> torch.Tensor:
    return torch.eye(4)[list(regions)]


# ----------------------------------------------------------------------------------- cosine_topk


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_cosine_topk_equals_brute_force(kind):
    q, g = (random_unit(23, 8, 0), random_unit(37, 8, 1)) if kind == "random" else \
           (sign_unit(23, 4, 0, n_dup=5), sign_unit(37, 4, 1, n_dup=9))
    if kind == "random":
        assert min_gap(q, g) > 1e-5  # no near-ties: the order is the same in float32 on any CPU
    for k in (1, 5, 37, 50):  # 50 > gallery: every row, best first
        scores, idx = cosine_topk(q, g, k)
        ref_s, ref_i = brute_force(q, g, k)
        assert idx.shape == scores.shape == (23, min(k, 37)) and idx.dtype == torch.long
        assert np.array_equal(idx.numpy(), ref_i), k
        if kind == "ties":
            assert np.array_equal(scores.numpy(), ref_s.astype(np.float32))  # exact values
        else:
            assert np.allclose(scores.numpy(), ref_s, atol=1e-6)
    if kind == "ties":
        assert len(np.unique(brute_force(q, g, 37)[0])) <= 5  # the data really is tie-heavy


def test_cosine_topk_ranks_query_blocks_like_one_search():
    """Queries are scored in blocks of 2^24 // gallery rows: 1.2M queries on 16 rows span two blocks (the
    second one partial). The queries hold only 16 distinct vectors and 20 ids, so each (vector, id) pair
    gets the naive reference once, and every query's answer must equal its pair's."""
    n_g, n_ids = 16, 20
    n_q = 2**24 // n_g + 2**17 + 3
    g, q = sign_unit(n_g, 4, 0), sign_unit(n_q, 4, 1)
    gallery_ids = list(range(13)) + [13, 13, 13]  # rows 13-15: one content
    query_ids = np.random.default_rng(2).integers(0, n_ids, n_q)  # ids 14-19 exclude nothing
    scores, idx = cosine_topk(q, g, 20, query_ids.tolist(), gallery_ids)
    assert idx.shape == scores.shape == (n_q, n_g)

    vectors = torch.tensor([[1 if b & (1 << j) else -1 for j in range(4)] for b in range(16)]) / 2.0
    combo = ((q > 0).long() * torch.tensor([1, 2, 4, 8])).sum(1) * n_ids + torch.from_numpy(query_ids)
    used = combo.unique()
    assert len(used) == 16 * n_ids  # every vector with every id occurs
    ref_s, ref_i = torch.empty(16 * n_ids, n_g), torch.empty(16 * n_ids, n_g, dtype=torch.long)
    for c in used.tolist():
        exclude = np.array([[gallery_ids[j] == c % n_ids for j in range(n_g)]])
        s, i = brute_force(vectors[c // n_ids][None], g, n_g, exclude)
        ref_s[c], ref_i[c] = torch.from_numpy(s).float(), torch.from_numpy(i)
    assert torch.equal(idx, ref_i[combo]) and torch.equal(scores, ref_s[combo])  # exact: cosines are k / 4
    assert (idx[query_ids == 13, -3:] == -1).all()  # three rows of content 13 excluded: three empty slots
    assert not (idx[query_ids >= 14] == -1).any()


def test_cosine_topk_never_returns_the_query_or_a_copy_of_its_content():
    g = random_unit(30, 8, 3)
    g[[4, 11, 20]] = g[7].clone()  # four files of one content
    ids = [f"sha{i}" for i in range(30)]
    for j in (4, 11, 20):
        ids[j] = ids[7]
    queries = [7, 0, 11, 25]
    _, plain = cosine_topk(g[queries], g, 1)
    assert plain[:, 0].tolist() == [4, 0, 4, 25]  # without ids a query finds itself (or a copy, lower index)
    scores, idx = cosine_topk(g[queries], g, 30, [ids[j] for j in queries], ids)
    exclude = np.array([[ids[a] == ids[b] for b in range(30)] for a in queries])
    ref_s, ref_i = brute_force(g[queries], g, 30, exclude)
    assert np.array_equal(idx.numpy(), ref_i) and np.allclose(scores.numpy(), ref_s, atol=1e-6)
    for row, j in zip(idx.tolist(), queries):
        kept = [b for b in row if b >= 0]
        assert all(ids[b] != ids[j] for b in kept)
        assert len(kept) == 30 - exclude[queries.index(j)].sum()  # everything else is still ranked
    assert (idx[[0, 2], -4:] == -1).all() and (scores[[0, 2], -4:] == NEG_INF).all()


def test_cosine_topk_fully_excluded_query_gets_minus_one_and_minus_inf():
    g = random_unit(3, 4, 4)
    scores, idx = cosine_topk(g[:2], g, 5, ["a", "b"], ["a", "a", "a"])
    assert idx.shape == (2, 3)  # k clipped to the gallery
    assert idx[0].tolist() == [-1, -1, -1] and (scores[0] == NEG_INF).all()
    assert sorted(idx[1].tolist()) == [0, 1, 2] and torch.isfinite(scores[1]).all()


def test_cosine_topk_empty_queries_and_gallery():
    g = random_unit(6, 4, 5)
    for ids in ((None, None), ([], [f"x{i}" for i in range(6)])):
        scores, idx = cosine_topk(g[:0], g, 4, *ids)
        assert scores.shape == idx.shape == (0, 4) and idx.dtype == torch.long
    scores, idx = cosine_topk(g, g[:0], 4)
    assert scores.shape == idx.shape == (6, 0)


# ----------------------------------------------------------------------------------- region re-ranking


def shortlist(n: int = 20, k: int = 6, seed: int = 0):
    feats = random_unit(n, 8, seed)
    scores, idx = cosine_topk(feats, feats, k, list(range(n)), list(range(n)))
    return feats, scores, idx


def test_rerank_by_region_permutes_each_shortlist_and_adds_beta_times_agreement():
    _, scores, idx = shortlist()
    probs = torch.softmax(torch.from_numpy(np.random.default_rng(1).standard_normal((20, 4)) * 3).float(), dim=1)
    before = (scores.clone(), idx.clone())
    for beta in (0.05, 0.3, 5.0):
        s, i = rerank_by_region(scores, idx, probs, probs, beta)
        assert torch.equal(i.sort(dim=1).values, idx.sort(dim=1).values)  # same candidates
        assert (s[:, :-1] >= s[:, 1:]).all()  # best first
        for q in range(20):  # naive: each candidate's score + beta * P(same region)
            new = {int(c): float(sc) + beta * float(probs[q] @ probs[c]) for sc, c in zip(scores[q], idx[q])}
            assert np.allclose(s[q].numpy(), [new[int(c)] for c in i[q]], atol=1e-5)
    assert torch.equal(scores, before[0]) and torch.equal(idx, before[1])  # inputs untouched


def test_rerank_by_region_beta_zero_keeps_the_order():
    _, scores, idx = shortlist()
    probs = torch.softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    s, i = rerank_by_region(scores, idx, probs, probs, 0.0)
    assert torch.equal(i, idx) and torch.equal(s, scores)
    scores_tied = torch.full_like(scores, 0.5)  # equal scores keep their previous order
    assert torch.equal(rerank_by_region(scores_tied, idx, probs, probs, 0.0)[1], idx)


def test_rerank_by_region_large_beta_puts_same_region_candidates_first():
    _, scores, idx = shortlist()
    region = one_hot(np.random.default_rng(3).integers(0, 4, 20))
    _, i = rerank_by_region(scores, idx, region, region, 5.0)  # 5 > any cosine gap (at most 2)
    agree = (region[:, None, :] * region[i]).sum(-1)  # (Q, K): 1 = same region
    assert (agree[:, :-1] >= agree[:, 1:]).all()
    assert agree.any(1).sum() > 5 and not agree.all(1).all()  # the data has both kinds
    for q in range(20):  # within each group the cosine order is kept
        pos = {int(c): j for j, c in enumerate(idx[q])}
        for group in (i[q][agree[q] == 1], i[q][agree[q] == 0]):
            ranks = [pos[int(c)] for c in group]
            assert ranks == sorted(ranks)


def test_rerank_by_region_keeps_empty_slots_last():
    g = random_unit(5, 8, 4)
    ids = ["a", "a", "b", "c", "d"]
    scores, idx = cosine_topk(g[[0, 2]], g, 5, ["a", "b"], ids)  # query 0 loses 2 rows, query 1 one
    region = one_hot([0, 1, 2, 2, 1])
    s, i = rerank_by_region(scores, idx, region[[0, 2]], region, 5.0)
    assert i[0, -2:].tolist() == [-1, -1] and (s[0, -2:] == NEG_INF).all()
    assert i[1, -1].item() == -1 and s[1, -1].item() == NEG_INF
    assert sorted(i[0, :3].tolist()) == [2, 3, 4] and torch.isfinite(s[0, :3]).all()
    assert i[1, 0].item() == 3  # the only candidate of the query's region (2), first
    assert sorted(i[1, :4].tolist()) == [0, 1, 3, 4]


def test_rank_gallery_is_cosine_topk_then_reranking():
    feats, _, _ = shortlist()
    ids = [f"sha{i}" for i in range(20)]
    ids[5] = ids[3]  # a duplicate content
    region = torch.softmax(torch.from_numpy(np.random.default_rng(5).standard_normal((20, 4)) * 3).float(), dim=1)
    q = [3, 8, 11]
    scores, plain = cosine_topk(feats[q], feats, 7, [ids[j] for j in q], ids)
    assert torch.equal(rank_gallery(feats[q], feats, [ids[j] for j in q], ids, 7), plain)
    assert torch.equal(rank_gallery(feats[q], feats, [ids[j] for j in q], ids, 7, region[q], region, 0.0), plain)
    ranked = rank_gallery(feats[q], feats, [ids[j] for j in q], ids, 7, region[q], region, 0.5)
    assert torch.equal(ranked, rerank_by_region(scores, plain, region[q], region, 0.5)[1])
    for row, j in zip(ranked.tolist(), q):
        assert all(ids[b] != ids[j] for b in row)  # never the query's own content
    assert 5 not in ranked[0].tolist() and 3 not in ranked[0].tolist()


# ----------------------------------------------------------------------------------- Recall@k, MRR


def test_retrieval_metrics_hand_worked_with_several_relevant_items():
    ranked = np.array([[4, 2, 9, 0, 1],     # relevant {2, 9}: first hit at rank 2
                       [1, 0, 3, 5, 6],     # {1, 3}: rank 1
                       [5, 6, 7, 8, 0],     # {0}: rank 5
                       [3, -1, -1, -1, -1],  # {7}: missed, empty slots
                       [2, 3, 4, 5, 6]])    # no relevant item: a miss
    relevant = [{2, 9}, {1, 3}, {0}, {7}, set()]
    assert retrieval_hits(ranked, relevant)[0].tolist() == [False, True, True, False, False]
    assert retrieval_hits(ranked, relevant)[1].tolist() == [True, False, True, False, False]
    m = retrieval_metrics(ranked, relevant)
    assert set(m) == {"R@1", "R@5", "R@10", "MRR"}
    assert m["R@1"] == pytest.approx(1 / 5) and m["R@5"] == pytest.approx(3 / 5) and m["R@10"] == pytest.approx(3 / 5)
    assert m["MRR"] == pytest.approx((0.5 + 1.0 + 0.2 + 0.0 + 0.0) / 5)
    assert retrieval_metrics(torch.from_numpy(ranked), relevant, ks=(2,)) == pytest.approx({"R@2": 2 / 5, "MRR": 0.34})


def test_retrieval_metrics_equal_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(30)[:10] for _ in range(60)])
    ranked[rng.random(ranked.shape) < 0.1] = -1  # some empty slots
    relevant = [set(rng.choice(30, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(60)]
    m = retrieval_metrics(ranked, relevant, ks=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        brute = np.mean([any(g in rel for g in row[:k]) for row, rel in zip(ranked, relevant)])
        assert m[f"R@{k}"] == pytest.approx(brute)
    rr = []
    for row, rel in zip(ranked, relevant):
        ranks = [r + 1 for r, g in enumerate(row) if g in rel]
        rr.append(1.0 / ranks[0] if ranks else 0.0)
    assert m["MRR"] == pytest.approx(np.mean(rr))
    hits = retrieval_hits(ranked, relevant)
    assert hits.shape == ranked.shape and not hits[ranked == -1].any()


def test_empty_slots_never_hit_and_queries_without_relevant_items_are_misses():
    ranked = torch.tensor([[-1, -1, -1], [2, -1, -1], [-1, -1, -1]])
    relevant = [{0, 1, 2}, set(), {29}]  # 29: a 30-row gallery's last row, where index -1 would wrap to
    assert not retrieval_hits(ranked, relevant).any()
    assert retrieval_metrics(ranked, relevant) == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "MRR": 0.0}


def test_retrieval_metrics_of_empty_rankings_count_every_query_as_a_miss():
    # an empty gallery gives empty rankings [Q, 0] (cosine_topk clips k): no query finds anything
    ranked = cosine_topk(random_unit(3, 4, 0), torch.empty(0, 4), 10)[1]
    assert ranked.shape == (3, 0) and retrieval_hits(ranked, [{1}, {2}, {3}]).shape == (3, 0)
    assert retrieval_metrics(ranked, [{1}, {2}, {3}]) == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "MRR": 0.0}


def test_retrieval_metrics_of_no_queries_are_nan_and_lengths_must_match():
    for ranked in (torch.empty(0, 5, dtype=torch.long), np.empty((0, 0), dtype=int), []):
        m = retrieval_metrics(ranked, [], ks=(1, 5))
        assert set(m) == {"R@1", "R@5", "MRR"} and all(np.isnan(v) for v in m.values())
    with pytest.raises(ValueError, match="one per query"):
        retrieval_hits(np.array([[0, 1]]), [{0}, {1}])


# ----------------------------------------------------------------------------------- choose_rerank_beta


def test_choose_rerank_beta_uses_only_the_pairs_it_is_given():
    """Gallery rows 0-3 serve the "val" queries, 4-7 the "other" ones. Each shortlist holds the partner
    second (0.9 vs 0.75): region agreement points at it for val and away from it for other, so the
    choices differ, and changing the other pairs' data leaves the val choice alone."""
    scores = torch.tensor([[0.9, 0.75]] * 4)
    val_idx = torch.tensor([[1, 2], [0, 3], [3, 0], [2, 1]])
    q_region = one_hot([0, 1, 0, 1])
    val_rel = [{2}, {3}, {0}, {1}]
    g_region = one_hot([0, 1, 0, 1, 1, 0, 1, 0])  # val: partners share the query's region, other: the rest
    before = tuple(t.clone() for t in (scores, val_idx, q_region, g_region))
    beta, table = choose_rerank_beta(scores, val_idx, q_region, g_region, val_rel)
    # 0.75 + beta beats 0.9 for beta > 0.15: every beta from 0.2 on, the smallest chosen
    assert beta == 0.2
    assert table["beta"].tolist() == list(RERANK_BETA_GRID) and {"R@1", "R@5", "MRR"} <= set(table.columns)
    assert table.loc[table.beta == 0.2, "R@1"].item() == 1.0 and table.loc[table.beta == 0.0, "R@1"].item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, (scores, val_idx, q_region, g_region)))

    other_idx, other_rel = val_idx + 4, [{r + 4 for r in rel} for rel in val_rel]
    assert choose_rerank_beta(scores, other_idx, q_region, g_region, other_rel)[0] == 0.0  # agreement misleads
    for seed in range(3):  # other pairs' regions changed: the val choice is the same
        changed = g_region.clone()
        changed[4:] = one_hot(np.random.default_rng(seed).integers(0, 4, 4))
        again, again_table = choose_rerank_beta(scores, val_idx, q_region, changed, val_rel)
        assert again == 0.2 and again_table.equals(table)


def test_choose_rerank_beta_prefers_r1_then_mrr_then_the_smallest_beta():
    # query A: partner first; a same-region item overtakes it for beta >= 0.2 (0.75 + beta > 0.9).
    # queries B, C: partner sixth; it passes one item at beta 0.1 (rank 5) and all four at beta >= 0.2
    # (rank 2), behind the first, which shares the region too. Best MRR: beta >= 0.2; best R@1: <= 0.1.
    scores = torch.tensor([[0.9, 0.75, -0.5, -0.5, -0.5, -0.5], [1.0, 0.6, 0.58, 0.56, 0.54, 0.45],
                           [1.0, 0.6, 0.58, 0.56, 0.54, 0.45]])
    idx = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11]])
    g_region = one_hot([0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1])
    q_region = one_hot([1, 1, 1])
    relevant = [{0}, {11}, {11}]
    beta, table = choose_rerank_beta(scores, idx, q_region, g_region, relevant)
    t = table.set_index("beta")
    assert t.loc[0.0, "R@1"] == pytest.approx(1 / 3) and t.loc[0.0, "MRR"] == pytest.approx((1 + 1 / 6 + 1 / 6) / 3)
    assert t.loc[0.1, "MRR"] == pytest.approx((1 + 0.2 + 0.2) / 3)
    assert t.loc[0.2, "R@1"] == 0.0 and t.loc[0.2, "MRR"] == pytest.approx(0.5)
    assert t.loc[0.2, "MRR"] > t.loc[0.1, "MRR"]
    assert beta == 0.1  # R@1 first, then MRR
    uniform = torch.full((12, 4), 0.25)  # no region information: every beta ties, the smallest wins
    assert choose_rerank_beta(scores, idx, uniform[:3], uniform, relevant)[0] == min(RERANK_BETA_GRID)


# ----------------------------------------------------------------------------------- Track 2 validation


def test_i2i_eval_set_gallery_queries_and_relevant_partners():
    i2i = pd.DataFrame({"query_path": ["b", "a", "c", "a", "d"], "match_path": ["a", "b", "a", "e", "d"]})
    gallery, queries, relevant = i2i_eval_set(i2i, distractors=["z", "a", "y", "z", "e"])
    assert gallery == ["a", "b", "c", "d", "e", "y", "z"]  # pair images, then new distractors, once each
    assert len(set(gallery)) == len(gallery)
    assert [gallery[q] for q in queries] == ["a", "b", "c"]  # "d" -> "d" finds nothing but itself: no query
    assert relevant == [{1, 4}, {0}, {0}]  # a -> b and e, b -> a, c -> a
    for q, m in zip(i2i.query_path, i2i.match_path):  # every pair's partner is relevant to its query
        if q != m:
            assert gallery.index(m) in relevant[queries.index(gallery.index(q))]
    assert i2i_eval_set(i2i)[0] == ["a", "b", "c", "d", "e"]


def test_validation_distractors_copy_the_test_gallery_to_query_ratio():
    candidates = [f"img{i:02d}.png" for i in range(50)]
    # test: 35 gallery images for 7 queries (5x); 10 pair images need 40 more to be 5x their count
    picked = validation_distractors(candidates, 10, 35, 7, seed=0)
    assert len(picked) == round(10 * (35 / 7 - 1)) == 40
    assert len(set(picked)) == 40 and set(picked) <= set(candidates)
    pairs = pd.DataFrame({"query_path": [f"p{i}" for i in range(10)], "match_path": [f"p{i ^ 1}" for i in range(10)]})
    gallery, queries, _ = i2i_eval_set(pairs, picked)
    assert len(gallery) / len(queries) == pytest.approx(35 / 7)
    assert len(validation_distractors(candidates, 12, 30, 9, seed=0)) == round(12 * (30 / 9 - 1)) == 28
    assert validation_distractors(candidates, 10, 35, 7, seed=0) == picked  # seeded
    assert validation_distractors(candidates[::-1], 10, 35, 7, seed=0) == picked  # input order does not matter
    assert validation_distractors(candidates, 10, 35, 7, seed=1) != picked
    assert validation_distractors(candidates, 10, 0, 0, seed=0) == candidates  # no test list: all of them
    assert validation_distractors(candidates, 10, 1000, 7, seed=0) == candidates  # more than there are: all
    assert validation_distractors(candidates, 10, 7, 7, seed=0) == []  # the test gallery is just its queries


def clusters(groups: list[list[int]], n: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """Unit rows: the images of each group near one random direction of their own (near-duplicates)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 32))
    for group in groups:
        centre = rng.standard_normal(32)
        for i in group:
            x[i] = centre + noise * rng.standard_normal(32)
    return F.normalize(torch.from_numpy(x).float(), dim=1)


# 12 images in 6 two-way pairs (2i, 2i + 1); every image is a query, its partner relevant. The first two
# pairs (queries 0-3) are held out. "held_out_wins" groups the held-out pairs right and the others wrong
# (each with a neighbour of another pair); "others_win" the opposite, so it wins on all pairs (8 vs 4).
N_IMG = 12
IDS = [f"sha{i}" for i in range(N_IMG)]
RELEVANT = [{i ^ 1} for i in range(N_IMG)]
HELD_OUT = [0, 1, 2, 3]
FEATS = {"others_win": clusters([[0, 3], [1, 2], [4, 5], [6, 7], [8, 9], [10, 11]], N_IMG, 0),
         "held_out_wins": clusters([[0, 1], [2, 3], [5, 6], [7, 8], [9, 10], [11, 4]], N_IMG, 1)}


def row(table: pd.DataFrame, embedding: str, pairs: str, ranking: str) -> pd.Series:
    found = table[(table.embedding == embedding) & (table.pairs == pairs) & (table.ranking == ranking)]
    assert len(found) == 1
    return found.iloc[0]


def test_evaluate_i2i_chooses_the_embedding_that_finds_partners_on_held_out_pairs():
    g = torch.Generator().manual_seed(0)
    partners = F.normalize(torch.randn(10, 16, generator=g), dim=1).repeat_interleave(2, 0)  # 2i ~ 2i + 1
    good = F.normalize(partners + 0.05 * torch.randn(20, 16, generator=g), dim=1)
    noise = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    ids = [f"sha{i}" for i in range(20)]
    relevant = [{i ^ 1} for i in range(20)]
    table, choice = evaluate_i2i({"noise": noise, "good": good}, ids, range(20), relevant, range(10),
                                 torch.full((20, 4), 0.25), k=5)
    assert choice["embedding"] == "good" and "10 held-out pairs" in choice["chosen_on"]
    assert {"embedding", "pairs", "ranking", "beta", "n", "R@1", "R@5", "R@10", "MRR"} <= set(table.columns)
    good = row(table, "good", "all pairs", "plain")
    assert good["R@1"] == 1.0 and good["n"] == 20
    assert row(table, "good", "held-out pairs (choice)", "plain")["n"] == 10
    assert row(table, "noise", "held-out pairs (choice)", "region re-rank")["R@1"] < 0.5


def test_evaluate_i2i_chooses_on_held_out_pairs_not_on_all_pairs():
    table, choice = evaluate_i2i(FEATS, IDS, range(N_IMG), RELEVANT, HELD_OUT, torch.full((N_IMG, 4), 0.25))
    # the data does what it says: on all pairs "others_win" is better, on the held-out ones the other
    assert row(table, "others_win", "all pairs", "plain")["R@1"] == pytest.approx(8 / 12)
    assert row(table, "held_out_wins", "all pairs", "plain")["R@1"] == pytest.approx(4 / 12)
    assert row(table, "held_out_wins", "held-out pairs (choice)", "region re-rank")["R@1"] == 1.0
    assert row(table, "others_win", "held-out pairs (choice)", "region re-rank")["R@1"] == 0.0
    assert choice["embedding"] == "held_out_wins"  # a choice on all pairs would leak: "others_win"


def test_evaluate_i2i_choice_ignores_every_pair_outside_choose_on():
    feats = {"a": random_unit(N_IMG, 16, 7), "b": FEATS["held_out_wins"], "c": random_unit(N_IMG, 16, 8)}
    region = torch.softmax(torch.from_numpy(np.random.default_rng(9).standard_normal((N_IMG, 4)) * 4).float(), dim=1)
    table, choice = evaluate_i2i(feats, IDS, range(N_IMG), RELEVANT, HELD_OUT, region)
    held = table[table.pairs == "held-out pairs (choice)"].reset_index(drop=True)
    for seed in range(4):  # other queries' partners re-drawn: nothing chosen changes
        rng = np.random.default_rng(seed)
        other_rel = RELEVANT[:4] + [set(rng.choice(N_IMG, 2, replace=False).tolist()) - {q} for q in range(4, N_IMG)]
        table2, choice2 = evaluate_i2i(feats, IDS, range(N_IMG), other_rel, HELD_OUT, region)
        assert choice2 == choice
        assert table2[table2.pairs == "held-out pairs (choice)"].reset_index(drop=True).equals(held)


def test_evaluate_i2i_without_held_out_pairs_chooses_on_all_pairs_and_says_so():
    table, choice = evaluate_i2i(FEATS, IDS, range(N_IMG), RELEVANT, [], torch.full((N_IMG, 4), 0.25))
    assert choice["embedding"] == "others_win"  # the best on all pairs
    assert "all 12 pairs" in choice["chosen_on"] and "none held out" in choice["chosen_on"]
    labels = set(table.pairs)
    assert len(labels) == 1 and not any("held-out" in p for p in labels)
    (label,) = labels
    assert label.startswith("all pairs") and "choice" in label
    assert (table.n == N_IMG).all() and len(table) == 2 * 2  # 2 embeddings x (plain, re-ranked)


def test_evaluate_i2i_with_no_queries_returns_an_empty_table_and_a_default_choice():
    table, choice = evaluate_i2i(FEATS, IDS, [], [], [], torch.full((N_IMG, 4), 0.25))
    assert isinstance(table, pd.DataFrame) and table.empty
    assert choice["embedding"] == "others_win" and choice["beta"] == 0.0 and choice["chosen_on"]


def test_evaluate_i2i_without_regions_does_not_rerank():
    table, choice = evaluate_i2i(FEATS, IDS, range(N_IMG), RELEVANT, HELD_OUT, None)
    assert choice["beta"] == 0.0 and (table.beta == 0.0).all()
    metrics = ["R@1", "R@5", "R@10", "MRR"]
    plain = table[table.ranking == "plain"].reset_index(drop=True)
    reranked = table[table.ranking == "region re-rank"].reset_index(drop=True)
    assert plain[metrics].equals(reranked[metrics])
    assert choice["embedding"] == "held_out_wins"


# ----------------------------------------------------------------------------------- Track 3


def test_description_queries_split_dedupe_and_collect_images():
    descriptions = [
        "The tympanic membrane is intact\r\nno discharge",
        "No  discharge.\n",
        "",
        "A spur on the septum\r\n  the tympanic membrane is intact ",
        "no discharge;\rA spur on the septum",
    ]
    queries, relevant = description_queries(descriptions)
    assert queries == ["The tympanic membrane is intact", "no discharge", "A spur on the septum"]  # first spelling
    assert relevant == [{0, 3}, {0, 1, 4}, {3, 4}]
    assert split_finding_lines("a\r\n\r\nb\rc\n") == ["a", "b", "c"]
    assert description_queries([]) == ([], []) and description_queries(["", "  "]) == ([], [])


def t2i_table(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"text": [t for t, _ in pairs], "file": [p for _, p in pairs],
                         "path": [f"/d/{p}" for _, p in pairs],
                         "source": "train"})


def test_caption_queries_point_at_their_images_in_the_gallery():
    t2i = t2i_table([("Ear wax", "c.png"), ("Septal spur", "z.png"), ("Nasal polyp", "a.png")])
    gallery = ["/d/a.png", "/d/b.png", "/d/c.png"]
    queries, relevant = caption_queries(t2i, gallery)
    assert queries == ["Ear wax", "Nasal polyp"] and relevant == [{2}, {0}]  # z.png is not in the gallery
    assert caption_queries(t2i.iloc[:0], gallery) == ([], [])


def test_caption_queries_dedupe_captions_and_collect_every_image_carrying_one():
    # one caption on several images (any of them answers it), one image under two spellings of a caption,
    # a caption of two finding lines
    t2i = t2i_table([("Nasal polyp", "a.png"), ("nasal  polyp.", "b.png"), ("Ear wax", "c.png"),
                     ("ear wax", "c.png"), ("Pus\nRed mucosa", "d.png"), ("Septal spur", "z.png")])
    gallery = ["/d/a.png", "/d/b.png", "/d/c.png", "/d/d.png"]
    queries, relevant = caption_queries(t2i, gallery)
    assert queries == ["Nasal polyp", "Ear wax", "Pus", "Red mucosa"]
    assert relevant == [{0, 1}, {2}, {3}, {3}]


@pytest.fixture(scope="module")
def tiny_clip() -> utils.Clip:
    return utils.load_clip("tiny", CPU)


def test_text_to_image_ranks_the_gallery_by_text_cosine(tiny_clip):
    texts = ["ear", "a spur on the septum", "vocal cords open"]
    text = embed_texts(tiny_clip, texts, RT)  # the very computation text_to_image makes
    gallery = torch.cat([random_unit(6, text.shape[1], 0), text[[2, 0, 1]]])  # each text's own vector: rows 7, 8, 6
    ranked = text_to_image(tiny_clip, texts, gallery, RT, k=4)
    assert ranked.shape == (3, 4) and ranked.dtype == torch.long
    assert ranked[:, 0].tolist() == [7, 8, 6]
    sims = text.double() @ gallery.double().T
    best = sims.sort(dim=1, descending=True).values[:, :4]
    assert torch.allclose(sims.gather(1, ranked), best, atol=1e-5)  # the 4 highest cosines, best first
    assert text_to_image(tiny_clip, texts, gallery, RT, k=20).shape == (3, 9)


# ----------------------------------------------------------------------------------- figure


def test_plot_retrieval_gallery_frames_hits_green_and_misses_red(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(paths[-1])
    hits = np.array([[True, False, False], [False, False, True]])
    fig = plot_retrieval_gallery(paths[:2], [paths[2:5], paths[3:6]], hits, k=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4
    hexcolor = matplotlib.colors.to_hex
    colours = [{hexcolor(s.get_edgecolor()) for s in ax.spines.values()} for ax in fig.axes]
    assert all(len(c) == 1 for c in colours)  # the whole frame one colour
    green, red, blue = hexcolor("tab:green"), hexcolor("tab:red"), hexcolor("tab:blue")
    assert [c.pop() for c in colours] == [blue, green, red, red, blue, red, red, green]
    assert all(ax.images for ax in fig.axes)


# ----------------------------------------------------------------------------------- gaps found by mutation testing


def test_retrieval_hits_keep_the_ranking_shape_and_bool_dtype_when_empty():
    for ranked, relevant in ((np.zeros((0, 5), dtype=int), []), (np.zeros((2, 0), dtype=int), [{1}, {2}])):
        hits = retrieval_hits(ranked, relevant)
        assert hits.shape == ranked.shape and hits.dtype == bool
    assert retrieval_hits(torch.tensor([[3, 1]]), [{1}]).tolist() == [[False, True]]


def test_choose_rerank_beta_table_holds_r1_r5_and_mrr_per_beta():
    scores, idx = torch.tensor([[0.9, 0.8]]), torch.tensor([[0, 1]])
    _, table = choose_rerank_beta(scores, idx, one_hot([0]), one_hot([1, 0]), [{1}])
    assert list(table.columns) == ["beta", "R@1", "R@5", "MRR"]


def test_rankings_hold_ten_images_per_query_by_default(tiny_clip):
    feats = random_unit(30, 8, 0)
    ids = [f"sha{i}" for i in range(30)]
    assert rank_gallery(feats[:3], feats, ids[:3], ids).shape == (3, 10)  # R@10 needs ten
    gallery = random_unit(30, embed_texts(tiny_clip, ["ear"], RT).shape[1], 1)
    assert text_to_image(tiny_clip, ["ear", "nose"], gallery, RT).shape == (2, 10)


def test_rerank_by_region_keeps_tied_candidates_in_shortlist_order_in_long_shortlists():
    # 40 candidates in 4 tied blocks: torch's unstable sort reorders ties from 17 elements on
    idx = torch.arange(40).flip(0)[None]
    scores = torch.tensor([0.9] * 10 + [0.8] * 10 + [0.7] * 10 + [0.6] * 10)[None]
    region = torch.full((40, 4), 0.25)  # every candidate agrees equally: only ties
    s, i = rerank_by_region(scores, idx, region[:1], region, 0.3)
    assert torch.equal(i, idx) and torch.allclose(s, scores + 0.3 * 0.25)


def _gram_rows(gram: np.ndarray) -> torch.Tensor:
    """Unit rows whose cosines are the given Gram matrix (symmetric, PSD, unit diagonal)."""
    w, v = np.linalg.eigh(gram)
    return torch.from_numpy(v * np.sqrt(np.clip(w, 0, None))).float()


# Six images in three pairs (0, 1), (2, 3), (4, 5); regions 0, 0, 0, 0, 1, 1 (pairs share their region).
# Both embeddings find pair (2, 3) or (4, 5) plainly and rank the other queries' partners second (0.8) behind
# a decoy (0.87): "same" behind one of their own region, which re-ranking cannot move (R@1 2/6 either way);
# "cross" behind one of the other region, which re-ranking with beta > 0.07 moves below the partner (R@1 1);
# no grid value ties the two, so no float rounding decides the choice.
# Plainly the two tie, and "same" comes first.
SIX_REGION = one_hot([0, 0, 0, 0, 1, 1])
SIX_RELEVANT = [{i ^ 1} for i in range(6)]


def _six(pairs_to: dict[tuple[int, int], float]) -> torch.Tensor:
    gram = np.full((6, 6), 0.3)
    np.fill_diagonal(gram, 1.0)
    for (i, j), c in pairs_to.items():
        gram[i, j] = gram[j, i] = c
    assert np.linalg.eigvalsh(gram).min() > 0.01  # real vectors have these cosines
    return _gram_rows(gram)


SIX = {"same": _six({(0, 1): 0.8, (2, 3): 0.8, (4, 5): 0.8, (0, 2): 0.87, (1, 3): 0.87, (0, 3): 0.7, (1, 2): 0.7}),
       "cross": _six({(0, 1): 0.8, (2, 3): 0.8, (4, 5): 0.8, (0, 4): 0.87, (1, 5): 0.87, (0, 5): 0.7, (1, 4): 0.7})}


@pytest.mark.parametrize("held_out", [[0, 1, 2, 3, 4, 5], []])
def test_evaluate_i2i_applies_the_chosen_region_reranking_and_chooses_by_it(held_out):
    table, choice = evaluate_i2i(SIX, [f"sha{i}" for i in range(6)], range(6), SIX_RELEVANT, held_out, SIX_REGION)
    subset = table.pairs.iloc[0]
    for name in SIX:
        assert row(table, name, subset, "plain")[["R@1", "MRR"]].tolist() == pytest.approx([2 / 6, 4 / 6])
    assert row(table, "cross", subset, "region re-rank")["R@1"] == 1.0
    assert row(table, "same", subset, "region re-rank")["R@1"] == pytest.approx(2 / 6)
    assert row(table, "cross", subset, "region re-rank")["beta"] == 0.1  # the smallest grid value above 0.07
    assert {f"{m}_{end}" for m in ("R@1", "R@5", "R@10", "MRR") for end in ("low", "high")} <= set(table.columns)
    ids = [f"sha{i}" for i in range(6)]
    plain = rank_gallery(SIX["same"], SIX["same"], ids, ids)  # the plain ranking, intervals of 1,000 resamples
    expected = retrieval_metrics(plain, SIX_RELEVANT, n_boot=1000)
    assert row(table, "same", subset, "plain")[list(expected)].tolist() == list(expected.values())
    assert choice == {"embedding": "cross", "beta": 0.1,  # by the re-ranked rows, not the plain ones
                      "chosen_on": "6 held-out pairs" if held_out else "all 6 pairs (none held out)"}


def test_evaluate_i2i_intervals_are_those_of_1000_resampled_queries():
    feats, ids = random_unit(40, 8, 3), [f"sha{i}" for i in range(40)]  # random pairs: ranks all over the list
    relevant = [{i ^ 1} for i in range(40)]
    table, _ = evaluate_i2i({"random": feats}, ids, range(40), relevant, [])
    plain = rank_gallery(feats, feats, ids, ids)
    got = table[table.ranking == "plain"].iloc[0]
    expected = retrieval_metrics(plain, relevant, n_boot=1000)
    assert expected != retrieval_metrics(plain, relevant, n_boot=1001)  # these queries tell the two apart
    assert got[list(expected)].tolist() == list(expected.values())


def test_evaluate_i2i_chooses_by_the_choice_pairs_even_when_another_embedding_wins_on_all_pairs():
    # others_win: held-out R@1 0, all pairs 8/12; half: held-out 2/4, all 2/12. The choice rows say "half".
    feats = {"others_win": FEATS["others_win"],
             "half": clusters([[0, 1], [2, 11], [3, 10], [5, 6], [7, 8], [9, 4]], N_IMG, 5)}
    table, choice = evaluate_i2i(feats, IDS, range(N_IMG), RELEVANT, HELD_OUT, torch.full((N_IMG, 4), 0.25))
    assert row(table, "others_win", "all pairs", "region re-rank")["R@1"] == pytest.approx(8 / 12)
    assert row(table, "half", "held-out pairs (choice)", "region re-rank")["R@1"] == 0.5
    assert row(table, "half", "all pairs", "region re-rank")["R@1"] == pytest.approx(2 / 12)
    assert choice["embedding"] == "half"


def test_evaluate_i2i_says_which_pairs_it_chose_on_and_ranks_ten():
    _, empty = evaluate_i2i(FEATS, IDS, [], [], [], None)
    assert empty == {"embedding": "others_win", "beta": 0.0,
                     "chosen_on": "no annotated pairs: the first embedding, no re-ranking"}
    table, _ = evaluate_i2i(FEATS, IDS, range(N_IMG), RELEVANT, [], None)
    assert set(table.pairs) == {"all pairs (choice; includes pairs a model trained on)"}
    # query 0's partner is the image least like it, 11th of 11 candidates: outside a top-10 ranking
    gram = np.full((12, 12), 0.5)
    np.fill_diagonal(gram, 1.0)
    gram[0, 1] = gram[1, 0] = 0.0
    table, _ = evaluate_i2i({"e": _gram_rows(gram)}, IDS, [0], [{1}], [], None)
    assert table.loc[0, "MRR"] == 0.0 and table.loc[0, "R@10"] == 0.0


def test_finding_lines_lose_only_spaces_dashes_and_bullets_at_their_ends():
    lines = split_finding_lines("\u2022 X-ray shows a shadow X\r\n- oedema -\n\t\n")
    assert lines == ["X-ray shows a shadow X", "oedema"]


def test_held_out_images_are_validation_images_and_whole_pairs_no_training_image_is_in():
    i2i = pd.DataFrame({"query_path": ["t1", "v1", "u1", "u3", "t2"], "match_path": ["u2", "u1", "v2", "u4", "t3"]})
    data = utils.EntrepData(root=None, images=pd.DataFrame(), i2i=i2i, t2i=pd.DataFrame(), queries={},
                            folder_images=pd.DataFrame(), problems=pd.DataFrame(), inventory=pd.DataFrame(), sha1={})
    held = retrieval.held_out_images(data, train_paths=["t1", "t2", "t3", "t4"], val_paths=["v1", "v2", "v3"])
    # t1-u2 and t2-t3 touch training images: out; v1-u1, u1-v2 and the unlabelled u3-u4: in, both images
    assert held == {"v1", "v2", "v3", "u1", "u3", "u4"}
    assert retrieval.held_out_images(data, [], []) == {"t1", "u2", "v1", "u1", "v2", "u3", "u4", "t2", "t3"}


def test_retrieval_metric_intervals_are_the_alpha_over_two_percentiles_of_resampled_queries():
    rng = np.random.default_rng(4)
    n = 1000
    hit_first = rng.uniform(size=n) < 0.6  # R@1 hits of 1,000 queries: the partner (0) first, else second
    ranked = np.where(hit_first[:, None], [[0, 1]], [[1, 0]])
    relevant = [{0}] * n
    alpha = 0.3
    got = retrieval_metrics(ranked, relevant, ks=(1,), n_boot=5000, alpha=alpha)
    ref = np.concatenate([hit_first[rng.integers(0, n, (2000, n))].mean(1) for _ in range(20)])  # 40,000 of our own
    for end, right, wrong in (("low", alpha / 2, (alpha / 3, 2 * alpha)),
                              ("high", 1 - alpha / 2, (1 - alpha / 3, 1 - 2 * alpha))):
        distance = abs(got[f"R@1_{end}"] - np.quantile(ref, right))
        assert all(distance < abs(got[f"R@1_{end}"] - np.quantile(ref, w)) for w in wrong), end
    assert got["R@1"] == hit_first.mean() and got["R@1_low"] < got["R@1"] < got["R@1_high"]
    default = retrieval_metrics(ranked, relevant, ks=(1,), n_boot=200)
    assert default == retrieval_metrics(ranked, relevant, ks=(1,), n_boot=200, seed=0, alpha=0.05)
    assert "R@1_low" not in retrieval_metrics(ranked, relevant, ks=(1,))  # no resampling unless asked


def test_finding_keys_strip_only_spaces_and_end_punctuation():
    queries, relevant = description_queries(["Type X", "type x.", "Type", " TYPE ;"])
    assert queries == ["Type X", "Type"] and relevant == [{0, 1}, {2, 3}]


# ----------------------------------------------------------------------------------- held_out_images 


def test_held_out_images_are_validation_images_and_pairs_touching_no_training_image():
    i2i = pd.DataFrame({"query_path": ["q1", "q2", "q3", "t1", "v1"], "match_path": ["m1", "t2", "m3", "m4", "m5"]})
    data = SimpleNamespace(i2i=i2i)
    train, val = ["t1", "t2", "t3"], ["v1", "v2"]
    held = held_out_images(data, train, val)
    # q2-t2 and t1-m4 touch training images: not held out (their other image neither)
    assert held == {"v1", "v2", "q1", "m1", "q3", "m3", "m5"}
    assert not held & set(train)
    assert held_out_images(data, [], []) == {"q1", "m1", "q2", "t2", "q3", "m3", "t1", "m4", "v1", "m5"}
    assert held_out_images(data, ["q1", "q2", "q3", "t1", "v1"], []) == set()  # every pair touched: none


def test_held_out_images_on_the_demo_split(demo_data_set):
    data = demo_data_set
    tr, va, _ = split_train_val(data.images, data.i2i, 0.2, seed=0)
    train, val = data.images["path"].iloc[tr].tolist(), data.images["path"].iloc[va].tolist()
    held = held_out_images(data, train, val)
    assert set(val) <= held and not held & set(train)
    for q, m in zip(data.i2i["query_path"], data.i2i["match_path"]):
        if {q, m} & set(train):
            assert not ({q, m} - set(val)) & held  # a pair with a training image is not held out
        else:
            assert {q, m} <= held  # whole
    assert held - set(val)  # the demo has pairs outside both sides: they are held out whole


# ----------------------------------------------------------------------------------- retrieval_training_set


def test_retrieval_training_set_rows_exclusion_and_texts(demo_data_set):
    data = demo_data_set
    everything = (set(data.images["path"]) | set(data.i2i["query_path"]) | set(data.i2i["match_path"])
                  | set(data.t2i["path"]))
    exclude = set(data.images["path"].iloc[::3]) | {data.i2i["match_path"].iloc[0], data.t2i["path"].iloc[0]}
    frame = retrieval_training_set(data, exclude)
    assert list(frame["path"]) == sorted(everything - exclude)
    assert not set(frame["path"]) & exclude
    assert list(frame["sha1"]) == [data.sha1[p] for p in frame["path"]]
    assert list(frame["file"]) == [Path(p).name for p in frame["path"]]
    texts = dict(zip(frame["path"], frame["texts"]))
    assert all(t == sorted(set(t)) for t in texts.values())
    for text, path in zip(data.t2i["text"], data.t2i["path"]):
        if path in texts:
            assert text in texts[path]  # t2i captions
    checked = 0
    for path, description, label in zip(data.images["path"], data.images["description_en"], data.images["label"]):
        if path in texts:
            assert set(split_finding_lines(description)) <= set(texts[path])  # finding lines
            assert {PROMPT_TEMPLATES[0].format(t) for t in FINE_CLASS_TEXTS[label]} <= set(texts[path])
            checked += 1
    assert checked
    # an image no caption, description or label describes has no text
    bare = set(frame["path"]) - set(data.images["path"]) - set(data.t2i["path"])
    assert bare and all(texts[p] == [] for p in bare)
    without = retrieval_training_set(data, exclude, class_texts=False)
    assert list(without["path"]) == list(frame["path"])
    prompts = {PROMPT_TEMPLATES[0].format(t) for ts in FINE_CLASS_TEXTS.values() for t in ts}
    assert not any(set(t) & prompts for t in without["texts"])
    assert any(set(t) & prompts for t in frame["texts"])
    for path, t in zip(without["path"], without["texts"]):
        assert set(t) == set(texts[path]) - prompts

def test_retrieval_training_set_groups_link_pairs_and_examinations_on_the_demo(demo_data_set):
    data = demo_data_set
    frame = retrieval_training_set(data, ())
    group = dict(zip(frame["path"], frame["group"]))
    for q, m in zip(data.i2i["query_path"], data.i2i["match_path"]):
        assert group[q] == group[m]  # i2i partners
    by_exam = frame.assign(exam=[exam_id(f) for f in frame["file"]]).groupby("exam")["group"].nunique()
    public = [exam_id(f) for f in data.images.loc[data.images["release"] == "public", "file"]]
    assert any(frame["file"].map(exam_id).eq(e).sum() > 1 for e in public)
    assert (by_exam.loc[sorted(set(public))] == 1).all()  # one examination's public images
    assert frame["group"].nunique() > 1

def test_retrieval_training_set_on_hand_made_data_groups_and_texts_exactly():
    """Six images: a pair (one unlabelled), two views of one examination, a copy of one's bytes, a loner."""
    e1, e2 = "12345678_123456789012345678_001_image01.png", "12345678_123456789012345678_002_image02.png"
    images = pd.DataFrame({"path": ["/d/a.png", f"/d/{e1}", f"/d/{e2}", "/d/c.png", "/d/d.png"],
                           "description_en": ["A polyp.\r\nmucus", "", "wax", "", "pus"],
                           "label": ["nose-left", "ear-right", "ear-right", "throat", "vc-open"]})
    i2i = pd.DataFrame({"query": ["a.png"], "match": ["u.png"], "query_path": ["/d/a.png"], "match_path": ["/d/u.png"]})
    t2i = pd.DataFrame({"text": ["a spur", "A polyp."], "path": ["/d/u.png", "/d/a.png"]})
    sha1 = {"/d/a.png": "1", f"/d/{e1}": "2", f"/d/{e2}": "3", "/d/c.png": "4", "/d/d.png": "4", "/d/u.png": "5"}
    data = SimpleNamespace(images=images, i2i=i2i, t2i=t2i, sha1=sha1)
    frame = retrieval_training_set(data, ["/d/d.png"]).set_index("file")
    assert list(frame.index) == sorted(["a.png", e1, e2, "c.png", "u.png"])  # the excluded d.png is gone
    g = frame["group"]
    assert g["a.png"] == g["u.png"] and g[e1] == g[e2] and len({g["a.png"], g[e1], g["c.png"]}) == 3
    prompt = PROMPT_TEMPLATES[0].format
    assert frame.loc["a.png", "texts"] == sorted({"A polyp.", "mucus", prompt("left nasal passage"),
                                                  prompt("left nasal cavity")})
    assert frame.loc["u.png", "texts"] == ["a spur"]
    assert frame.loc["c.png", "texts"] == sorted({prompt("throat"), prompt("oropharynx")})
    without = retrieval_training_set(data, ["/d/d.png"], class_texts=False).set_index("file")
    assert without.loc["a.png", "texts"] == ["A polyp.", "mucus"]
    both = retrieval_training_set(data, []).set_index("file")["group"]
    assert both["c.png"] == both["d.png"] != both["a.png"]  # identical bytes share a group


# ----------------------------------------------------------------------------------- fuse_embeddings


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.5, 1.0])
def test_fuse_embeddings_gives_unit_rows_whose_cosine_is_the_weighted_sum(weight):
    a, b = random_unit(7, 5, 0), random_unit(7, 3, 1)
    fused = fuse_embeddings(a, b, weight)
    assert fused.shape == (7, 8)
    assert torch.allclose(fused.norm(dim=1), torch.ones(7), atol=1e-6)
    assert torch.allclose(fused @ fused.T, weight * (a @ a.T) + (1 - weight) * (b @ b.T), atol=1e-6)


# ----------------------------------------------------------------------------------- evaluate_t2i


LINES = ["a polyp in the left nasal cavity", "wax in the right ear canal", "the vocal cords are closed",
         "red swollen tonsils", "a perforated tympanic membrane", "mucus on the septum", "a nodule on the vocal fold",
         "a normal throat"]


def test_evaluate_t2i_chooses_the_perfect_ranker_on_the_first_query_set_with_queries(tiny_clip):
    paths = [f"/gallery/img{i}.png" for i in range(len(LINES))]
    perfect = FeatureTable(paths, embed_texts(tiny_clip, LINES, RT))  # each image IS its line
    random_table = FeatureTable(paths, random_unit(len(LINES), perfect.feats.shape[1], 7))
    # a later set on which the random table wins: relevant = its own first answer
    random_first = text_to_image(tiny_clip, LINES, random_table[paths], RT)[:, 0].tolist()
    favours_random = [{r} for r in random_first]
    assert sum(r == i for i, r in enumerate(random_first)) < len(LINES) - 2
    query_sets = {"captions": ([], [], paths), "finding lines": (LINES, [{i} for i in range(len(LINES))], paths),
                  "other": (LINES, favours_random, paths)}
    models = {"random": (tiny_clip, random_table), "perfect": (tiny_clip, perfect)}
    table, choice = evaluate_t2i(models, query_sets, RT)
    assert choice["model"] == "perfect"
    assert "finding lines" in choice["chosen_on"] and str(len(LINES)) in choice["chosen_on"]
    assert set(table["queries"]) == {"finding lines", "other"}  # a set without queries has no rows
    row = table[(table["queries"] == "finding lines") & (table["model"] == "perfect")].iloc[0]
    assert row["R@1"] == 1.0 and row["MRR"] == 1.0 and row["n"] == len(LINES) and row["gallery"] == len(paths)
    for m in ("R@1", "R@5", "R@10", "MRR"):
        assert (table[f"{m}_low"] <= table[m] + 1e-12).all() and (table[m] <= table[f"{m}_high"] + 1e-12).all()
    other = table[(table["queries"] == "other")].set_index("model")
    assert other.loc["random", "R@1"] == 1.0 > other.loc["perfect", "R@1"]  # choosing there would pick random


def test_evaluate_t2i_without_queries_returns_the_first_model_and_says_so(tiny_clip):
    paths = ["/a.png", "/b.png"]
    table = FeatureTable(paths, random_unit(2, 32, 0))
    result, choice = evaluate_t2i({"frozen": (tiny_clip, table), "tuned": (tiny_clip, table)},
                                  {"captions": ([], [], paths), "finding lines": ([], [], paths)}, RT)
    assert result.empty
    assert choice["model"] == "frozen" and "first model" in choice["chosen_on"]


# ----------------------------------------------------------------------------------- retrieval_metrics intervals


def ranked_queries(n: int, seed: int) -> tuple[np.ndarray, list[set[int]]]:
    rng = np.random.default_rng(seed)
    ranked = np.stack([rng.permutation(20)[:10] for _ in range(n)])
    relevant = [{int(rng.integers(0, 20))} for _ in range(n)]
    return ranked, relevant


def test_retrieval_metrics_bootstrap_interval_contains_the_estimate_is_seeded_and_narrows():
    ranked, relevant = ranked_queries(30, 0)
    plain = retrieval_metrics(ranked, relevant)
    assert not any(k.endswith(("_low", "_high")) for k in plain)
    boot = retrieval_metrics(ranked, relevant, n_boot=500, seed=1)
    for m in ("R@1", "R@5", "R@10", "MRR"):
        assert boot[m] == plain[m]
        assert boot[f"{m}_low"] <= boot[m] <= boot[f"{m}_high"]
    assert boot["R@10_low"] < boot["R@10_high"]
    assert retrieval_metrics(ranked, relevant, n_boot=500, seed=1) == boot
    assert retrieval_metrics(ranked, relevant, n_boot=500, seed=2) != boot
    # the same hit pattern over 20 times the queries: a narrower interval
    many = retrieval_metrics(np.tile(ranked, (20, 1)), relevant * 20, n_boot=500, seed=1)
    for m in ("R@5", "R@10", "MRR"):
        assert many[m] == pytest.approx(boot[m])
        assert many[f"{m}_high"] - many[f"{m}_low"] < 0.5 * (boot[f"{m}_high"] - boot[f"{m}_low"])
