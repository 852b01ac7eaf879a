"""Explanation-quality metrics: rank correlation, deletion / insertion, randomisation, pointing game."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrtool.explain import Attribution, ExplainContext, Explainer, build_explainer
from cxrtool.explain_eval import (
    curve_order,
    deletion_insertion,
    evaluate_images,
    lesion_fraction,
    lesions_to_input,
    pointing_hit,
    randomisation_check,
    randomisation_layers,
    randomized_copy,
    spearman,
    summarise,
)
from cxrtool.imaging import Preprocessing

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_spearman_known_values():
    a = np.arange(10.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros(10)) is None
    # 1 - 6 sum d^2 / (n (n^2 - 1)) without ties: ranks of b are 1 3 2 5 4 -> sum d^2 = 4
    assert spearman(np.array([1, 2, 3, 4, 5.0]), np.array([10, 30, 20, 50, 40.0])) == pytest.approx(1 - 6 * 4 / 120)


def test_spearman_averages_ties():
    # ranks with ties averaged: a -> 2, 3.5, 3.5, 1 and b -> 1, 2, 3, 4; Pearson of the ranks by hand
    ra, rb = np.array([2, 3.5, 3.5, 1]), np.array([1, 2, 3, 4.0])
    expected = np.corrcoef(ra, rb)[0, 1]
    assert spearman(np.array([10, 20, 20, 5.0]), np.array([1, 2, 3, 4.0])) == pytest.approx(expected)


class Bright(nn.Module):
    """p(class 1) rises with the bright pixels of the top-left quarter; the rest is ignored."""

    def forward(self, x):
        v = 2 * torch.relu(x[:, 0, :8, :8]).mean(dim=(1, 2))
        return torch.stack([-v, v], dim=1)


def test_deletion_insertion_rank_a_good_order_above_a_bad_one():
    pp = Preprocessing(size=16)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    x = (1.5 * (1 - 2 * ((yy + xx) % 2))).float()[None, None]  # a checkerboard: blurring removes it
    good = np.zeros((16, 16))
    good[:8, :8] = 1.0
    ok = deletion_insertion(Bright(), x, 1, curve_order(good), pp, steps=16)
    bad = deletion_insertion(Bright(), x, 1, curve_order(-good), pp, steps=16)
    assert ok["fractions"][0] == 0 and ok["fractions"][-1] == 1 and len(ok["deletion"]) == 17
    assert ok["deletion"][0] == pytest.approx(ok["insertion"][-1])  # both are the untouched image
    assert ok["deletion_auc"] < bad["deletion_auc"] - 0.2
    assert ok["insertion_auc"] > bad["insertion_auc"] + 0.1
    assert all(a >= b - 1e-9 for a, b in zip(ok["deletion"], ok["deletion"][1:], strict=False))


def test_pointing_game_and_geometry():
    amap = np.zeros((20, 30))
    amap[10, 12] = 1.0
    assert pointing_hit(amap, [{"x": 12.0, "y": 10.5, "r": 1.0}])
    assert not pointing_hit(amap, [{"x": 20.0, "y": 10.0, "r": 3.0}])
    assert pointing_hit(amap, [{"x": 20.0, "y": 10.0, "r": 3.0}], tolerance=5)
    assert lesion_fraction((10, 10), [{"x": 4.5, "y": 4.5, "r": 100}]) == 1.0
    # a 100 x 200 (h x w) image letterboxed to 50 px: scale 0.25, 12 rows of padding on top
    les = lesions_to_input([{"x": 99.5, "y": 49.5, "r": 8.0}], (100, 200), Preprocessing(size=50))
    assert les[0]["x"] == pytest.approx(24.5) and les[0]["y"] == pytest.approx(12 + 12)
    assert les[0]["r"] == pytest.approx(2.0)


def _compact():
    from cxrtool.models import build_model

    torch.manual_seed(0)
    return build_model("compact", 2, {"width": 4}).eval()


META = {"model": {"name": "compact"}, "explainable_layers": ["stage1", "stage2", "stage3", "stage4", "stage5"]}


def test_randomized_copy_touches_only_the_chosen_layers():
    model = _compact()
    layers = randomisation_layers(META, model)
    assert layers == ["fc", "stage5"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = randomized_copy(model, layers, seed=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the original model changed"
    changed = {k for k, v in rnd.state_dict().items() if not torch.equal(v, before[k]) and "num_batches" not in k}
    assert changed and all(k.startswith(("fc.", "stage5.")) for k in changed)
    assert {k for k in changed if k.startswith("fc.")} == {"fc.weight", "fc.bias"}
    cascade = {**META, "cascade": {"negative_class": "NORMAL", "stage2_classes": ["a", "b"]}}

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage1, self.stage2 = _compact(), _compact()

    assert randomisation_layers(cascade, Two()) == ["stage1.fc", "stage2.fc", "stage1.stage5", "stage2.stage5"]


class ImageItself(Explainer):
    """A 'method' that ignores the model (an edge detector would behave like this)."""

    def attribute(self, x, target, ctx):
        return Attribution(x[:, 0].detach().numpy().astype(np.float32))


def test_randomisation_catches_a_model_independent_map():
    model = _compact()
    ctx = ExplainContext(model=model, preprocessing=Preprocessing(size=32), class_names=["a", "b"],
                         default_layer="stage4", meta=META)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1])
    same = randomisation_check(ImageItself(), ctx, x, t, x[0, 0].numpy(), ["fc", "stage5"])
    assert same["spearman"] == pytest.approx(1.0)
    cam = build_explainer("grad-cam", {})
    amap = cam.attribute(x, t, ctx).maps[0]
    moved = randomisation_check(cam, ctx, x, t, amap, ["fc", "stage5"])
    assert moved["spearman"] is None or moved["spearman"] < 0.9


def test_evaluate_images_summaries():
    model = _compact()
    ctx = ExplainContext(model=model, preprocessing=Preprocessing(size=32), class_names=["a", "b"],
                         default_layer="stage4", meta=META)
    gen = torch.Generator().manual_seed(1)
    items = [{"path": f"img{i}", "x": torch.randn(1, 1, 32, 32, generator=gen), "shape": (32, 32),
              "lesions": [{"x": 10.0, "y": 12.0, "r": 4.0}] if i else None} for i in range(3)]
    res = evaluate_images(items, {"grad-cam": build_explainer("grad-cam", {})}, ctx, steps=8)
    s = res["methods"]["grad-cam"]
    assert res["n_images"] == 3 and s["deletion_auc"]["n"] == 3 and s["pointing_game"]["n"] == 2
    assert res["random_map"]["pointing_chance"]["mean"] == pytest.approx(lesion_fraction((32, 32), items[1]["lesions"]))
    assert len(res["images"]) == 3 and "random" in res["images"][0]
    assert summarise([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(np.sqrt(2)), "n": 2}
