"""Retrieval at scale: the gallery-chunked exact search and the optional FAISS index agree with a
brute-force reference (CPU, tiny seeded data, no network)."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import cosine_topk, faiss_index


def integer_feats(n: int, d: int, seed: int) -> torch.Tensor:
    """Small-integer rows: every dot product is exact in float32 whatever the summation order, and
    duplicates plus the few distinct values make many ties."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    base[rng.choice(n, n // 4, replace=False)] = base[rng.choice(n, n // 4, replace=False)]  # duplicates
    return torch.from_numpy(base)


def brute_force(q: torch.Tensor, g: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    """Reference: full score matrix, excluded pairs at -inf, stable sort (ties by lower index)."""
    sim = q.double() @ g.double().T
    if exclude is not None:
        sim[exclude] = float("-inf")
    s, i = torch.sort(sim, dim=1, descending=True, stable=True)
    return s[:, :k].float(), i[:, :k]


def clustered_unit(n: int, d: int, seed: int, n_clusters: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g)
    return F.normalize(centres[torch.randint(n_clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("chunk_size, gallery_chunk_size", [(7, 5), (3, 64), (1024, 11), (50, 50)])
def test_chunked_exact_search_equals_brute_force_with_ties(chunk_size, gallery_chunk_size):
    q, g = integer_feats(40, 6, 0), integer_feats(157, 6, 1)
    for k in (1, 4, 10):
        s, i = cosine_topk(q, g, k, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size)
        ref_s, ref_i = brute_force(q, g, k)
        assert torch.equal(i, ref_i), (k, chunk_size, gallery_chunk_size)
        assert torch.equal(s, ref_s)
    s, i = cosine_topk(q, g, 0, chunk_size=chunk_size, gallery_chunk_size=gallery_chunk_size)
    assert s.shape == i.shape == (40, 0)


def test_chunked_exact_search_excludes_self_and_equal_ids_across_chunks():
    g = integer_feats(60, 5, 2)
    s, i = cosine_topk(g, g, 8, exclude_self=True, chunk_size=9, gallery_chunk_size=7)
    assert torch.equal(i, brute_force(g, g, 8, torch.eye(60, dtype=torch.bool))[1])
    ids = [f"exam{j // 3}" for j in range(60)]  # three views per examination share an id
    _, i = cosine_topk(g[::3], g, 5, query_ids=ids[::3], gallery_ids=ids, gallery_chunk_size=4)
    same = torch.tensor([[a == b for b in ids] for a in ids[::3]])
    assert torch.equal(i, brute_force(g[::3], g, 5, same)[1])


def test_exact_search_handles_empty_queries_and_tiny_galleries():
    g = integer_feats(3, 4, 3)
    s, i = cosine_topk(g[:0], g, 5)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    s, i = cosine_topk(g, g, 5, exclude_self=True, gallery_chunk_size=1)
    assert i.shape == (3, 2) and not (i == torch.arange(3)[:, None]).any()


def test_faiss_flat_index_equals_exact_search_with_exclusions():
    pytest.importorskip("faiss")  # in requirements.txt; skipped only where it could not be installed
    g = clustered_unit(300, 16, 0)
    index = faiss_index(g, kind="flat")
    s_exact, i_exact = cosine_topk(g, g, 10, exclude_self=True)
    s, i = cosine_topk(g, g, 10, exclude_self=True, index=index)
    assert torch.equal(i, i_exact) and torch.allclose(s, s_exact, atol=1e-5)
    ids = [j // 2 for j in range(300)]
    _, i_exact = cosine_topk(g[::2], g, 5, query_ids=ids[::2], gallery_ids=ids)
    _, i = cosine_topk(g[::2], g, 5, query_ids=ids[::2], gallery_ids=ids, index=index)
    assert torch.equal(i, i_exact)


def test_faiss_flat_orders_equal_scores_by_lower_index_like_exact_search():
    pytest.importorskip("faiss")
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])  # 1 and 3 tie
    _, i = cosine_topk(q, g, 4, index=faiss_index(g))
    assert i[0].tolist() == [1, 3, 2, 0]


def test_faiss_ivf_agrees_with_exact_top1_on_clustered_data():
    pytest.importorskip("faiss")
    g = clustered_unit(2000, 32, 1)
    q = F.normalize(g[:200] + 0.05 * torch.randn(200, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    index = faiss_index(g, kind="ivf", nprobe=8, seed=0)
    _, i_exact = cosine_topk(q, g, 1)
    _, i = cosine_topk(q, g, 1, index=index)
    assert (i[:, 0] == i_exact[:, 0]).float().mean() >= 0.95
    again = cosine_topk(q, g, 1, index=faiss_index(g, kind="ivf", nprobe=8, seed=0))[1]
    assert torch.equal(i, again)  # seeded training: the same index twice


def test_faiss_index_must_match_the_gallery_and_kind_is_checked():
    pytest.importorskip("faiss")
    g = clustered_unit(50, 8, 3)
    with pytest.raises(ValueError, match="holds 50 rows but the gallery has 49"):
        cosine_topk(g[:3], g[:49], 2, index=faiss_index(g))
    with pytest.raises(ValueError, match="'flat'"):
        faiss_index(g, kind="hnsw")


def test_missing_faiss_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        faiss_index(clustered_unit(10, 4, 0))
