"""Tracks 2 and 3 for entrep-prototypical.ipynb: image-to-image and text-to-image retrieval.

1. Sets      the retrieval database, what is held out before any training, validation queries, and the
             supervision the data holds for learning retrieval
2. Ranking   exact cosine top-k without the query's own content, region re-ranking, score fusion
3. Choices   Recall@k / MRR with bootstrap intervals; the embedding and re-ranking chosen on held-out
             queries only

Embeddings come from utils (BiomedCLIP, DINOv2 features) and training (the contrastively tuned
BiomedCLIP). Layout: features [N, D] with unit rows; a ranking [Q, k] holds gallery row indices.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from runtime import Runtime
from utils import (
    FINE_CLASS_TEXTS,
    PROMPT_TEMPLATES,
    RETRIEVAL_GALLERIES,
    Clip,
    EntrepData,
    FeatureTable,
    embed_texts,
    finding_key,
    split_finding_lines,
    split_groups,
)

# Grids searched on held-out queries only (project's choices).
RERANK_BETA_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # region re-ranking boost
SCORE_FUSION_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 0.75)  # score fusion of two retrieval embeddings

# =============================================================================================
# 1. Sets: the database, the held-out queries, the supervision for learning
# =============================================================================================


def gallery_images(data: EntrepData, queries: Mapping[str, pd.DataFrame], mode: str = "test_folders") -> pd.DataFrame:
    """The images Tracks 2 and 3 answer from: file, path, sha1, listed.

    "test_folders" (default): every readable image in the folders holding the chosen test lists' images,
    listed or not; the challenge's database is wider than the lists (ENTREP.md: the paper authors' answers
    were mostly images no list names). "lists": only the images the chosen cls and i2i lists name.
    "all": test_folders plus every labelled and annotated image. Identical contents are kept once
    (a listed file first, then by path).
    """
    if mode not in RETRIEVAL_GALLERIES:
        raise ValueError(f"retrieval_gallery={mode!r}: use one of {RETRIEVAL_GALLERIES}.")
    listed = pd.concat([queries["cls"], queries["i2i"]])
    listed = listed[listed["path"] != ""]
    rows = listed[["file", "path", "sha1"]]
    if mode != "lists":
        folders = {str(Path(p).parent) for p in listed["path"]}
        rows = data.folder_images[data.folder_images["folder"].isin(folders)][["file", "path", "sha1"]]
    if mode == "all":
        annotated = [*data.images["path"], *data.i2i["query_path"], *data.i2i["match_path"], *data.t2i["path"]]
        rows = pd.concat([rows, pd.DataFrame({"file": [Path(p).name for p in annotated], "path": annotated,
                                              "sha1": [data.sha1[p] for p in annotated]})])
    rows = rows.assign(listed=rows["path"].isin(set(listed["path"])))
    return rows.sort_values(["listed", "path"], ascending=[False, True]).drop_duplicates("sha1").reset_index(drop=True)


def held_out_images(data: EntrepData, train_paths: Iterable[str], val_paths: Iterable[str]) -> set[str]:
    """The images retrieval is validated on, fixed before any training: the validation images and both
    images of every i2i pair that touches no training image (pairs stay whole: the split keeps a pair's
    labelled images on one side, and unlabelled pair images are in neither). No model trains on them."""
    seen = set(train_paths)
    pairs = [(q, m) for q, m in zip(data.i2i["query_path"], data.i2i["match_path"]) if not {q, m} & seen]
    return set(val_paths) | {p for pair in pairs for p in pair}


def i2i_eval_set(i2i: pd.DataFrame, distractors: Sequence[str] = ()) -> tuple[list[str], list[int], list[set[int]]]:
    """Track 2 validation from annotated pairs: the gallery is every image of the pairs plus `distractors`
    (other images, as the test's database holds far more than the partners); each pair's query is a
    query and its match relevant. Returns (gallery paths, query rows, relevant row sets)."""
    pair_images = sorted(set(i2i["query_path"]) | set(i2i["match_path"]))
    gallery = pair_images + sorted(set(distractors) - set(pair_images))
    row = {p: i for i, p in enumerate(gallery)}
    relevant: dict[int, set[int]] = defaultdict(set)
    for q, m in zip(i2i["query_path"], i2i["match_path"]):
        if q != m:
            relevant[row[q]].add(row[m])
    return gallery, sorted(relevant), [relevant[q] for q in sorted(relevant)]


def validation_distractors(candidates: Sequence[str], n_pair_images: int, gallery_size: int, n_queries: int,
                           seed: int) -> list[str]:
    """Distractors for i2i_eval_set: as many of `candidates` (labelled images outside the pairs, seeded
    draw) as make the validation gallery as many times larger than its queries as the test's is
    (gallery_size / n_queries); all of them when there is no test list to copy."""
    candidates = sorted(candidates)
    n = len(candidates) if n_queries == 0 else round(n_pair_images * max(gallery_size / n_queries - 1, 0))
    picked = np.random.default_rng(seed).permutation(len(candidates))[:n]
    return [candidates[i] for i in sorted(picked)]


def caption_queries(t2i: pd.DataFrame, gallery: Sequence[str]) -> tuple[list[str], list[set[int]]]:
    """Track 3 validation from t2i.json: every distinct caption line (as description_queries) is a query,
    the gallery rows of every image carrying it relevant; images outside the gallery are dropped."""
    row = {p: i for i, p in enumerate(gallery)}
    return _finding_queries((text, row[p]) for text, p in zip(t2i["text"], t2i["path"]) if p in row)


def description_queries(descriptions: Sequence[str]) -> tuple[list[str], list[set[int]]]:
    """Track 3 validation from the public release: every distinct English finding line is a query and
    every image (index into `descriptions`) carrying it is relevant. Lines are compared case- and
    space-insensitively without end punctuation; the first spelling is the query text."""
    return _finding_queries((text, i) for i, text in enumerate(descriptions))


def _finding_queries(texts: Iterable[tuple[str, int]]) -> tuple[list[str], list[set[int]]]:
    """(text, gallery row) pairs -> (distinct finding lines, the rows carrying each)."""
    relevant: dict[str, set[int]] = {}
    spelling: dict[str, str] = {}
    for text, i in texts:
        for line in split_finding_lines(text):
            key = finding_key(line)
            spelling.setdefault(key, line)
            relevant.setdefault(key, set()).add(i)
    return [spelling[k] for k in relevant], list(relevant.values())


def retrieval_training_set(data: EntrepData, exclude: Iterable[str], class_texts: bool = True) -> pd.DataFrame:
    """The supervision the data holds for learning retrieval, without the `exclude`d (held-out) images:
    one row per labelled or annotated image: path, sha1, group (images linked by an i2i pair, one
    examination or identical bytes share it: split_groups), texts (its t2i captions, the finding lines of
    its English description and, with class_texts, its label's prompts in the paper diagram's template)."""
    texts: dict[str, list[str]] = defaultdict(list)
    for text, path in zip(data.t2i["text"], data.t2i["path"]):
        texts[path].append(text)
    for path, description, label in zip(data.images["path"], data.images["description_en"], data.images["label"]):
        texts[path] += split_finding_lines(description)
        texts[path] += [PROMPT_TEMPLATES[0].format(t) for t in FINE_CLASS_TEXTS[label]] if class_texts else []
    paths = sorted((set(data.images["path"]) | set(data.i2i["query_path"]) | set(data.i2i["match_path"])
                    | set(data.t2i["path"])) - set(exclude))
    frame = pd.DataFrame({"path": paths, "file": [Path(p).name for p in paths], "sha1": [data.sha1[p] for p in paths]})
    return frame.assign(group=split_groups(frame, data.i2i), texts=[sorted(set(texts[p])) for p in paths])


# =============================================================================================
# 2. Ranking
# =============================================================================================


def cosine_topk(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int, query_ids: Sequence | None = None,
                gallery_ids: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery rows by cosine (give unit rows: the score is their dot product) for each query:
    (scores [Q, k], indices [Q, k]), best first, equal
    scores by lower gallery index. A pair with equal ids (the query itself, or the same content: pass
    file_sha1s) is never returned; a slot with no candidate left holds index -1 and score -inf.
    Queries are scored in blocks of at most 2^24 scores, so memory stays bounded for any gallery."""
    n_q, n_g = len(query_feats), len(gallery_feats)
    k = min(k, n_g)
    same = None
    if query_ids is not None:
        codes = {v: i for i, v in enumerate(dict.fromkeys([*query_ids, *gallery_ids]))}
        q_codes, g_codes = (torch.tensor([codes[v] for v in ids]) for ids in (query_ids, gallery_ids))
    scores, indices = [torch.empty(0, k)], [torch.empty(0, k, dtype=torch.long)]
    block = max(1, 2**24 // max(n_g, 1))
    for start in range(0, n_q, block):
        sim = query_feats[start:start + block].float() @ gallery_feats.float().T  # (q, G)
        if query_ids is not None:
            same = q_codes[start:start + block, None] == g_codes[None, :]
            sim.masked_fill_(same, float("-inf"))
        s, i = torch.sort(sim, dim=1, descending=True, stable=True)
        scores.append(s[:, :k].clone())  # a view would keep the block's whole sorted matrix alive
        indices.append(i[:, :k].masked_fill(s[:, :k] == float("-inf"), -1))
    return torch.cat(scores), torch.cat(indices)


def rerank_by_region(scores: torch.Tensor, indices: torch.Tensor, query_region: torch.Tensor,
                     gallery_region: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank each shortlist by score + beta * P(same region), P = sum_c p_query[c] * p_candidate[c] from
    the coarse prototype classifier: i2i partners share the region but often not the side or state
    (ENTREP.md), so the fine label must not be asked for. Ties keep the previous order."""
    agree = (query_region[:, None, :] * gallery_region[indices.clamp(min=0)]).sum(-1)  # (Q, K)
    new_scores = scores + beta * agree
    order = torch.sort(new_scores, dim=1, descending=True, stable=True).indices
    return new_scores.gather(1, order), indices.gather(1, order)


def rank_gallery(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_ids: Sequence, gallery_ids: Sequence,
                 k: int = 10, query_region: torch.Tensor | None = None, gallery_region: torch.Tensor | None = None,
                 beta: float = 0.0) -> torch.Tensor:
    """Track 2's ranking [Q, k] of gallery indices: cosine top-k without the query's own content, then
    region re-ranking when beta > 0. Validation and the test answers both rank with it."""
    scores, ranked = cosine_topk(query_feats, gallery_feats, k, query_ids, gallery_ids)
    if beta:
        ranked = rerank_by_region(scores, ranked, query_region, gallery_region, beta)[1]
    return ranked


def fuse_embeddings(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Score fusion as one embedding: [sqrt(w) a, sqrt(1 - w) b] of unit rows is a unit row whose cosine
    with another is w * cosine_a + (1 - w) * cosine_b. [N, Da + Db]."""
    return torch.cat([math.sqrt(weight) * a, math.sqrt(1.0 - weight) * b], dim=1)


def text_to_image(clip: Clip, texts: Sequence[str], image_feats: torch.Tensor, rt: Runtime,
                  k: int = 10) -> torch.Tensor:
    """Track 3: embed `texts` with the CLIP text tower and rank the gallery [G, D]: indices [T, k]."""
    return cosine_topk(embed_texts(clip, texts, rt), image_feats, k)[1]


# =============================================================================================
# 3. Choices: scores on held-out queries, the embedding and re-ranking chosen
# =============================================================================================


def retrieval_hits(ranked: torch.Tensor | np.ndarray, relevant: Sequence[Iterable[int]]) -> np.ndarray:
    """[Q, K] bool: ranked[q, j] is one of the gallery indices relevant to query q."""
    ranked = np.asarray(ranked)
    if len(relevant) != len(ranked):
        raise ValueError(f"{len(ranked)} rankings but {len(relevant)} relevance sets: give one per query.")
    hits = [[int(g) in set(r) for g in row] for row, r in zip(ranked, relevant)]
    return np.array(hits, dtype=bool).reshape(ranked.shape)


def retrieval_metrics(ranked: torch.Tensor | np.ndarray, relevant: Sequence[Iterable[int]],
                      ks: Sequence[int] = (1, 5, 10),
                      n_boot: int = 0, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Recall@k (a relevant item in the top k; a query with none counts as a miss) and MRR (1 / rank of
    the first relevant item, 0 when it is not in the ranking) over the queries. With n_boot, each metric
    also gets `_low` / `_high`: the percentile bootstrap interval over queries resampled with replacement
    (resamples depend only on (seed, number of queries): paired across embeddings)."""
    hits = retrieval_hits(ranked, relevant)
    if not len(hits):
        return {**{f"R@{k}": float("nan") for k in ks}, "MRR": float("nan")}
    per_query = {f"R@{k}": hits[:, :k].any(1).astype(float) for k in ks}  # (Q,) each
    per_query["MRR"] = 1.0 / np.where(hits, np.arange(1, hits.shape[1] + 1), np.inf).min(1, initial=np.inf)  # 0: no hit
    out = {m: float(v.mean()) for m, v in per_query.items()}
    if n_boot:
        idx = np.random.default_rng(seed).integers(0, len(hits), size=(n_boot, len(hits)))  # (B, Q)
        for m, v in per_query.items():
            out[f"{m}_low"], out[f"{m}_high"] = np.quantile(v[idx].mean(1), [alpha / 2, 1 - alpha / 2]).tolist()
    return out


def best_retrieval_row(table: pd.DataFrame) -> pd.Series:
    """The retrieval choice rule: the row with the best R@1, then MRR, then the first in the table's order."""
    return table.sort_values(["R@1", "MRR"], ascending=False, kind="stable").iloc[0]


def choose_rerank_beta(scores: torch.Tensor, indices: torch.Tensor, query_region: torch.Tensor,
                       gallery_region: torch.Tensor, relevant: Sequence[Iterable[int]]) -> tuple[float, pd.DataFrame]:
    """Region re-ranking boost from RERANK_BETA_GRID chosen on the given pairs only: best R@1, then MRR,
    then the smaller beta. Returns (beta, table of R@1 / R@5 / MRR per beta)."""
    rerank = lambda beta: rerank_by_region(scores, indices, query_region, gallery_region, beta)[1]
    table = pd.DataFrame([{"beta": beta, **retrieval_metrics(rerank(beta), relevant, (1, 5))}
                          for beta in sorted(RERANK_BETA_GRID)])
    return float(best_retrieval_row(table)["beta"]), table


def evaluate_i2i(feats: Mapping[str, torch.Tensor], ids: Sequence[str], query_rows: Sequence[int],
                 relevant: Sequence[set[int]], choose_on: Sequence[int], region: torch.Tensor | None = None,
                 k: int = 10) -> tuple[pd.DataFrame, dict]:
    """Track 2 on annotated pairs, per candidate embedding {name: [G, D]} of one gallery (ids: its content
    ids, so no query finds itself), plain and region re-ranked (region [G, 4], beta by choose_rerank_beta).
    The re-ranking boost and then the embedding (by R@1, then MRR) are chosen on the queries at positions
    `choose_on`: pairs no model trained on where there are any, else all pairs, which the table and the
    choice then say. Returns (table: embedding, pairs, ranking, beta, n, R@1, R@5, R@10, MRR, each with
    its 95% bootstrap _low / _high; choice: embedding, beta, chosen_on)."""
    queries = list(query_rows)
    if not queries:
        return pd.DataFrame(), {"embedding": next(iter(feats)), "beta": 0.0,
                                "chosen_on": "no annotated pairs: the first embedding, no re-ranking"}
    held_out = bool(len(choose_on))
    choose_on = list(choose_on) if held_out else list(range(len(queries)))
    subsets = {"held-out pairs (choice)": choose_on} if held_out else {}
    every = "all pairs" + ("" if held_out else " (choice; includes pairs a model trained on)")
    subsets[every] = list(range(len(queries)))
    rows, betas = [], {}
    for name, f in feats.items():
        scores, ranked = cosine_topk(f[queries], f, k, [ids[q] for q in queries], ids)
        beta = 0.0 if region is None else choose_rerank_beta(scores[choose_on], ranked[choose_on],
                                                             region[queries][choose_on], region,
                                                             [relevant[i] for i in choose_on])[0]
        reranked = ranked if region is None else rerank_by_region(scores, ranked, region[queries], region, beta)[1]
        betas[name] = beta
        for subset, idx in subsets.items():
            for ranking, r, b in (("plain", ranked, 0.0), ("region re-rank", reranked, beta)):
                rows.append({"embedding": name, "pairs": subset, "ranking": ranking, "beta": b, "n": len(idx),
                             **retrieval_metrics(r[idx], [relevant[i] for i in idx], n_boot=1000)})
    table = pd.DataFrame(rows)
    pick = table[(table["pairs"] == next(iter(subsets))) & (table["ranking"] == "region re-rank")]
    best = best_retrieval_row(pick)
    where = f"{len(choose_on)} held-out pairs" if held_out else f"all {len(queries)} pairs (none held out)"
    return table, {"embedding": best["embedding"], "beta": betas[best["embedding"]], "chosen_on": where}


def evaluate_t2i(models: Mapping[str, tuple[Clip, FeatureTable]],
                 query_sets: Mapping[str, tuple[Sequence[str], Sequence[set[int]], Sequence[str]]],
                 rt: Runtime) -> tuple[pd.DataFrame, dict]:
    """Track 3 on held-out queries, per candidate {name: (CLIP model, its image FeatureTable)} and query set
    {name: (texts, relevant gallery rows, gallery paths)}: R@1 / R@5 / R@10 / MRR with bootstrap intervals.
    The model is chosen on the first query set that has queries (R@1, then MRR); with none, the first
    model, said so. Returns (table: queries, model, n, gallery, metrics; choice: model, chosen_on)."""
    rows = [{"queries": q, "model": name, "n": len(texts), "gallery": len(paths),
             **retrieval_metrics(text_to_image(clip, texts, table[paths], rt), relevant, n_boot=1000)}
            for q, (texts, relevant, paths) in query_sets.items() if len(texts)
            for name, (clip, table) in models.items()]
    table = pd.DataFrame(rows)
    if table.empty:
        return table, {"model": next(iter(models)),
                       "chosen_on": "no held-out captions or finding lines: the first model"}
    first = table[table["queries"] == table["queries"].iloc[0]]
    best = best_retrieval_row(first)
    return table, {"model": best["model"], "chosen_on": f"{best['n']} held-out {best['queries']}"}
