"""Tests for utils section 11, "Learned retrieval" (contrastive fine-tuning of BiomedCLIP for Tracks 2
and 3), and the helpers it relies on: held_out_images and retrieval_metrics' bootstrap intervals
(section 9), EpochSampler's groups (section 6). The losses are checked against naive loops and a hand
computation with a stub model; tuning on the tiny CLIP and on a BiomedCLIP-shaped model (timm vision
tower + a tiny Hugging Face BERT, built offline); training, resume and reuse on ~24 tiny images.
CPU only, no network."""

from __future__ import annotations

import copy
import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from transformers import BertConfig

import utils
from utils import (
    FINE_CLASS_TEXTS,
    PROMPT_TEMPLATES,
    EpochSampler,
    FeatureTable,
    RetrievalConfig,
    TwoViews,
    decode_square,
    embed_texts,
    epoch_seed,
    evaluate_t2i,
    exam_id,
    file_sha1,
    finding_key,
    fuse_embeddings,
    held_out_images,
    make_tunable,
    model_fingerprint,
    multi_positive_nce,
    retrieval_metrics,
    retrieval_training_set,
    split_finding_lines,
    split_train_val,
    text_to_image,
    train_retrieval,
)

CPU = torch.device("cpu")
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------- multi_positive_nce


def naive_nce(sim: torch.Tensor, positive: torch.Tensor) -> float:
    """-log(sum over positives of exp / sum over the row of exp), averaged over rows with a positive."""
    losses = []
    for s, p in zip(sim.double().tolist(), positive.tolist()):
        if not any(p):
            continue
        num = sum(math.exp(v) for v, q in zip(s, p) if q and v != NEG_INF)
        den = sum(math.exp(v) for v in s if v != NEG_INF)
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


def test_multi_positive_nce_equals_a_naive_loop_with_excluded_pairs_and_rows_without_positives():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 7, generator=g) * 3
    positive = torch.rand(6, 7, generator=g) < 0.35
    positive[2] = False  # a row without positives: ignored
    positive[0] = torch.tensor([1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)  # several positives
    positive[1] = torch.tensor([0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    sim[0, 3] = sim[1, 0] = sim[4, 6] = NEG_INF  # excluded pairs
    sim[0, 4] = NEG_INF  # an excluded positive counts in neither sum
    got = multi_positive_nce(sim, positive)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(naive_nce(sim, positive), rel=1e-5)
    # ignoring a row: the loss over rows 0, 1 only equals the loss with every other row emptied
    only = positive.clone()
    only[2:] = False
    assert multi_positive_nce(sim, only).item() == pytest.approx(naive_nce(sim[:2], positive[:2]), rel=1e-5)


def test_multi_positive_nce_single_positive_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(5, 5, generator=g)
    target = torch.tensor([3, 0, 4, 1, 1])
    positive = F.one_hot(target, 5).bool()
    assert multi_positive_nce(sim, positive).item() == pytest.approx(F.cross_entropy(sim, target).item(), rel=1e-5)


def test_multi_positive_nce_without_any_positive_is_zero_and_keeps_a_gradient_path():
    sim = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    sim[0, 1] = NEG_INF
    sim.requires_grad_(True)
    loss = multi_positive_nce(sim, torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert sim.grad is not None and torch.equal(sim.grad, torch.zeros(3, 4))  # no NaN from the -inf entry


def test_a_line_carried_by_two_images_is_a_positive_for_both():
    """Mirrored positives: a line two images carry pulls both (never pushes the second away), so its
    loss is lower than if the second image were a negative, and the gradient raises both scores."""
    sim = torch.tensor([[2.0, 1.5, -0.5, 0.3]], requires_grad=True)
    both = torch.tensor([[True, True, False, False]])
    one = torch.tensor([[True, False, False, False]])
    loss_both, loss_one = multi_positive_nce(sim, both), multi_positive_nce(sim, one)
    assert loss_both.item() < loss_one.item()
    loss_both.backward()
    assert (sim.grad[0, :2] < 0).all() and (sim.grad[0, 2:] > 0).all()  # descent raises both positives


# ----------------------------------------------------------------------------------- _retrieval_loss


class StubCLIP(nn.Module):
    """encode_image: a linear map of the flattened pixels; encode_text: a row of a fixed table per token id."""

    def __init__(self, pixels: int, dim: int, n_texts: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.proj = nn.Parameter(torch.randn(pixels, dim, generator=g))
        self.words = nn.Parameter(torch.randn(n_texts, dim, generator=g))
        self.text_calls = 0

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.proj

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.text_calls += 1
        return self.words[tokens[:, 0]]


class StubTokenizer:
    """One token per text: the index of its finding_key in `keys` (so any spelling of a line is one token)."""

    def __init__(self, keys: list[str]):
        self.keys, self.seen = keys, []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen.append(list(texts))
        return torch.tensor([[self.keys.index(finding_key(t))] for t in texts])


def stub_batch():
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    model = StubCLIP(12, 5, 3)
    tokenizer = StubTokenizer(["a polyp", "mucus", "unused"])
    groups = torch.tensor([7, 2, 7, 5])  # images 0 and 2: one group
    return model, tokenizer, first, second, groups


def test_retrieval_loss_matches_a_hand_computation_with_multi_positive_nce():
    model, tokenizer, first, second, groups = stub_batch()
    temperature = 0.1
    chosen = ["A polyp.", "mucus", None, "a  POLYP"]  # two spellings of one line, one image without a line
    carried = [["A polyp."], ["Mucus;"], ["a polyp", "other"], ["a polyp", "mucus"]]
    loss = utils._retrieval_loss(model, tokenizer, first, second, groups, chosen, carried, temperature, CPU)

    views = F.normalize(torch.cat([first, second]).flatten(1) @ model.proj, dim=-1)  # rows 0-3 view 1, 4-7 view 2
    sim = views @ views.T / temperature
    sim.fill_diagonal_(NEG_INF)
    # image -> image positives by hand: the other view of the same image and both views of the group partner
    pos = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in [(0, 4), (1, 5), (2, 6), (3, 7), (0, 2), (0, 6), (4, 2), (4, 6)]:
        pos[a, b] = pos[b, a] = True
    text = F.normalize(model.words[[0, 1]], dim=-1)  # the batch's distinct lines: "a polyp", "mucus"
    sim_t = text @ views[:4].T / temperature
    carries = torch.tensor([[True, False, True, True], [False, True, False, True]])  # finding_key comparison
    expected = multi_positive_nce(sim, pos) + multi_positive_nce(sim_t, carries) + multi_positive_nce(sim_t.T, carries.T)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert [finding_key(t) for t in tokenizer.seen[0]] == ["a polyp", "mucus"]  # each line embedded once
    loss.backward()
    assert model.proj.grad.abs().sum() > 0 and model.words.grad[:2].abs().sum() > 0


def test_retrieval_loss_image_term_never_takes_a_view_as_its_own_positive_and_uses_groups():
    model, tokenizer, first, second, groups = stub_batch()
    loss = utils._retrieval_loss(model, tokenizer, first, second, groups, [None] * 4, [[]] * 4, 0.1, CPU)
    assert model.text_calls == 0 and tokenizer.seen == []  # no chosen line: no text term
    views = F.normalize(torch.cat([first, second]).flatten(1) @ model.proj, dim=-1)
    sim = views @ views.T / 0.1
    g = groups.repeat(2)
    eye = torch.eye(8, dtype=torch.bool)
    expected = multi_positive_nce(sim.masked_fill(eye, NEG_INF), (g[:, None] == g[None, :]) & ~eye)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a loss counting the view itself, or ignoring the group partner, is another number
    with_self = multi_positive_nce(sim, g[:, None] == g[None, :])
    pairs_only = multi_positive_nce(sim.masked_fill(eye, NEG_INF), torch.eye(8, dtype=torch.bool).roll(4, 1))
    assert abs(loss.item() - with_self.item()) > 1e-3 and abs(loss.item() - pairs_only.item()) > 1e-3
    # identical views of images in separate groups: each view's only positive is its own other view
    same = utils._retrieval_loss(model, tokenizer, first, first.clone(), torch.arange(4), [None] * 4, [[]] * 4, 0.1, CPU)
    v = F.normalize(first.flatten(1) @ model.proj, dim=-1)
    s = (torch.cat([v, v]) @ torch.cat([v, v]).T / 0.1).masked_fill(eye, NEG_INF)
    assert same.item() == pytest.approx(multi_positive_nce(s, eye.roll(4, 1)).item(), rel=1e-5)


# ----------------------------------------------------------------------------------- TwoViews


@pytest.fixture(scope="module")
def asymmetric_images(tmp_path_factory) -> list[Path]:
    """Three 40 x 30 images whose left and right halves differ (a mirror is visible)."""
    folder = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(3):
        a = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        a[:, :10] = 255 * (i % 2)
        paths.append(folder / f"v{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def test_two_views_mirror_every_view_at_mirror_one_and_never_at_zero(asymmetric_images):
    identity = T.Compose([T.PILToTensor()])  # deterministic: views are the (mirrored) cached squares
    mirrored = TwoViews(asymmetric_images, None, identity, 16, 1.0)
    plain = TwoViews(asymmetric_images, None, identity, 16, 0.0)
    for index, path in enumerate(asymmetric_images):
        square = decode_square(path, 16)
        assert not torch.equal(square, square.flip(-1))
        for seed in (0, 11, 2**40):
            v1, v2, i, s = mirrored[(index, seed)]
            assert (i, s) == (index, seed)
            assert torch.equal(v1, square.flip(-1)) and torch.equal(v2, square.flip(-1))
            p1, p2, i, s = plain[(index, seed)]
            assert (i, s) == (index, seed)
            assert torch.equal(p1, square) and torch.equal(p2, square)


def test_two_views_come_from_the_key_reproducibly_and_are_drawn_independently(asymmetric_images):
    identity = T.Compose([T.PILToTensor()])
    half = TwoViews(asymmetric_images, None, identity, 16, 0.5)
    square = decode_square(asymmetric_images[0], 16)
    kinds = set()
    for seed in range(40):
        v1, v2, _, _ = half[(0, seed)]
        again = half[(0, seed)]
        assert torch.equal(v1, again[0]) and torch.equal(v2, again[1])
        kinds.add((torch.equal(v1, square.flip(-1)), torch.equal(v2, square.flip(-1))))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}  # each view mirrored on its own
    crop = T.Compose([T.RandomResizedCrop(12, scale=(0.3, 1.0)), T.PILToTensor()])
    augmented = TwoViews(asymmetric_images, None, crop, 16, 0.0)
    a1, a2, _, _ = augmented[(1, 123)]
    b1, b2, _, _ = augmented[(1, 123)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # whatever the global RNG did in between
    assert any(not torch.equal(*augmented[(1, s)][:2]) for s in range(5))  # two different augmentations


# ----------------------------------------------------------------------------------- EpochSampler groups


def plain_sequence(n: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order, seeds = torch.randperm(n, generator=generator), torch.randint(0, 2**62, (n,), generator=generator)
    return list(zip(order.tolist(), seeds.tolist()))


def epoch_list(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_sampler_with_groups_keeps_each_group_together_in_a_seeded_order():
    groups = ["b", "a", "b", "c", "a", "b", "d", "c", "e", "a", "b", "f", "f", "c"]
    n = len(groups)
    sampler = EpochSampler(n, seed=3, groups=groups)
    assert len(sampler) == n
    orders = []
    for epoch in range(4):
        seq = epoch_list(sampler, epoch)
        indices = [i for i, _ in seq]
        assert sorted(indices) == list(range(n))  # every index once per epoch
        runs = [groups[i] for k, i in enumerate(indices) if k == 0 or groups[indices[k - 1]] != groups[i]]
        assert len(runs) == len(set(groups))  # a group's members come one after another
        assert seq == epoch_list(EpochSampler(n, seed=3, groups=groups), epoch)  # only (seed, epoch) matter
        orders.append(runs)
    assert len({tuple(r) for r in orders}) > 1  # the group order changes with the epoch
    other = EpochSampler(n, seed=4, groups=groups)
    assert any(epoch_list(other, e) != epoch_list(EpochSampler(n, 3, groups=groups), e) for e in range(4))


def test_epoch_sampler_without_groups_is_the_plain_seeded_permutation():
    for epoch in (0, 1, 5):
        assert epoch_list(EpochSampler(9, seed=2), epoch) == plain_sequence(9, 2, epoch)
        assert epoch_list(EpochSampler(9, seed=2, groups=None), epoch) == plain_sequence(9, 2, epoch)
    # singleton groups: still one permutation of every index, in a (seed, epoch)-fixed order
    seq = epoch_list(EpochSampler(9, seed=2, groups=list(range(9))), 1)
    assert sorted(i for i, _ in seq) == list(range(9))
    assert seq == epoch_list(EpochSampler(9, seed=2, groups=list(range(9))), 1)


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
    everything = set(data.images["path"]) | set(data.i2i["query_path"]) | set(data.i2i["match_path"]) | set(data.t2i["path"])
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
    assert frame.loc["a.png", "texts"] == sorted({"A polyp.", "mucus", prompt("left nasal passage"), prompt("left nasal cavity")})
    assert frame.loc["u.png", "texts"] == ["a spur"]
    assert frame.loc["c.png", "texts"] == sorted({prompt("throat"), prompt("oropharynx")})
    assert retrieval_training_set(data, ["/d/d.png"], class_texts=False).set_index("file").loc["a.png", "texts"] == ["A polyp.", "mucus"]
    both = retrieval_training_set(data, []).set_index("file")["group"]
    assert both["c.png"] == both["d.png"] != both["a.png"]  # identical bytes share a group


# ----------------------------------------------------------------------------------- make_tunable


@pytest.fixture(scope="module")
def tiny_clip():
    return utils.load_clip("tiny", CPU)


@pytest.fixture(scope="module")
def biomed_shaped(tmp_path_factory) -> nn.Module:
    """BiomedCLIP's layout at toy size, offline: open_clip's CustomTextCLIP with a timm ViT (visual.trunk.blocks,
    visual.head) and a Hugging Face BERT text tower (text.transformer.encoder.layer, text.proj)."""
    folder = tmp_path_factory.mktemp("bert")
    BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.CustomTextCLIP(
            embed_dim=16,
            vision_cfg={"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                        "timm_proj": "linear", "image_size": 32},
            text_cfg={"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "mlp",
                      "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16,
                      "hf_model_pretrained": False}).eval()


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_make_tunable_tail_on_the_tiny_clip_trains_the_last_blocks_and_the_final_norms_and_projections(tiny_clip):
    model = copy.deepcopy(tiny_clip[0])
    names = make_tunable(model, RetrievalConfig(tuning="tail", blocks=1))
    assert set(names) == trainable(model)
    tail = ("visual.transformer.resblocks.1.", "transformer.resblocks.1.", "visual.ln_post.", "ln_final.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(tail)} | {"visual.proj", "text_projection"}
    assert trainable(model) == expected
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in expected and "token_embedding.weight" not in expected
    everything = copy.deepcopy(tiny_clip[0])
    make_tunable(everything, RetrievalConfig(tuning="tail", blocks=5))  # more blocks than a tower has: all of them
    assert {n for n in trainable(everything) if "resblocks" in n} == {n for n, _ in everything.named_parameters() if "resblocks" in n}


def biomed_blocks(model: nn.Module, n: int) -> tuple[str, ...]:
    """Prefixes of the last n blocks of BiomedCLIP's two towers."""
    v, t = len(model.visual.trunk.blocks), len(model.text.transformer.encoder.layer)
    return tuple([f"visual.trunk.blocks.{i}." for i in range(v - n, v)] + [f"text.transformer.encoder.layer.{i}." for i in range(t - n, t)])


def test_make_tunable_tail_on_biomedclip_layout_trains_both_towers_last_blocks(biomed_shaped):
    model = copy.deepcopy(biomed_shaped)
    names = make_tunable(model, RetrievalConfig(tuning="tail", blocks=2))
    tail = biomed_blocks(model, 2) + ("visual.trunk.norm.", "visual.head.", "text.proj.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(tail)}
    assert any(n.startswith("visual.trunk.blocks.") for n in expected)
    assert set(names) == trainable(model)
    assert {n for n in trainable(model) if n.startswith("visual.")} == {n for n in expected if n.startswith("visual.")}
    assert trainable(model) == expected


def lora_layers(model: nn.Module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_make_tunable_lora_on_the_tiny_clip_adapts_last_blocks_linears_only(tiny_clip):
    original, _, tokenizer = tiny_clip
    model = copy.deepcopy(original)
    names = make_tunable(model, RetrievalConfig(tuning="lora", blocks=1, lora_rank=2))
    assert set(names) == trainable(model) and names and all("lora_" in n for n in names)
    assert lora_layers(model) == {f"{t}resblocks.1.mlp.{m}" for t in ("visual.transformer.", "transformer.") for m in ("c_fc", "c_proj")}
    assert not any("out_proj" in n for n in lora_layers(model))  # nn.MultiheadAttention reads it directly
    assert all(isinstance(m, nn.MultiheadAttention) for n, m in model.named_modules() if n.endswith(".attn"))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    tokens = tokenizer(["a polyp", "the left ear"])
    with torch.no_grad():  # LoRA starts as the identity: the adapted model encodes as the original
        assert torch.allclose(model.encode_image(images), original.encode_image(images), atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), original.encode_text(tokens), atol=1e-5)
    loss = model.encode_image(images).sum() + model.encode_text(tokens).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_make_tunable_lora_on_biomedclip_layout_adapts_both_towers(biomed_shaped):
    model = copy.deepcopy(biomed_shaped)
    names = make_tunable(model, RetrievalConfig(tuning="lora", blocks=1, lora_rank=2))
    assert set(names) == trainable(model) and all("lora_" in n for n in names)
    blocks = biomed_blocks(model, 1)
    expected = {n for n, m in biomed_shaped.named_modules() if isinstance(m, nn.Linear) and n.startswith(blocks)}
    assert any(n.startswith("visual.") for n in expected) and any(n.startswith("text.") for n in expected)
    assert lora_layers(model) == expected
    with torch.no_grad():
        out = model.encode_image(torch.randn(2, 3, 32, 32))
        text = model.encode_text(torch.tensor([[2, 5, 6, 3] + [0] * 12]))
    assert out.shape == (2, 16) and text.shape == (1, 16) and torch.isfinite(out).all()


def test_make_tunable_unknown_tuning_raises(tiny_clip):
    with pytest.raises(ValueError, match="tuning"):
        make_tunable(copy.deepcopy(tiny_clip[0]), RetrievalConfig(tuning="full"))


# ----------------------------------------------------------------------------------- train_retrieval

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 60, 200), (40, 210, 210)]
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]
FAST = RetrievalConfig(tuning="tail", blocks=1, epochs=4, batch_size=8, lr=5e-3, warmup_epochs=0.0, temperature=0.1)


def draw(path: Path, colour: tuple[int, int, int], corner: int, shift: int) -> None:
    a = np.full((72, 72, 3), 20, dtype=np.uint8)
    y, x = divmod(corner, 2)
    a[8 + 30 * y + shift:30 + 30 * y + shift, 8 + 30 * x:30 + 30 * x] = colour
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def train_frame(tmp_path_factory) -> pd.DataFrame:
    """24 images in 12 groups of two (a coloured square at one of four corners), each image carrying its
    colour's line and half of them a second, corner line."""
    folder = tmp_path_factory.mktemp("train_images")
    rows = []
    for g in range(12):
        colour, corner = g % 6, g // 6 * 2 + g % 2
        for k in range(2):
            path = folder / f"g{g}_{k}.png"
            draw(path, COLOURS[colour], corner, 3 * k)
            texts = [f"a {WORDS[colour]} square"] + ([f"a mark at corner {corner}"] if k else [])
            rows.append({"path": str(path), "sha1": file_sha1(path), "group": g, "texts": sorted(texts)})
    return pd.DataFrame(rows)


def fixed_loss(model: nn.Module, frame: pd.DataFrame, preprocess, tokenizer) -> float:
    """The training loss without augmentation or batching: every image (eval preprocessing) and its mirror
    as the two views, each image's first line chosen."""
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in frame["path"]])
    with torch.no_grad():
        return utils._retrieval_loss(model.eval(), tokenizer, x, x.flip(-1), torch.tensor(frame["group"].to_numpy()),
                                     [t[0] for t in frame["texts"]], list(frame["texts"]), 0.1, CPU).item()


def trainable_state(tuned) -> dict[str, torch.Tensor]:
    names = trainable(tuned.model)
    return {k: v for k, v in tuned.model.state_dict().items() if k in names}


@pytest.fixture(scope="module")
def trained(tiny_clip, train_frame, tmp_path_factory):
    model, preprocess, tokenizer = tiny_clip
    before = model_fingerprint(model)
    checkpoints = tmp_path_factory.mktemp("retrieval_runs")
    tuned = train_retrieval(model, tokenizer, preprocess, train_frame, FAST, checkpoint_dir=checkpoints,
                            device=CPU, progress=False)
    return SimpleNamespace(tuned=tuned, dir=checkpoints, before=before)


def test_train_retrieval_trains_a_copy_and_the_loss_goes_down(tiny_clip, train_frame, trained):
    model = tiny_clip[0]
    assert model_fingerprint(model) == trained.before  # the original's weights are unchanged
    tuned = trained.tuned
    assert tuned.model is not model and not tuned.model.training
    history = tuned.history
    assert list(history["epoch"]) == [1, 2, 3, 4] and np.isfinite(history["train_loss"]).all()
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert fixed_loss(tuned.model, train_frame, *tiny_clip[1:]) < fixed_loss(model, train_frame, *tiny_clip[1:]) - 0.05
    assert tuned.path.name == "best.pt" and tuned.path.is_file() and tuned.path.parent.name.startswith("retrieval_")
    original = dict(model.state_dict())
    changed = {k for k, v in tuned.model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and changed <= trainable(tuned.model)  # only what make_tunable left trainable moved
    assert torch.equal(tuned.model.token_embedding.weight, model.token_embedding.weight)


def test_train_retrieval_reuses_a_finished_run(tiny_clip, train_frame, trained, capsys):
    model, preprocess, tokenizer = tiny_clip
    again = train_retrieval(model, tokenizer, preprocess, train_frame, FAST, checkpoint_dir=trained.dir,
                            device=CPU, progress=False)
    assert "reusing finished run" in capsys.readouterr().out
    assert again.path == trained.tuned.path
    pd.testing.assert_frame_equal(again.history, trained.tuned.history)
    for k, v in trainable_state(trained.tuned).items():
        assert torch.equal(again.model.state_dict()[k], v)
    assert len(list(trained.dir.glob("retrieval_*"))) == 1


def test_train_retrieval_resumed_run_ends_with_the_uninterrupted_weights(tiny_clip, train_frame, trained, tmp_path,
                                                                          monkeypatch, capsys):
    model, preprocess, tokenizer = tiny_clip
    real, calls = utils._retrieval_loss, []

    def interrupt_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # 3 batches an epoch: the second batch of epoch 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "_retrieval_loss", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_retrieval(model, tokenizer, preprocess, train_frame, FAST, checkpoint_dir=tmp_path, device=CPU, progress=False)
    monkeypatch.setattr(utils, "_retrieval_loss", real)
    resumed = train_retrieval(model, tokenizer, preprocess, train_frame, FAST, checkpoint_dir=tmp_path, device=CPU,
                              progress=False)
    assert "after epoch 1/4" in capsys.readouterr().out  # the interrupted run's epoch 1 is kept
    assert resumed.path.parent.name == trained.tuned.path.parent.name  # the same identity, another folder
    assert list(resumed.history["epoch"]) == [1, 2, 3, 4]
    assert resumed.history["train_loss"].tolist() == trained.tuned.history["train_loss"].tolist()
    reference = trainable_state(trained.tuned)
    got = trainable_state(resumed)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k  # the very same computation: bit-equal


def test_train_retrieval_run_identity_follows_image_content_and_config(tiny_clip, train_frame, trained, tmp_path,
                                                                       monkeypatch):
    model, preprocess, tokenizer = tiny_clip

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "_retrieval_loss", stop)  # no need to train: a run's folder is made first

    def run_folder(frame: pd.DataFrame, cfg: RetrievalConfig, where: str) -> str:
        with pytest.raises(KeyboardInterrupt):
            train_retrieval(model, tokenizer, preprocess, frame, cfg, checkpoint_dir=tmp_path / where, device=CPU,
                            progress=False)
        (folder,) = (tmp_path / where).glob("retrieval_*")
        return folder.name

    assert run_folder(train_frame, FAST, "same") == trained.tuned.path.parent.name  # one identity anywhere
    changed = train_frame.copy()
    path = tmp_path / "changed.png"
    draw(path, (255, 255, 255), 3, 0)
    changed.loc[5, ["path", "sha1"]] = [str(path), file_sha1(path)]
    assert run_folder(changed, FAST, "content") != trained.tuned.path.parent.name  # one image's content: a new run
    (tmp_path / "copies").mkdir()
    moved = [shutil.copy(p, tmp_path / "copies" / f"renamed_{i}.png") for i, p in enumerate(train_frame["path"])]
    assert run_folder(train_frame.assign(path=moved), FAST, "moved") == trained.tuned.path.parent.name  # by content
    other_cfg = RetrievalConfig(**{**FAST.__dict__, "lr": 1e-3})
    assert run_folder(train_frame, other_cfg, "config") != trained.tuned.path.parent.name


def test_train_retrieval_refuses_no_epochs_and_fewer_than_two_images(tiny_clip, train_frame, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    with pytest.raises(ValueError, match="epochs"):
        train_retrieval(model, tokenizer, preprocess, train_frame, RetrievalConfig(epochs=0), checkpoint_dir=tmp_path,
                        device=CPU, progress=False)
    with pytest.raises(ValueError, match="two or more images"):
        train_retrieval(model, tokenizer, preprocess, train_frame.iloc[:1], FAST, checkpoint_dir=tmp_path, device=CPU,
                        progress=False)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- fuse_embeddings


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.5, 1.0])
def test_fuse_embeddings_gives_unit_rows_whose_cosine_is_the_weighted_sum(weight):
    a, b = unit(7, 5, 0), unit(7, 3, 1)
    fused = fuse_embeddings(a, b, weight)
    assert fused.shape == (7, 8)
    assert torch.allclose(fused.norm(dim=1), torch.ones(7), atol=1e-6)
    assert torch.allclose(fused @ fused.T, weight * (a @ a.T) + (1 - weight) * (b @ b.T), atol=1e-6)


# ----------------------------------------------------------------------------------- evaluate_t2i

LINES = ["a polyp in the left nasal cavity", "wax in the right ear canal", "the vocal cords are closed",
         "red swollen tonsils", "a perforated tympanic membrane", "mucus on the septum", "a nodule on the vocal fold",
         "a normal throat"]


def test_evaluate_t2i_chooses_the_perfect_ranker_on_the_first_query_set_with_queries(tiny_clip):
    model, _, tokenizer = tiny_clip
    paths = [f"/gallery/img{i}.png" for i in range(len(LINES))]
    perfect = FeatureTable(paths, embed_texts(model, tokenizer, LINES, CPU))  # each image IS its line
    random_table = FeatureTable(paths, unit(len(LINES), perfect.feats.shape[1], 7))
    # a later set on which the random table wins: relevant = its own first answer
    random_first = text_to_image(model, tokenizer, LINES, random_table[paths], CPU)[:, 0].tolist()
    favours_random = [{r} for r in random_first]
    assert sum(r == i for i, r in enumerate(random_first)) < len(LINES) - 2
    query_sets = {"captions": ([], [], paths), "finding lines": (LINES, [{i} for i in range(len(LINES))], paths),
                  "other": (LINES, favours_random, paths)}
    models = {"random": (model, random_table), "perfect": (model, perfect)}
    table, choice = evaluate_t2i(models, tokenizer, query_sets, CPU)
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
    model, _, tokenizer = tiny_clip
    paths = ["/a.png", "/b.png"]
    table = FeatureTable(paths, unit(2, 32, 0))
    result, choice = evaluate_t2i({"frozen": (model, table), "tuned": (model, table)}, tokenizer,
                                  {"captions": ([], [], paths), "finding lines": ([], [], paths)}, CPU)
    assert result.empty
    assert choice["model"] == "frozen" and "first model" in choice["chosen_on"]


# ----------------------------------------------------------------------------------- retrieval_metrics n_boot


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


def test_fp16_tuning_steps_the_schedule_only_with_the_optimizer(tiny_clip, train_frame, tmp_path):
    """fp16 (a T4's autocast) trains through a GradScaler; a step it skips on inf/NaN gradients must not
    advance the schedule (torch warns "lr_scheduler.step() before optimizer.step()" when it does)."""
    model, preprocess, tokenizer = tiny_clip
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the scheduler warning is a UserWarning
        tuned = train_retrieval(model, tokenizer, preprocess, train_frame, replace(FAST, amp="fp16", epochs=2),
                                checkpoint_dir=tmp_path, device=CPU, progress=False)
    assert np.isfinite(tuned.history["train_loss"]).all()
    last = torch.load(next(tmp_path.glob("retrieval_*")) / "last.pt", weights_only=True)
    assert last["scaler"] and last["scheduler"]["last_epoch"] <= 2 * math.ceil(len(train_frame) / FAST.batch_size)
