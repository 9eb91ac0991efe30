"""retrieval.py (Tracks 2 and 3): exact top-k search against a brute-force reference; content groups, the
hold-out and the validation sets (galleries padded to the test's images per query, captions scored on their own
image, unseen and seen finding lines); the ranking procedure on small hand-made galleries whose right answer is
known (score fusion, region consistency, k-reciprocal re-ranking against a naive reference, mutual ranks,
one-to-one assignment against brute force); Recall@k / MRR with bootstrap intervals; the out-of-fold choice (a
setting that wins one fold by chance does not inflate the report; grouped folds; a default under 50 queries);
the training set of the learned retrieval and the gallery figure. CPU, tiny seeded data, no network.
(retrieval.gallery_images is tested in test_data.py; the retrieval fine-tuning in test_training.py.)"""

from __future__ import annotations

import itertools
import math
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
    MIN_SELECTION_QUERIES,
    Setting,
    caption_queries,
    choose_setting,
    cosine_topk,
    description_queries,
    fusion_grid,
    gram_matrices,
    held_out_images,
    i2i_eval_set,
    i2i_stages,
    k_reciprocal,
    linked_groups,
    one_to_one,
    pad_gallery,
    rank_i2i,
    rank_t2i,
    reciprocal_ranks,
    retrieval_hits,
    retrieval_metrics,
    retrieval_training_set,
    select_out_of_fold,
    selection_block,
    selection_report,
    t2i_eval_queries,
    t2i_subsets,
    unseen_images,
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
def test_finding_lines_lose_only_spaces_dashes_and_bullets_at_their_ends():
    lines = split_finding_lines("\u2022 X-ray shows a shadow X\r\n- oedema -\n\t\n")
    assert lines == ["X-ray shows a shadow X", "oedema"]


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


# ----------------------------------------------------------------------------------- hand-made data sets

E1, E2 = "12345678_123456789012345678_001_image01.png", "12345678_123456789012345678_002_image02.png"


def hand_data(images: list[tuple[str, str, str]], pairs: list[tuple[str, str]], captions: list[tuple[str, str]],
              sha1: dict[str, str], folder: list[tuple[str, str]] = ()) -> SimpleNamespace:
    """An EntrepData-like set under /d: images (file, label, English description), i2i pairs (both
    directions), t2i (caption, file), content ids by file, test-folder images (file, sha1) under /t."""
    path = lambda f: f"/d/{f}"
    frame = pd.DataFrame([{"path": path(f), "file": f, "label": lab, "description_en": d, "sha1": sha1[f]}
                          for f, lab, d in images], columns=["path", "file", "label", "description_en", "sha1"])
    both = [*pairs, *((m, q) for q, m in pairs)]
    i2i = pd.DataFrame({"query": [q for q, _ in both], "match": [m for _, m in both],
                        "query_path": [path(q) for q, _ in both], "match_path": [path(m) for _, m in both]})
    t2i = pd.DataFrame({"text": [t for t, _ in captions], "file": [f for _, f in captions],
                        "path": [path(f) for _, f in captions]})
    folder_images = pd.DataFrame({"path": [f"/t/{f}" for f, _ in folder], "file": [f for f, _ in folder],
                                  "folder": "/t", "sha1": [s for _, s in folder]})
    content = {**{path(f): s for f, s in sha1.items()}, **dict(zip(folder_images.path, folder_images.sha1))}
    return SimpleNamespace(images=frame, i2i=i2i, t2i=t2i, folder_images=folder_images, sha1=content)


# train t1, t2, t3 (t1 paired with unlabelled u3); validation v1, v2; an examination split across the sides (E1
# train, E2 validation: a plain split does that); unlabelled pairs u1-u2 and u4-u5, u4 with v2's bytes; c1, an
# image only a caption points at. Sides: train {t1, t2, t3, E1}, validation {v1, v2, E2}.
HAND = hand_data(
    images=[("t1.png", "ear-left", ""), ("t2.png", "throat", ""), ("t3.png", "vc-open", ""),
            ("v1.png", "throat", "pus"), ("v2.png", "nose-left", "a polyp\r\nmucus"), (E1, "ear-right", "wax"),
            (E2, "ear-left", "Wax.")],
    pairs=[("t1.png", "u3.png"), ("u1.png", "u2.png"), ("u4.png", "u5.png")],
    captions=[("a spur", "u1.png"), ("a polyp", "u4.png"), ("mucus", "c1.png"), ("red folds", "t2.png")],
    sha1={f: f.split(".")[0] for f in ["t1.png", "t2.png", "t3.png", "v1.png", "u1.png", "u2.png", "u3.png", "u5.png",
                                      "c1.png", E1, E2]} | {"v2.png": "V2", "u4.png": "V2"},
    folder=[("x1.png", "x1"), ("x2.png", "x1"), ("x3.png", "x3"), ("copy.png", "t2")])
HAND_TRAIN = ["/d/t1.png", "/d/t2.png", "/d/t3.png", f"/d/{E1}"]
HAND_VAL = ["/d/v1.png", "/d/v2.png", f"/d/{E2}"]


def test_annotated_images_group_pairs_examinations_identical_bytes_and_caption_images():
    frame = retrieval.annotated_images(HAND).set_index("file")
    assert sorted(frame.index) == sorted(["t1.png", "t2.png", "t3.png", "v1.png", "v2.png", E1, E2, "u1.png", "u2.png",
                                          "u3.png", "u4.png", "u5.png", "c1.png"])
    g = frame["group"]
    assert g["t1.png"] == g["u3.png"] and g["u1.png"] == g["u2.png"] and g[E1] == g[E2]
    assert g["v2.png"] == g["u4.png"] == g["u5.png"]  # identical bytes, then a pair
    assert len({g["t1.png"], g["t2.png"], g["t3.png"], g["v1.png"], g["v2.png"], g[E1], g["u1.png"], g["c1.png"]}) == 8


def test_held_out_images_are_whole_content_groups_with_a_validation_image_or_no_training_image():
    held = held_out_images(HAND, HAND_TRAIN, HAND_VAL)
    # v1 alone; v2 with its byte twin u4 and u4's partner u5; the examination E1-E2 whole (E1 is a training image:
    # it must leave every training that feeds retrieval); u1-u2 and c1 touch no training image
    assert held == {"/d/v1.png", "/d/v2.png", "/d/u4.png", "/d/u5.png", f"/d/{E1}", f"/d/{E2}", "/d/u1.png",
                    "/d/u2.png", "/d/c1.png"}
    assert held & set(HAND_TRAIN) == {f"/d/{E1}"}
    assert held_out_images(HAND, [], []) == set(retrieval.annotated_images(HAND)["path"])  # nothing trains: all
    everything = [*HAND_TRAIN, *HAND_VAL]
    assert held_out_images(HAND, everything, []) == {"/d/u1.png", "/d/u2.png", "/d/c1.png"}


def test_held_out_images_on_the_demo_split_hold_no_training_image_and_whole_groups(demo_data_set):
    data = demo_data_set
    tr, va, _ = split_train_val(data.images, data.i2i, 0.2, seed=0)
    train, val = data.images["path"].iloc[tr].tolist(), data.images["path"].iloc[va].tolist()
    held = held_out_images(data, train, val)
    assert set(val) <= held and not held & set(train)  # the grouped split keeps groups on one side
    frame = retrieval.annotated_images(data).assign(held=lambda f: f["path"].isin(held))
    assert (frame.groupby("group")["held"].nunique() == 1).all()  # whole groups
    pairs = [{q, m} for q, m in zip(data.i2i["query_path"], data.i2i["match_path"])]
    assert any(not pair & set(train) and not pair & set(val) and pair <= held for pair in pairs)  # unlabelled pairs


def test_unseen_images_are_held_out_images_and_test_images_of_unannotated_content_once():
    held = held_out_images(HAND, HAND_TRAIN, HAND_VAL)
    unseen = unseen_images(HAND, held)
    # u4 and v2 are one content (u4 first by path); x1 and x2 one content; copy.png shares t2's bytes: never
    assert unseen == [*sorted(held - {"/d/v2.png"}), "/t/x1.png", "/t/x3.png"]


def test_pad_gallery_reaches_the_test_ratio_without_repeating_content_and_keeps_the_gallery_first():
    sha1 = {f"g{i}": f"s{i}" for i in range(4)} | {f"c{i}": f"s{i + 2}" for i in range(30)}  # c0, c1 copy g2, g3
    gallery = ["g0", "g1", "g2", "g3"]
    candidates = [f"c{i}" for i in range(30)]
    padded = pad_gallery(gallery, candidates, 3, 5.0, sha1, seed=0)  # 3 queries, 5 images each: 15
    assert len(padded) == 15 and padded[:4] == gallery and len({sha1[p] for p in padded}) == 15
    assert not {"c0", "c1"} & set(padded)
    assert pad_gallery(gallery, candidates, 3, 5.0, sha1, seed=0) == padded  # seeded
    assert pad_gallery(gallery, candidates[::-1], 3, 5.0, sha1, seed=0) == padded  # whatever the candidates' order
    assert pad_gallery(gallery, candidates, 3, 5.0, sha1, seed=1) != padded
    assert len(pad_gallery(gallery, candidates, 3, 100.0, sha1, seed=0)) == 4 + 28  # too few: all, ratio lower
    assert len(pad_gallery(gallery, candidates, 3, None, sha1, seed=0)) == 4 + 28  # no test list: all
    assert pad_gallery(gallery, candidates, 3, 1.0, sha1, seed=0) == gallery  # already larger
    assert retrieval.gallery_info(15, 3, 5.0) == {"images": 15, "queries": 3, "ratio": 5.0, "test_ratio": 5.0}
    assert retrieval.gallery_info(0, 0, None) == {"images": 0, "queries": 0, "ratio": None, "test_ratio": None}


def test_i2i_eval_set_holds_held_out_pairs_by_content_with_both_directions_in_one_group():
    held = held_out_images(HAND, HAND_TRAIN, HAND_VAL)
    gallery, rows, relevant, groups = i2i_eval_set(HAND, held)
    assert gallery == ["/d/u1.png", "/d/u2.png", "/d/u4.png", "/d/u5.png"]  # t1-u3 trained: out
    assert [gallery[r] for r in rows] == gallery and relevant == [{1}, {0}, {3}, {2}]
    assert groups[0] == groups[1] != groups[2] == groups[3]  # a pair's two directions: one group
    twins = hand_data([], [("a.png", "b.png"), ("b.png", "c.png")], [], {"a.png": "1", "b.png": "2", "c.png": "2"})
    gallery, rows, relevant, _ = i2i_eval_set(twins, {"/d/a.png", "/d/b.png", "/d/c.png"})
    assert gallery == ["/d/a.png", "/d/b.png"] and rows == [0, 1] and relevant == [{1}, {0}]  # b, c: one content


def test_captions_count_only_their_own_image_and_finding_lines_every_image_carrying_them():
    gallery = ["/d/u1.png", "/d/u4.png", "/d/c1.png", "/d/v1.png"]  # u4 stands for its byte twin v2 too
    texts, relevant = caption_queries(HAND.t2i, gallery, HAND.sha1)
    assert texts == ["a spur", "a polyp", "mucus"] and relevant == [{0}, {1}, {2}]  # t2.png is not in the gallery
    queries = t2i_eval_queries(HAND, gallery, ["A polyp", "pus", "a spur", "a throat"])
    assert queries[["text", "kind", "seen"]].values.tolist() == [
        ["a polyp", "finding line", True], ["mucus", "finding line", False], ["pus", "finding line", True],
        ["a spur", "caption", True], ["a polyp", "caption", True], ["mucus", "caption", False]]
    assert queries["relevant"].tolist() == [{1}, {1}, {3}, {0}, {1}, {2}]  # v2's lines, by content, on u4's row
    annotated = retrieval.annotated_images(HAND)
    group = dict(zip(annotated["path"], annotated["group"]))
    assert queries["links"][0] == {"a polyp", group["/d/v2.png"]}
    assert queries["links"][3] == {"a spur", group["/d/u1.png"]}
    assert t2i_subsets(queries) == {"all held-out queries": [0, 1, 2, 3, 4, 5], "finding lines, unseen": [1],
                                    "finding lines, seen": [0, 2], "captions (their own image)": [3, 4, 5]}
    # v2's two lines, the caption of its twin u4 and the caption "mucus" (the same text as a line): one group
    assert linked_groups(queries["links"]).tolist() == [0, 0, 1, 2, 0, 0]


def test_linked_groups_are_connected_components_of_shared_links():
    assert linked_groups([["a", 1], [1], ["b"], ["b", 2], [3], []]).tolist() == [0, 0, 1, 1, 2, 3]
    assert linked_groups([]).tolist() == []


# ----------------------------------------------------------------------------------- ranking


def ids_of(n: int) -> list[str]:
    return [f"sha{i}" for i in range(n)]


def test_rank_i2i_plain_fusion_is_cosine_topk_of_the_concatenated_weighted_features():
    a, b = random_unit(30, 8, 0), random_unit(30, 5, 1)
    ids = ids_of(30)
    ids[7] = ids[3]  # one content twice
    rows = [0, 3, 7, 12]
    for weights in ((("a", 1.0),), (("a", 0.25), ("b", 0.75))):
        got = rank_i2i(gram_matrices({"a": a, "b": b}), Setting(weights), rows, ids)
        cat = torch.cat([math.sqrt(w) * {"a": a, "b": b}[n] for n, w in weights], dim=1)
        expected = cosine_topk(cat[rows], cat, 10, [ids[r] for r in rows], ids)[1]
        assert torch.equal(got, expected)
    assert 7 not in got[1].tolist() and 3 not in got[2].tolist()  # never the query's own content


def test_several_fold_models_enter_as_the_mean_of_their_cosine_matrices():
    """How several DINOv2 fold models serve retrieval as one embedding (a list of their features): their
    similarity matrices averaged, never their features (whose mean would mix unrelated coordinates)."""
    feats = [random_unit(12, 6, s) for s in range(3)]
    grams = gram_matrices({"folds": feats, **{f"m{i}": f for i, f in enumerate(feats)}})
    mean = retrieval.fused_scores(grams, [(f"m{i}", 1 / 3) for i in range(3)])
    assert torch.allclose(grams["folds"], mean, atol=1e-12)
    averaged = torch.nn.functional.normalize(torch.stack(feats).mean(0), dim=1)
    assert not torch.allclose(grams["folds"], averaged.double() @ averaged.double().T, atol=1e-3)

def test_a_large_region_weight_puts_candidates_of_the_query_region_first_keeping_their_cosine_order():
    feats, ids = random_unit(20, 8, 3), ids_of(20)
    region = one_hot(np.random.default_rng(4).integers(0, 4, 20))
    rows = list(range(20))
    plain = rank_i2i({"e": feats.double() @ feats.double().T}, Setting((("e", 1.0),)), rows, ids, k=19)
    ranked = rank_i2i({"e": feats.double() @ feats.double().T}, Setting((("e", 1.0),), beta=5.0), rows, ids, region, 19)
    agree = (region[:, None, :] * region[ranked]).sum(-1)  # (Q, K): 1 = same region
    assert (agree[:, :-1] >= agree[:, 1:]).all() and agree.any(1).all() and not agree.all(1).all()
    for q in rows:  # within each region group, the plain order
        pos = {int(c): j for j, c in enumerate(plain[q])}
        for group in (ranked[q][agree[q] == 1], ranked[q][agree[q] == 0]):
            assert [pos[int(c)] for c in group] == sorted(pos[int(c)] for c in group)


def naive_k_reciprocal(sim: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s re-ranking written out with Python sets, one pair at a time."""
    n, dist = len(sim), 1.0 - sim
    order = [sorted(range(n), key=lambda j, i=i: (dist[i][j], j)) for i in range(n)]
    reciprocal = lambda i, k: {j for j in order[i][:k + 1] if i in order[j][:k + 1]}
    v = np.zeros((n, n))
    for i in range(n):
        members = reciprocal(i, k1)
        grown = set(members)
        for c in members:
            rc = reciprocal(c, round(k1 / 2))
            if len(rc & members) > 2 / 3 * len(rc):
                grown |= rc
        for j in grown:
            v[i, j] = math.exp(-dist[i][j])
        v[i] /= v[i].sum()
    v = np.array([v[order[i][:k2]].mean(0) for i in range(n)])
    jaccard = np.array([[1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum() for j in range(n)]
                        for i in range(n)])
    return -((1 - lam) * jaccard + lam * dist)


@pytest.mark.parametrize(("k1", "k2"), [(4, 1), (5, 3), (8, 4)])
def test_k_reciprocal_equals_a_naive_reference(k1, k2):
    clusters = F.normalize(random_unit(6, 8, 5).repeat_interleave(4, 0) + 0.6 * random_unit(24, 8, 6), dim=1)
    sim = clusters.double() @ clusters.double().T
    got = k_reciprocal(sim, k1, k2, 0.3)
    assert np.allclose(got.numpy(), naive_k_reciprocal(sim.numpy(), k1, k2, 0.3), atol=1e-12)


def _gram(n: int, cosines: dict[tuple[int, int], float], base: float) -> torch.Tensor:
    """Cosines [n, n]: 1 on the diagonal, `cosines` where given, else `base`."""
    gram = np.full((n, n), base)
    np.fill_diagonal(gram, 1.0)
    for (i, j), c in cosines.items():
        gram[i, j] = gram[j, i] = c
    return torch.from_numpy(gram)


# Pairs (0, 1), (2, 3), (4, 5), (6, 7) and a hub, 8, nearer to 0 than 0's partner is; the hub's own nearest are 6
# and 7, and 1 prefers its partner 0 to the hub.
HUB = _gram(9, {(0, 1): 0.7, (2, 3): 0.7, (4, 5): 0.7, (6, 7): 0.7, (0, 8): 0.75, (1, 8): 0.6, (2, 8): 0.72,
                (3, 8): 0.6, (4, 8): 0.6, (5, 8): 0.6, (6, 8): 0.8, (7, 8): 0.8}, base=0.5)
HUB_IDS = ids_of(9)


def test_the_hand_made_galleries_are_cosines_of_real_vectors():
    assert torch.linalg.eigvalsh(HUB).min() > 1e-3
    assert torch.allclose(_gram_rows(HUB.numpy()).double() @ _gram_rows(HUB.numpy()).double().T, HUB, atol=1e-6)


def test_k_reciprocal_reranking_puts_the_reciprocal_partner_before_a_hub(monkeypatch):
    grams = {"e": HUB}
    plain = rank_i2i(grams, Setting((("e", 1.0),)), [0, 2], HUB_IDS)
    assert plain[:, 0].tolist() == [8, 8]  # the hub first
    monkeypatch.setattr(retrieval, "K_RECIPROCAL", (2, 1, 0.3))  # neighbourhoods of this nine-image gallery's size
    reranked = rank_i2i(grams, Setting((("e", 1.0),), k_reciprocal=True), [0, 2], HUB_IDS)
    assert reranked[:, 0].tolist() == [1, 3]  # the hub never has 0 or 2 among its nearest: not reciprocal


def test_reciprocal_ranks_fuse_both_directions_and_put_the_mutual_partner_first():
    score = HUB.masked_fill(retrieval.same_content(HUB_IDS, HUB_IDS), float("-inf"))
    fused = reciprocal_ranks(score, [0, 1])
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = lambda i, j: int((order[i] == j).nonzero()) + 1
    for a, q in enumerate([0, 1]):
        for g in range(9):
            mutual = 1 / (retrieval.RRF_K + rank(q, g)) + 1 / (retrieval.RRF_K + rank(g, q)) if g != q else NEG_INF
            assert fused[a, g].item() == pytest.approx(mutual)
    ranked = rank_i2i({"e": HUB}, Setting((("e", 1.0),), mutual="reciprocal"), [0], HUB_IDS)
    assert ranked[0, 0].item() == 1  # 0's partner ranks 0 first; the hub ranks it third


def test_one_to_one_gives_two_queries_with_one_best_answer_distinct_answers_maximising_the_total():
    score = torch.tensor([[-np.inf, 0.8, 0.1, 0.0, 0.9, 0.2], [0.1, 0.0, -np.inf, 0.7, 0.95, 0.3]], dtype=torch.float64)
    out = one_to_one(score)
    assert torch.argmax(out, 1).tolist() == [1, 4]  # 0.8 + 0.95 beats 0.9 + 0.7
    assert torch.equal(out[0, [0, 2, 3, 4, 5]], score[0, [0, 2, 3, 4, 5]])  # the rest keep their scores
    rng = np.random.default_rng(7)
    for _ in range(20):  # against brute force over every distinct assignment
        s = torch.from_numpy(rng.uniform(size=(4, 6)))
        total = lambda cols, s=s: sum(s[q, c].item() for q, c in enumerate(cols))
        best = max(itertools.permutations(range(6), 4), key=total)
        assert torch.argmax(one_to_one(s, candidates=6), 1).tolist() == list(best)


def test_one_to_one_leaves_a_query_without_a_free_candidate_as_it_was():
    score = torch.tensor([[0.9, -np.inf, -np.inf], [0.8, -np.inf, -np.inf], [0.1, 0.5, 0.2]], dtype=torch.float64)
    out = one_to_one(score, candidates=2)
    assert out[0, 0].item() == float("inf") and torch.equal(out[1], score[1])  # 1's only candidate is taken
    assert out[2, 1].item() == float("inf")


def test_rank_i2i_assignment_moves_a_query_off_an_answer_another_query_holds_better():
    # 0 and 2 both rank image 4 first; 2 holds it better (0.9 + 0.8 for 0's partner 1 beats 0.85 + 0.7 for 2's next)
    grams = {"e": _gram(6, {(0, 4): 0.85, (0, 1): 0.8, (2, 4): 0.9, (2, 3): 0.5, (0, 2): 0.7, (1, 4): 0.5}, 0.3)}
    ids = ids_of(6)
    assert torch.linalg.eigvalsh(grams["e"]).min() > 1e-3  # cosines of real vectors
    assert rank_i2i(grams, Setting((("e", 1.0),)), [0, 2], ids)[:, 0].tolist() == [4, 4]
    ranked = rank_i2i(grams, Setting((("e", 1.0),), mutual="assignment"), [0, 2], ids)
    assert ranked[:, 0].tolist() == [1, 4] and ranked[0, 1].item() == 4  # then its plain order


def test_rank_t2i_ranks_the_fused_text_image_cosines(tiny_clip):
    paths = [f"/g/{i}.png" for i in range(12)]
    texts = ["wax in the left ear", "a polyp", "red swollen folds"]
    tables = {name: FeatureTable(paths, random_unit(12, 32, s)) for s, name in enumerate(("tuned", "frozen"))}
    scores = retrieval.text_image_scores({n: (tiny_clip, t) for n, t in tables.items()}, texts, paths, RT)
    text = embed_texts(tiny_clip, texts, RT).double()
    assert torch.allclose(scores["tuned"], text @ tables["tuned"].feats.double().T)
    ranked = rank_t2i(scores, Setting((("tuned", 0.75), ("frozen", 0.25))), k=5)
    fused = 0.75 * scores["tuned"] + 0.25 * scores["frozen"]
    assert torch.equal(ranked, torch.sort(fused, dim=1, descending=True, stable=True).indices[:, :5])
    empty = retrieval.text_image_scores({n: (tiny_clip, t) for n, t in tables.items()}, [], paths, RT)
    assert {n: s.shape for n, s in empty.items()} == {"tuned": (0, 12), "frozen": (0, 12)}


@pytest.fixture(scope="module")
def tiny_clip() -> utils.Clip:
    return utils.load_clip("tiny", CPU)


# ----------------------------------------------------------------------------------- the out-of-fold choice


def test_fusion_grid_is_the_simplex_in_quarters_with_the_first_name_alone_first():
    grid = fusion_grid(["a", "b", "c"])
    assert grid[0] == (("a", 1.0),) and len(grid) == math.comb(4 + 2, 2) == len(set(grid))
    assert all(math.isclose(sum(w for _, w in g), 1.0) and all(w > 0 for _, w in g) for g in grid)
    assert fusion_grid(["a"]) == [(("a", 1.0),)]
    stages = i2i_stages(["a", "b"], region=True)
    assert [list(stage[0].values())[0] for stage in stages] == [(("a", 1.0),), 0.0, False, "off"]  # defaults first
    assert retrieval.default_setting(stages) == Setting((("a", 1.0),))
    assert len(i2i_stages(["a", "b"], region=False)) == 3
    assert Setting((("a", 0.5), ("b", 0.5)), 0.1, True, "assignment").describe() == \
        "a 0.5 + b 0.5, region 0.1, k-reciprocal, mutual assignment"


def hits_ranking(hit: np.ndarray) -> torch.Tensor:
    """Rankings [Q, 2] of queries whose relevant item is 0: first when hit, else second."""
    return torch.tensor([[0, 1] if h else [1, 0] for h in hit])


STAGES = [[{"weights": (("steady", 1.0),)}, {"weights": (("lucky", 1.0),)}]]


def test_choose_setting_takes_the_best_r1_then_mrr_and_keeps_the_first_option_on_a_tie():
    relevant = [{0}] * 4
    rankings = {"steady": torch.tensor([[0, 1], [1, 0], [1, 0], [1, 2]]),  # R@1 1/4, MRR (1 + .5 + .5) / 4
                "lucky": torch.tensor([[0, 1], [1, 2], [1, 2], [1, 2]])}  # R@1 1/4, MRR 1 / 4
    rank = lambda s: rankings[s.weights[0][0]]
    assert choose_setting(rank, STAGES, relevant, range(4)).weights[0][0] == "steady"  # MRR decides
    assert choose_setting(rank, STAGES, relevant, [0, 3]).weights[0][0] == "steady"  # a tie: the first option
    assert choose_setting(rank, STAGES[::-1] and [STAGES[0][::-1]], relevant, [0, 3]).weights[0][0] == "lucky"


def test_a_setting_that_wins_one_fold_by_chance_does_not_inflate_the_out_of_fold_figure():
    """Five content groups of 20 queries (one fold each). "steady" finds 6 of every group's 20; "lucky" all 20
    of one group and 3 of each other, so it wins on all queries (0.32 against 0.30) and is what the submissions
    get. Out of fold: the lucky group is scored with "steady", chosen without it (6 hits); every other group with
    "lucky", chosen with its lucky group (3 hits each): 18 / 100, not the 0.32 of the in-sample winner."""
    n, groups = 100, np.repeat(np.arange(5), 20)
    folds = utils.grouped_fold_ids(np.zeros(n, dtype=int), groups, retrieval.SELECTION_FOLDS, 0)
    assert len(set(zip(folds, groups))) == 5  # each group one fold
    lucky_fold = folds[0]
    within = np.tile(np.arange(20), 5)  # a query's position in its group
    hit = {"steady": within < 6, "lucky": np.where(folds == lucky_fold, True, within < 3)}
    rank = lambda s: hits_ranking(hit[s.weights[0][0]])
    relevant = [{0}] * n
    selection = select_out_of_fold(rank, STAGES, relevant, groups, seed=0)
    assert retrieval_metrics(rank(Setting((("lucky", 1.0),))), relevant, ks=(1,))["R@1"] == pytest.approx(0.32)
    assert selection.chosen == Setting((("lucky", 1.0),))  # the in-sample winner serves the test ...
    assert retrieval_metrics(selection.oof_ranked, relevant, ks=(1,))["R@1"] == pytest.approx(0.18)  # ... honestly
    assert [s.weights[0][0] for s in selection.fold_choices] == ["steady" if f == lucky_fold else "lucky"
                                                                 for f in range(5)]
    table = selection_report(rank, {"steady": Setting((("steady", 1.0),))}, selection, relevant, {"all": range(n)})
    assert table["setting"].tolist() == ["steady", "full procedure (out of fold)"]
    block = selection_block(selection, table, n)
    assert block["R@1"] == pytest.approx(0.18) and block["n"] == n and block["chosen"] == "lucky 1"
    assert block["R@1_low"] < 0.18 < block["R@1_high"] and block["per_fold"][lucky_fold] == "steady 1"
    assert "4 of 5 folds" in block["how"] and {"MRR", "MRR_low", "MRR_high", "R@5", "R@10"} <= set(block)


def test_out_of_fold_choices_never_split_a_content_group(monkeypatch):
    n, groups = 60, np.repeat(np.arange(30), 2)  # a pair's two directions share a group
    seen, real = [], retrieval.choose_setting
    monkeypatch.setattr(retrieval, "choose_setting", lambda *a: seen.append(list(a[3])) or real(*a))
    rng = np.random.default_rng(0)
    hit = {"steady": rng.random(n) < 0.5, "lucky": rng.random(n) < 0.5}
    select_out_of_fold(lambda s: hits_ranking(hit[s.weights[0][0]]), STAGES, [{0}] * n, groups, seed=3)
    assert len(seen) == retrieval.SELECTION_FOLDS + 1 and seen[-1] == list(range(n))  # each fold, then all
    for rows in seen[:-1]:
        chosen_on = set(groups[rows])
        left_out = set(groups) - chosen_on
        assert left_out and all(set(np.flatnonzero(groups == g)).isdisjoint(rows) for g in left_out)


def test_with_fewer_than_50_held_out_queries_the_default_fixed_in_advance_is_kept_and_said():
    n = MIN_SELECTION_QUERIES - 1
    hit = {"steady": np.zeros(n + 1, bool), "lucky": np.ones(n + 1, bool)}  # the other setting wins everywhere
    rank = lambda s: hits_ranking(hit[s.weights[0][0]][:n])
    selection = select_out_of_fold(rank, STAGES, [{0}] * n, np.arange(n), seed=0)
    assert selection.chosen == Setting((("steady", 1.0),)) and selection.fold_choices == ()
    assert torch.equal(selection.oof_ranked, rank(selection.chosen))
    assert "fewer than 50" in selection.how and "default fixed in advance" in selection.how
    rank_more = lambda s: hits_ranking(hit[s.weights[0][0]])
    more = select_out_of_fold(rank_more, STAGES, [{0}] * (n + 1), np.arange(n + 1), seed=0)
    assert more.chosen == Setting((("lucky", 1.0),))  # 50: chosen out of fold
    none = select_out_of_fold(rank, STAGES, [], np.zeros(0, int), seed=0)
    assert none.oof_ranked.shape == (0, retrieval.RANKING_DEPTH) and "no held-out queries" in none.how
    table = selection_report(rank, {"steady": none.chosen}, none, [], {"all": []})
    assert table.empty and selection_block(none, table, 0)["n"] == 0


# ------------------------------------------------- edge cases found by the mutation run of issue 24


def test_ranked_breaks_score_ties_by_the_first_score_then_by_column():
    score = torch.tensor([[0.5, 0.0, 0.0, 0.5]])
    first = torch.tensor([[0.1, 0.4, 0.3, 0.2]])
    s, i = retrieval._ranked(score, 4, first=first)
    assert i.tolist() == [[3, 0, 1, 2]] and s.tolist() == [[0.5, 0.5, 0.0, 0.0]]  # ties in `first`'s order
    assert retrieval._ranked(torch.zeros(1, 4), 3, first=first)[1].tolist() == [[1, 2, 3]]
    s, i = retrieval._ranked(torch.zeros(2, 40), 10, first=torch.zeros(2, 40))  # ties in both: column order
    assert i.tolist() == [list(range(10))] * 2


def test_mutual_ranks_break_a_tie_by_the_querys_own_scores_and_hold_k_answers():
    # for query 0, images 1 and 2 tie on reciprocal ranks (ranks 2 and 1 one way, 1 and 2 the other): its own
    # cosines put 2 first
    cos = {(0, 2): 0.8, (0, 1): 0.6, (0, 3): 0.1, (2, 3): 0.9, (1, 2): 0.2, (1, 3): 0.3}
    gram = torch.eye(4, dtype=torch.float64)
    for (a, b), c in cos.items():
        gram[a, b] = gram[b, a] = c
    fused = reciprocal_ranks(gram.masked_fill(torch.eye(4, dtype=torch.bool), NEG_INF), [0])
    assert fused[0, 1].item() == fused[0, 2].item()
    ranked = rank_i2i({"e": gram}, Setting((("e", 1.0),), mutual="reciprocal"), [0], ids_of(4), k=2)
    assert ranked.tolist() == [[2, 1]]


def test_reciprocal_ranks_of_tied_scores_count_ranks_in_column_order():
    n = 30
    score = torch.zeros(n, n, dtype=torch.float64).masked_fill(torch.eye(n, dtype=torch.bool), NEG_INF)
    fused = reciprocal_ranks(score, [0, 5])
    rank = lambda i, j: j + (j < i) if j != i else n  # ties in column order, the excluded self last
    for a, q in enumerate([0, 5]):
        for g in range(n):
            expected = 1 / (retrieval.RRF_K + rank(q, g)) + 1 / (retrieval.RRF_K + rank(g, q)) if g != q else NEG_INF
            assert fused[a, g].item() == pytest.approx(expected)


@pytest.mark.parametrize("k2", [1, 2])
def test_k_reciprocal_of_tied_distances_and_two_expansion_neighbours_equals_the_naive_reference(k2):
    sim = torch.full((30, 30), 0.5, dtype=torch.float64).fill_diagonal_(1.0)
    sim[:10, :10] = 0.8  # a cluster of ten, all its distances tied
    sim.fill_diagonal_(1.0)
    got = k_reciprocal(sim, 12, k2, 0.3)
    assert np.allclose(got.numpy(), naive_k_reciprocal(sim.numpy(), 12, k2, 0.3), atol=1e-12)
    clusters = F.normalize(random_unit(6, 8, 5).repeat_interleave(4, 0) + 0.6 * random_unit(24, 8, 6), dim=1)
    sim = clusters.double() @ clusters.double().T
    assert np.allclose(k_reciprocal(sim, 5, 2, 0.3).numpy(), naive_k_reciprocal(sim.numpy(), 5, 2, 0.3), atol=1e-12)


def test_k_reciprocal_with_one_expansion_neighbour_averages_over_the_nearest_even_when_it_is_another_image():
    """k2 = 1 takes each image's nearest image's weights, as the docstring and the reference say: image 1 is an
    exact copy of image 0 (distance 0, and the lower index wins the tie), so 1's nearest is 0, not itself."""
    feats = F.normalize(random_unit(8, 6, 3), dim=1)
    feats[1] = feats[0]
    sim = (feats.double() @ feats.double().T).clamp(max=1.0)
    got = k_reciprocal(sim, 3, 1, 0.3)
    assert np.allclose(got.numpy(), naive_k_reciprocal(sim.numpy(), 3, 1, 0.3), atol=1e-12)


def test_one_to_one_assigns_only_among_each_querys_candidates():
    score = torch.tensor([[0.9, 0.1], [0.8, 0.7]], dtype=torch.float64)
    out = one_to_one(score, candidates=1)  # both queries' one candidate is image 0: query 0 holds it better
    assert out[0].tolist() == [float("inf"), 0.1] and torch.equal(out[1], score[1])
    assert one_to_one(score, candidates=2)[1].tolist() == [0.8, float("inf")]


def test_stages_are_the_documented_options_in_order():
    fusion = [{"weights": w} for w in [(("a", 1.0),), (("a", 0.75), ("b", 0.25)), (("a", 0.5), ("b", 0.5)),
                                       (("a", 0.25), ("b", 0.75)), (("b", 1.0),)]]
    assert retrieval.t2i_stages(["a", "b"]) == [fusion]
    tail = [[{"k_reciprocal": False}, {"k_reciprocal": True}],
            [{"mutual": "off"}, {"mutual": "reciprocal"}, {"mutual": "assignment"}]]
    assert i2i_stages(["a", "b"], region=False) == [fusion, *tail]
    assert i2i_stages(["a"], region=True) == [[{"weights": (("a", 1.0),)}], [{"beta": b} for b in
                                                                             retrieval.RERANK_BETA_GRID], *tail]


def test_validation_sets_of_one_way_pairs_an_exact_hold_out_and_no_images():
    pair = hand_data([], [("a.png", "b.png")], [], {"a.png": "1", "b.png": "2"})
    one_way = SimpleNamespace(**{**vars(pair), "i2i": pair.i2i.iloc[:1]})  # a listed only as query, b as match
    assert retrieval.annotated_images(one_way)["path"].tolist() == ["/d/a.png", "/d/b.png"]
    gallery, rows, relevant, groups = i2i_eval_set(pair, {"/d/a.png", "/d/b.png"})  # exactly the pair held out
    assert gallery == ["/d/a.png", "/d/b.png"] and rows == [0, 1] and relevant == [{1}, {0}]
    gallery, rows, relevant, groups = i2i_eval_set(pair, set())
    assert gallery == [] and rows == [] and groups.shape == (0,) and groups.dtype == np.int64
    queries = t2i_eval_queries(pair, [], [])
    assert queries.empty and queries.columns.tolist() == ["text", "relevant", "kind", "seen", "links"]


def test_gallery_info_gives_ratios_to_two_decimals_and_none_without_queries():
    assert retrieval.gallery_info(10, 3, 20 / 3) == {"images": 10, "queries": 3, "ratio": 3.33, "test_ratio": 6.67}
    assert retrieval.gallery_info(5, 0, None) == {"images": 5, "queries": 0, "ratio": None, "test_ratio": None}


def test_retrieval_training_set_has_exactly_its_documented_columns():
    frame = retrieval_training_set(HAND, HAND_VAL)
    assert frame.columns.tolist() == ["path", "file", "sha1", "group", "texts"]
    assert frame.index.tolist() == list(range(len(frame)))


def test_no_texts_score_as_an_empty_float64_matrix_per_model():
    scores = retrieval.text_image_scores({"m": (None, None), "n": (None, None)}, [], ["/a", "/b"], None)
    assert list(scores) == ["m", "n"]
    assert all(s.shape == (0, 2) and s.dtype == torch.float64 for s in scores.values())


def test_bootstrap_resamples_can_draw_the_first_query():
    out = retrieval_metrics(np.array([[0], [1]]), [{0}, {0}], ks=(1,), n_boot=1000)  # only query 0 hits
    assert out["R@1"] == 0.5 and out["R@1_low"] == 0.0 and out["R@1_high"] == 1.0


def test_out_of_fold_choice_uses_the_given_seed_and_two_folds_are_enough(monkeypatch):
    n, groups = 60, np.arange(60)
    seen, real = [], retrieval.choose_setting
    monkeypatch.setattr(retrieval, "choose_setting", lambda *a: seen.append(list(a[3])) or real(*a))
    rng = np.random.default_rng(1)
    hit = {"steady": rng.random(n) < 0.5, "lucky": rng.random(n) < 0.5}
    rank = lambda s: hits_ranking(hit[s.weights[0][0]])
    select_out_of_fold(rank, STAGES, [{0}] * n, groups, seed=3)
    folds = utils.grouped_fold_ids(np.zeros(n, dtype=int), groups, retrieval.SELECTION_FOLDS, 3)
    assert seen[:-1] == [np.flatnonzero(folds != f).tolist() for f in range(retrieval.SELECTION_FOLDS)]
    two = select_out_of_fold(rank, STAGES, [{0}] * 50, np.repeat([0, 1], 25), seed=0)  # two groups: two folds
    assert len(two.fold_choices) == 2 and "chosen on 1 of 2 folds of 50" in two.how


def test_no_held_out_queries_give_an_empty_integer_ranking_and_an_empty_report_with_its_columns():
    none = select_out_of_fold(lambda s: 1 / 0, STAGES, [], np.zeros(0, int), seed=0)
    assert none.oof_ranked.dtype == torch.long and none.oof_ranked.shape == (0, retrieval.RANKING_DEPTH)
    assert none.how == "no held-out queries: nothing chosen, the default fixed in advance"
    table = selection_report(lambda s: 1 / 0, {"steady": none.chosen}, none, [], {"all": []})
    assert table.empty and table.columns.tolist() == ["setting", "queries", "n"]


def test_the_report_gives_the_intervals_of_1000_resampled_queries():
    n, first = 60, np.random.default_rng(2).integers(0, 10, 60)  # the relevant image's position: MRR varies
    ranked = torch.stack([torch.roll(torch.arange(10), int(p)) for p in first])
    rank = lambda s: ranked
    selection = select_out_of_fold(rank, STAGES, [{0}] * n, np.arange(n), seed=0)
    table = selection_report(rank, {}, selection, [{0}] * n, {"all": range(n)})
    expected = retrieval_metrics(selection.oof_ranked, [{0}] * n, n_boot=1000)
    assert table.drop(columns=["setting", "queries", "n"]).iloc[0].to_dict() == expected
