"""Tracks 2 and 3 for entrep-prototypical.ipynb: image-to-image and text-to-image retrieval.

1. Sets      the retrieval database; content groups; what is held out before any training; validation
             queries and galleries padded to the test database's proportions; the supervision for learning
2. Ranking   Track 2's procedure on one gallery's similarity matrices: score fusion, region consistency,
             k-reciprocal re-ranking with query expansion, mutual ranks or one-to-one assignment; Track 3's
             fused text-image scores; exact top-k without the query's own content
3. Choices   Recall@k / MRR with bootstrap intervals; the procedure's setting chosen out of fold on held-out
             queries grouped by content, or a default fixed in advance when they are few

Embeddings come from utils (BiomedCLIP, DINOv2 features) and training (the contrastively tuned BiomedCLIP).
Layout: features [N, D] with unit rows; a gram [G, G] (or text scores [T, G]) holds their cosines; a ranking
[Q, k] holds gallery row indices, -1 where no candidate is left.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

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
    grouped_fold_ids,
    split_finding_lines,
    split_groups,
)

# The search of the ranking procedure, made on held-out queries only (project's choices).
FUSION_STEP: float = 0.25  # score-fusion weights: the simplex grid of this step over the available embeddings
RERANK_BETA_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)  # weight of the region-consistency term
# k1, k2, lambda of k-reciprocal re-ranking: Zhong et al. (CVPR 2017) use 20, 6, 0.3 where a person has many
# images; an ENT image has one or a few partners, so the neighbourhoods are smaller.
K_RECIPROCAL: tuple[int, int, float] = (10, 3, 0.3)
MUTUAL_RANKINGS: tuple[str, ...] = ("off", "reciprocal", "assignment")  # see rank_i2i
RRF_K: int = 10  # reciprocal-rank fusion: 1 / (RRF_K + rank)
ASSIGNMENT_CANDIDATES: int = 10  # one-to-one assignment among each query's best this many
RANKING_DEPTH: int = 10  # rankings hold this many answers: R@10 and MRR@10
SELECTION_FOLDS: int = 5  # grouped folds of held-out queries for the out-of-fold choice
MIN_SELECTION_QUERIES: int = 50  # fewer held-out queries: no choice, the default fixed in advance

# =============================================================================================
# 1. Sets: the database, content groups, the held-out queries and galleries, the supervision
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
        annotated = annotated_images(data)[["file", "path", "sha1"]]
        rows = pd.concat([rows, annotated])
    rows = rows.assign(listed=rows["path"].isin(set(listed["path"])))
    return rows.sort_values(["listed", "path"], ascending=[False, True]).drop_duplicates("sha1").reset_index(drop=True)


def annotated_images(data: EntrepData) -> pd.DataFrame:
    """Every labelled or annotated image (labelled, i2i, t2i), by path: path, file, sha1 and its content group:
    images linked by identical bytes, one file name (case-insensitively), one examination or an i2i pair share
    it (utils.split_groups: the links the classification split keeps on one side)."""
    paths = sorted(set(data.images["path"]) | set(data.i2i["query_path"]) | set(data.i2i["match_path"])
                   | set(data.t2i["path"]))
    frame = pd.DataFrame({"path": paths, "file": [Path(p).name for p in paths], "sha1": [data.sha1[p] for p in paths]})
    return frame.assign(group=split_groups(frame, data.i2i))


def held_out_images(data: EntrepData, train_paths: Iterable[str], val_paths: Iterable[str]) -> set[str]:
    """The images retrieval is validated on, fixed before any training and closed under content groups
    (annotated_images): every group that holds a validation image, and every group that holds no training
    image (on the real train release about a quarter of the i2i pairs carry no label). A training image in
    such a group (a split other than "grouped", or a link only an unlabelled image makes) is held out too:
    every model whose features a retrieval figure uses must train without it."""
    frame = annotated_images(data)
    sides = frame.assign(train=frame["path"].isin(set(train_paths)), val=frame["path"].isin(set(val_paths)))
    by_group = sides.groupby("group")[["train", "val"]].any()
    held = by_group.index[by_group["val"] | ~by_group["train"]]
    return set(frame.loc[frame["group"].isin(held), "path"])


def unseen_images(data: EntrepData, held: Iterable[str]) -> list[str]:
    """Images no model trains on, one path per content, for padding validation galleries: the `held`-out images
    and every test-folder image whose bytes no annotated image shares (a gallery image needs no label)."""
    annotated = set(annotated_images(data)["sha1"])
    folder = data.folder_images[~data.folder_images["sha1"].isin(annotated)]
    return unique_content([*sorted(held), *sorted(folder["path"])], data.sha1)


def unique_content(paths: Iterable[str], sha1: Mapping[str, str]) -> list[str]:
    """`paths` keeping the first path of each content (identical bytes are one gallery image)."""
    first: dict[str, str] = {}
    for p in paths:
        first.setdefault(sha1[p], p)
    return list(first.values())


def pad_gallery(gallery: Sequence[str], candidates: Sequence[str], n_queries: int, ratio: float | None,
                sha1: Mapping[str, str], seed: int) -> list[str]:
    """`gallery` followed by a seeded draw of `candidates` (no content twice) up to `ratio` images per query,
    the test database's gallery / query ratio, so validation ranks against as many images per query as the
    test does; all candidates when they are too few (report the ratio achieved) or there is no test list
    (ratio None). The gallery's own rows keep their positions."""
    have = {sha1[p] for p in gallery}
    pool = sorted(p for p in unique_content(candidates, sha1) if sha1[p] not in have)
    n = len(pool) if ratio is None else max(round(ratio * n_queries) - len(gallery), 0)
    picked = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [*gallery, *(pool[i] for i in sorted(picked))]


def i2i_eval_set(data: EntrepData, held: set[str]) -> tuple[list[str], list[int], list[set[int]], np.ndarray]:
    """Track 2 validation from the annotated pairs whose images are all `held` out: the gallery holds their
    images, one path per content; each pair's query is a query and its match's row relevant (a pair of one
    content finds nothing but itself: no query). Returns (gallery paths, query rows, relevant row sets, each
    query's content group: a pair's two directions, one examination and identical bytes share it); pad the
    gallery afterwards (pad_gallery keeps these rows)."""
    sha1 = data.sha1
    pairs = [(q, m) for q, m in zip(data.i2i["query_path"], data.i2i["match_path"])
             if {q, m} <= held and sha1[q] != sha1[m]]
    gallery = unique_content(sorted({p for pair in pairs for p in pair}), sha1)
    row = {sha1[p]: i for i, p in enumerate(gallery)}
    relevant: dict[int, set[int]] = defaultdict(set)
    for q, m in pairs:
        relevant[row[sha1[q]]].add(row[sha1[m]])
    annotated = annotated_images(data)
    group = dict(zip(annotated["sha1"], annotated["group"]))  # identical bytes share a group
    rows = sorted(relevant)
    return gallery, rows, [relevant[q] for q in rows], np.array([group[sha1[gallery[q]]] for q in rows], dtype=int)


def gallery_info(n_images: int, n_queries: int, test_ratio: float | None) -> dict:
    """A validation gallery in numbers: images, queries, images per query achieved and the test database's."""
    ratio = round(n_images / n_queries, 2) if n_queries else None
    return {"images": n_images, "queries": n_queries, "ratio": ratio,
            "test_ratio": None if test_ratio is None else round(test_ratio, 2)}


def description_queries(descriptions: Sequence[str]) -> tuple[list[str], list[set[int]]]:
    """Every distinct English finding line of `descriptions` (one per gallery row, "" for none) and the rows
    carrying it. Lines are compared case- and space-insensitively without end punctuation (finding_key);
    the first spelling is the query text."""
    relevant: dict[str, set[int]] = {}
    spelling: dict[str, str] = {}
    for i, text in enumerate(descriptions):
        for line in split_finding_lines(text):
            spelling.setdefault(finding_key(line), line)
            relevant.setdefault(finding_key(line), set()).add(i)
    return [spelling[k] for k in relevant], list(relevant.values())


def caption_queries(t2i: pd.DataFrame, gallery: Sequence[str], sha1: Mapping[str, str]) -> tuple[list[str],
                                                                                                  list[set[int]]]:
    """Track 3 validation from t2i.json: each caption whose image is in the gallery, exactly as given, with the
    gallery row of that image alone (by content): the image the caption was written for."""
    row = {sha1[p]: i for i, p in enumerate(gallery)}
    kept = [(text, row[sha1[p]]) for text, p in zip(t2i["text"], t2i["path"]) if sha1.get(p) in row]
    return [text for text, _ in kept], [{r} for _, r in kept]


def t2i_eval_queries(data: EntrepData, gallery: Sequence[str], trained_texts: Iterable[str]) -> pd.DataFrame:
    """Track 3 validation queries on a gallery of held-out images, one row each: text, relevant (gallery rows),
    kind ("finding line": a distinct line of a gallery image's English description, every image carrying it
    relevant; "caption": a t2i caption, its own image only), seen (its finding_key is one of `trained_texts`',
    the retrieval training's; an unseen line tests wording no model has met) and links (text key and the
    relevant images' content groups: what must stay in one fold)."""
    description = dict(zip(map(data.sha1.get, data.images["path"]), data.images["description_en"]))  # by content
    lines = description_queries([description.get(data.sha1[p], "") for p in gallery])
    captions = caption_queries(data.t2i, gallery, data.sha1)
    seen = {finding_key(t) for t in trained_texts}
    annotated = annotated_images(data)
    group = dict(zip(annotated["sha1"], annotated["group"]))  # identical bytes share a group
    frame = pd.DataFrame([{"text": t, "relevant": r, "kind": kind, "seen": finding_key(t) in seen}
                          for kind, (texts, rels) in (("finding line", lines), ("caption", captions))
                          for t, r in zip(texts, rels)], columns=["text", "relevant", "kind", "seen"])
    links = [{finding_key(t), *(group[data.sha1[gallery[i]]] for i in r)} for t, r in zip(frame.text, frame.relevant)]
    return frame.assign(links=links)


def t2i_subsets(queries: pd.DataFrame) -> dict[str, list[int]]:
    """Track 3's reported query subsets: all, finding lines never seen in training, seen ones, captions."""
    kinds = {"all held-out queries": np.ones(len(queries), bool),
             "finding lines, unseen": (queries["kind"] == "finding line") & ~queries["seen"],
             "finding lines, seen": (queries["kind"] == "finding line") & queries["seen"],
             "captions (their own image)": queries["kind"] == "caption"}
    return {name: np.flatnonzero(np.asarray(mask)).tolist() for name, mask in kinds.items()}


def retrieval_training_set(data: EntrepData, exclude: Iterable[str], class_texts: bool = True) -> pd.DataFrame:
    """The supervision the data holds for learning retrieval, without the `exclude`d (held-out) images:
    one row per labelled or annotated image: path, file, sha1, group (annotated_images' content group), texts
    (its t2i captions, the finding lines of its English description and, with class_texts, its label's
    prompts in the paper diagram's template)."""
    texts: dict[str, list[str]] = defaultdict(list)
    for text, path in zip(data.t2i["text"], data.t2i["path"]):
        texts[path].append(text)
    for path, description, label in zip(data.images["path"], data.images["description_en"], data.images["label"]):
        texts[path] += split_finding_lines(description)
        texts[path] += [PROMPT_TEMPLATES[0].format(t) for t in FINE_CLASS_TEXTS[label]] if class_texts else []
    frame = annotated_images(data)
    frame = frame[~frame["path"].isin(set(exclude))].reset_index(drop=True)
    return frame.assign(texts=[sorted(set(texts[p])) for p in frame["path"]])


# =============================================================================================
# 2. Ranking: Track 2's procedure on a gallery's similarity matrices, Track 3's fused scores
# =============================================================================================


def _ranked(score: torch.Tensor, k: int, first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best columns (scores, indices) [Q, k], best first; equal scores by lower column index, or in
    the order of `first` (a second score of the same shape) when given; -inf (excluded) columns give -1."""
    order = None if first is None else torch.sort(first, dim=1, descending=True, stable=True).indices
    s, i = torch.sort(score if order is None else score.gather(1, order), dim=1, descending=True, stable=True)
    i = i if order is None else order.gather(1, i)
    return s[:, :k].clone(), i[:, :k].masked_fill(s[:, :k] == float("-inf"), -1)  # clone: no view of the block


def same_content(query_ids: Sequence, gallery_ids: Sequence) -> torch.Tensor:
    """[Q, G] bool: the query and the gallery image have one id (the same file, or the same bytes: pass sha1s)."""
    codes = {v: i for i, v in enumerate(dict.fromkeys([*query_ids, *gallery_ids]))}
    q, g = (torch.tensor([codes[v] for v in ids], dtype=torch.long) for ids in (query_ids, gallery_ids))
    return q[:, None] == g[None, :]


def cosine_topk(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int, query_ids: Sequence | None = None,
                gallery_ids: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery rows by cosine (give unit rows: the score is their dot product) for each query:
    (scores [Q, k], indices [Q, k]), best first, equal scores by lower gallery index. A pair with equal ids
    (the query itself, or the same content: pass sha1s) is never returned; a slot with no candidate left holds
    index -1 and score -inf. Queries are scored in blocks of at most 2^24 scores, so memory stays bounded."""
    n_q, n_g = len(query_feats), len(gallery_feats)
    k = min(k, n_g)
    scores, indices = [torch.empty(0, k)], [torch.empty(0, k, dtype=torch.long)]
    block = max(1, 2**24 // max(n_g, 1))
    for start in range(0, n_q, block):
        sim = query_feats[start:start + block].float() @ gallery_feats.float().T  # (q, G)
        if query_ids is not None:
            sim.masked_fill_(same_content(query_ids[start:start + block], gallery_ids), float("-inf"))
        s, i = _ranked(sim, k)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def gram_matrices(feats: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per embedding, the cosines [G, G] of one gallery's unit rows [G, D] (float64: sums of several stay exact).
    An embedding given as a list (several fold models' features, each [G, D_m]) gets the mean of the models'
    cosine matrices: features of different models are never averaged."""
    gram = lambda f: f.double() @ f.double().T
    return {name: gram(f) if isinstance(f, torch.Tensor) else torch.stack([gram(m) for m in f]).mean(0)
            for name, f in feats.items()}


def text_image_scores(models: Mapping[str, tuple[Clip, FeatureTable]], texts: Sequence[str], paths: Sequence[str],
                      rt: Runtime) -> dict[str, torch.Tensor]:
    """Per CLIP model {name: (model, its image FeatureTable)}, the cosines [T, G] of `texts` with the images."""
    if not len(texts):
        return {name: torch.zeros(0, len(paths), dtype=torch.float64) for name in models}
    return {name: embed_texts(clip, texts, rt).double() @ table[paths].double().T
            for name, (clip, table) in models.items()}


@dataclass(frozen=True)
class Setting:
    """One ranking procedure. weights: ((embedding, weight), ...), the score fusion (the cosines summed with
    these weights; the one fusion of Tracks 2 and 3). Track 2 only: beta, the region-consistency weight;
    k_reciprocal, Zhong et al.'s re-ranking with local query expansion; mutual, "off", "reciprocal"
    (reciprocal-rank fusion of a candidate's rank for the query with the query's rank for the candidate:
    mutual nearest neighbours first) or "assignment" (one answer per gallery image over the query set)."""

    weights: tuple[tuple[str, float], ...]
    beta: float = 0.0
    k_reciprocal: bool = False
    mutual: str = "off"

    def describe(self) -> str:
        parts = [" + ".join(f"{name} {w:g}" for name, w in self.weights)]
        parts += [f"region {self.beta:g}"] * bool(self.beta) + ["k-reciprocal"] * self.k_reciprocal
        return ", ".join(parts + ([f"mutual {self.mutual}"] if self.mutual != "off" else []))


def fused_scores(scores: Mapping[str, torch.Tensor], weights: Sequence[tuple[str, float]]) -> torch.Tensor:
    """Score fusion: sum of w * scores[name] (grams [G, G] or text scores [T, G])."""
    return sum(w * scores[name] for name, w in weights)


def k_reciprocal(sim: torch.Tensor, k1: int, k2: int, lam: float) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a gallery against itself: sim [G, G] -> scores [G, G],
    -((1 - lam) * Jaccard distance + lam * (1 - sim)). Image i's k-reciprocal set holds those of its k1 nearest
    (itself first) that have i among their k1 nearest, widened by a member's own k1/2-reciprocal set when more
    than 2/3 of that set is already in; the members weigh exp(-distance), normalised, and each image's weights
    are averaged over its k2 nearest (local query expansion); the Jaccard distance compares two such weights."""
    dist = 1.0 - sim.double()
    order = torch.sort(dist, dim=1, stable=True).indices  # (G, G): nearest first

    def reciprocal(i: int, k: int) -> torch.Tensor:
        near = order[i, :k + 1]
        return near[(order[near, :k + 1] == i).any(1)]

    weights = torch.zeros_like(dist)
    for i in range(len(dist)):
        members = reciprocal(i, k1)
        grown = [members] + [r for r in (reciprocal(int(c), round(k1 / 2)) for c in members)
                             if torch.isin(r, members).sum() > 2 / 3 * len(r)]
        members = torch.cat(grown).unique()
        w = torch.exp(-dist[i, members])
        weights[i, members] = w / w.sum()
    weights = weights[order[:, :k2]].mean(1)  # (G, G): each image's weights averaged over its k2 nearest
    overlap = torch.stack([torch.minimum(weights[i, cols], weights[:, cols]).sum(1)  # sum of min over i's columns
                           for i, cols in ((i, row.nonzero()[:, 0]) for i, row in enumerate(weights))])
    jaccard = 1 - overlap / (2 - overlap)  # rows sum to 1: sum of max = 2 - sum of min
    return -((1 - lam) * jaccard + lam * dist)


def reciprocal_ranks(score: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Mutual nearest neighbours by reciprocal-rank fusion: [Q, G] 1 / (RRF_K + q's rank of g) + 1 / (RRF_K + g's
    rank of q), ranks from 1 in score [G, G] (-inf: excluded, and still -inf), for the query rows `rows`."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, len(score) + 1).expand_as(order))
    fused = 1.0 / (RRF_K + rank[rows]) + 1.0 / (RRF_K + rank[:, rows].T)
    return fused.double().masked_fill(torch.isinf(score[rows]), float("-inf"))


def one_to_one(score: torch.Tensor, candidates: int = ASSIGNMENT_CANDIDATES) -> torch.Tensor:
    """The one-to-one assignment over the query set: scipy's linear_sum_assignment gives each query [Q, G] a
    distinct gallery image among its `candidates` best, maximising the summed score (two queries never share
    an answer: each image has one partner); that image moves first (score +inf), the rest keep their order.
    A query left without a free candidate keeps its ranking."""
    top_s, top_i = _ranked(score, candidates)
    big = 1e9
    cost = np.full(tuple(score.shape), big)
    q, j = np.nonzero(top_i.numpy() >= 0)
    cost[q, top_i.numpy()[q, j]] = -top_s.numpy()[q, j]
    rows, cols = linear_sum_assignment(cost)
    kept = cost[rows, cols] < big
    return score.clone().index_put_((torch.from_numpy(rows[kept]), torch.from_numpy(cols[kept])),
                                    torch.tensor(float("inf"), dtype=score.dtype))


def rank_i2i(grams: Mapping[str, torch.Tensor], setting: Setting, rows: Sequence[int], ids: Sequence,
             region: torch.Tensor | None = None, k: int = RANKING_DEPTH) -> torch.Tensor:
    """Track 2's ranking [Q, k] of a gallery for its query rows `rows` (a query is a gallery image), validation
    and test alike: fused cosines (grams [G, G]); + beta * P(same region) (region [G, 4] from a classifier: i2i
    partners share the region, not always the side or state); k-reciprocal re-ranking; then mutual ranks or the
    one-to-one assignment over the query set. Never the query's own content (ids: sha1s)."""
    score = fused_scores(grams, setting.weights)
    if setting.beta:
        score = score + setting.beta * (region.double() @ region.double().T)
    if setting.k_reciprocal:
        score = k_reciprocal(score, *K_RECIPROCAL)
    score = score.masked_fill(same_content(ids, ids), float("-inf"))
    mine = score[list(rows)]  # (Q, G)
    if setting.mutual == "reciprocal":
        return _ranked(reciprocal_ranks(score, list(rows)), k, first=mine)[1]
    return _ranked(one_to_one(mine) if setting.mutual == "assignment" else mine, k)[1]


def rank_t2i(scores: Mapping[str, torch.Tensor], setting: Setting, k: int = RANKING_DEPTH) -> torch.Tensor:
    """Track 3's ranking [T, k]: the fused text-image cosines (scores {model: [T, G]}), best first."""
    return _ranked(fused_scores(scores, setting.weights), k)[1]


# =============================================================================================
# 3. Choices: scores on held-out queries, the setting chosen out of fold
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
    (resamples depend only on (seed, number of queries): paired across settings)."""
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


def fusion_grid(names: Sequence[str], step: float = FUSION_STEP) -> list[tuple[tuple[str, float], ...]]:
    """Score-fusion weights over `names` summing to 1 in steps of `step`, zero weights left out: the first name
    alone first (the default), then the others in a fixed order."""
    n = round(1 / step)
    grid = [c for c in product(range(n + 1), repeat=len(names)) if sum(c) == n]
    grid.sort(key=lambda c: (-c[0], c))
    return [tuple((name, c * step) for name, c in zip(names, counts) if c) for counts in grid]


def i2i_stages(names: Sequence[str], region: bool) -> list[list[dict]]:
    """Track 2's search, stage by stage (choose_setting): the score fusion of `names` (the first alone is the
    default), the region weight (when a classifier gives regions), k-reciprocal re-ranking, mutual ranks or
    the one-to-one assignment. Each stage's first option is the default: off."""
    stages = [[{"weights": w} for w in fusion_grid(names)]]
    stages += [[{"beta": b} for b in RERANK_BETA_GRID]] if region else []
    return stages + [[{"k_reciprocal": False}, {"k_reciprocal": True}], [{"mutual": m} for m in MUTUAL_RANKINGS]]


def t2i_stages(names: Sequence[str]) -> list[list[dict]]:
    """Track 3's search: the score fusion of the CLIP models `names` (the first alone is the default)."""
    return [[{"weights": w} for w in fusion_grid(names)]]


def default_setting(stages: Sequence[Sequence[dict]]) -> Setting:
    """The setting fixed in advance: every stage's first option."""
    return Setting(**{key: value for stage in stages for key, value in stage[0].items()})


def choose_setting(rank: Callable[[Setting], torch.Tensor], stages: Sequence[Sequence[dict]],
                   relevant: Sequence[set[int]], rows: Sequence[int]) -> Setting:
    """Greedy, stage by stage, on the queries `rows` only: each stage takes its option of best R@1, then MRR,
    then the earliest, the earlier stages' choices fixed; a stage stays off unless it helps on these queries.
    rank(setting) ranks every held-out query [Q, k]."""
    setting, rows = default_setting(stages), list(rows)
    for stage in stages:
        options = [replace(setting, **option) for option in stage]
        table = pd.DataFrame([retrieval_metrics(rank(s)[rows], [relevant[i] for i in rows], ks=(1,)) for s in options])
        setting = options[best_retrieval_row(table).name]
    return setting


@dataclass(frozen=True)
class Selection:
    """The ranking procedure chosen on held-out queries, and its honest figures.

    chosen        the setting chosen on all held-out queries (the default when none was chosen): the submissions'
    fold_choices  per fold, the setting chosen on the other folds (empty when no choice was made)
    oof_ranked    [Q, k] each query ranked by the setting chosen without it (out of fold), else by `chosen`
    how           how, in words
    """

    chosen: Setting
    fold_choices: tuple[Setting, ...]
    oof_ranked: torch.Tensor
    how: str


def select_out_of_fold(rank: Callable[[Setting], torch.Tensor], stages: Sequence[Sequence[dict]],
                       relevant: Sequence[set[int]], groups: Sequence[int], seed: int) -> Selection:
    """The selection procedure, scored out of fold: folds of the held-out queries grouped by `groups` (a pair's
    two directions, an examination, identical bytes: linked_groups); each fold is ranked by the setting
    choose_setting picks on the other folds, so a setting that wins one fold by chance cannot inflate the
    figure. The setting for the test is chosen on all queries. Under MIN_SELECTION_QUERIES queries (or one
    group) nothing is chosen: the default fixed in advance (default_setting), said so."""
    rank, default, n = functools.cache(rank), default_setting(stages), len(relevant)
    if not n:
        return Selection(default, (), torch.empty(0, RANKING_DEPTH, dtype=torch.long),
                         "no held-out queries: nothing chosen, the default fixed in advance")
    folds = grouped_fold_ids(np.zeros(n, dtype=int), groups, SELECTION_FOLDS, seed)
    k = int(folds.max()) + 1
    if n < MIN_SELECTION_QUERIES or k < 2:
        return Selection(default, (), rank(default), f"{n} held-out queries in {k} grouped fold(s), fewer than "
                         f"{MIN_SELECTION_QUERIES} or one fold: nothing chosen, the default fixed in advance")
    choices = tuple(choose_setting(rank, stages, relevant, np.flatnonzero(folds != f)) for f in range(k))
    oof = torch.stack([rank(choices[f])[i] for i, f in enumerate(folds)])
    return Selection(choose_setting(rank, stages, relevant, range(n)), choices, oof,
                     f"chosen on {k - 1} of {k} folds of {n} held-out queries grouped by content, scored on the "
                     f"fold left out; the submissions' setting chosen on all {n}")


def linked_groups(links: Sequence[Iterable]) -> np.ndarray:
    """Group id per item: items sharing any link (a content group, a finding key) are one group (the connected
    components of the item-link graph, scipy)."""
    keys = {key: j for j, key in enumerate(dict.fromkeys(key for item in links for key in item))}
    edges = [(i, len(links) + keys[key]) for i, item in enumerate(links) for key in item]
    n = len(links) + len(keys)
    rows, cols = (np.array(side, dtype=int) for side in zip(*edges)) if edges else (np.zeros(0, int),) * 2
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1][:len(links)]


def selection_report(rank: Callable[[Setting], torch.Tensor], fixed: Mapping[str, Setting], selection: Selection,
                     relevant: Sequence[set[int]], subsets: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """Per setting and query subset: n, R@1 / R@5 / R@10 / MRR with 95% bootstrap intervals over queries.
    The `fixed` settings involve no choice, so their figures on held-out queries are already out of sample;
    "full procedure (out of fold)" is the Selection's oof_ranked."""
    if not len(relevant):
        return pd.DataFrame(columns=["setting", "queries", "n"])
    rankings = {name: rank(s) for name, s in fixed.items()} | {"full procedure (out of fold)": selection.oof_ranked}
    return pd.DataFrame([{"setting": name, "queries": subset, "n": len(rows),
                          **retrieval_metrics(ranked[list(rows)], [relevant[i] for i in rows], n_boot=1000)}
                         for name, ranked in rankings.items() for subset, rows in subsets.items() if len(rows)])


def selection_block(selection: Selection, table: pd.DataFrame, n: int) -> dict:
    """metrics.json's `selection`: the procedure's out-of-fold R@1 / R@5 / R@10 / MRR with intervals on all
    held-out queries, n, how, the setting chosen (the submissions') and the choice per fold."""
    procedure = table[table["setting"] == "full procedure (out of fold)"]
    figures = procedure.iloc[0].drop(["setting", "queries", "n"]).to_dict() if len(procedure) else {}
    return {**figures, "n": n, "how": selection.how, "chosen": selection.chosen.describe(),
            "per_fold": [s.describe() for s in selection.fold_choices]}
