"""visattn.explain, issue #24 round 3 ("no silent wrong answers"): a faithfulness verdict from
enough random orders with an interval, the learned gates next to the maps, a readable grid with
class names, and named errors for degenerate images, a checkpoint from another config, and inputs
that used to give an empty or NaN answer without a word."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from PIL import Image
from torch import nn

from visattn import explain as E
from visattn.data.synthetic import CLASSES
from visattn.models import build_detector
from visattn.plug import Blend

from .test_explain import COCO_IMAGE, _detector, _RegionGate, _Texture, _tiny_config

SHIPPED = "fcos_resnet10t_eca.synth256"
SYNTH_NAMES = {i + 1: n for i, n in enumerate(CLASSES)}


def _known_answer():
    """A classifier that uses only the top-left 12 x 12 pixels, and a map pointing there."""
    model = nn.Sequential(_RegionGate(), _Texture()).eval()
    image = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float().expand(3, 32, 32).clone()
    return model, image, E.attention_maps(model, image[None], upsample=True)


# --------------------------------------------------------------------------------------------------
# Faithfulness: enough random orders, an interval, a verdict from the interval


def test_faithfulness_verdict_from_an_interval_over_enough_random_orders():
    default = inspect.signature(E.faithfulness).parameters["seeds"].default
    assert default >= 10 and inspect.signature(E.explain_image).parameters["seeds"].default == default
    model, image, maps = _known_answer()
    runs = [E.faithfulness(model, image, maps, seed=seed) for seed in (0, 1)]
    for scores in runs:
        (s,) = scores.values()
        lo, hi = s["gain_interval"]
        assert s["random_orders"] == default and lo <= hi
        assert lo > 0 and s["verdict"] == "better than random"  # above 95% of the random orders
    (a,), (b,) = (r.values() for r in runs)
    assert a["random_deletion_auc"] != b["random_deletion_auc"]  # other orders, the same verdict
    # the map turned inside out points away from what the classifier uses: worse than random
    (m,) = maps.values()
    m.image_maps[0]["spatial"] = 1 - m.image_maps[0]["spatial"]
    (s,) = E.faithfulness(model, image, maps).values()
    assert s["gain_interval"][1] < 0 and s["verdict"].startswith("no better than random") and "worse" in s["verdict"]


def test_too_few_random_orders_give_no_verdict():
    model, image, maps = _known_answer()
    (s,) = E.faithfulness(model, image, maps, seeds=3).values()
    assert s["verdict"].startswith("undecided: 3 random orders are too few")
    with pytest.raises(ValueError, match="random orders"):
        E.faithfulness(model, image, maps, seeds=0)


# --------------------------------------------------------------------------------------------------
# What the figures and the JSON say: gates, class names, titles


def test_learned_gates_are_reported_next_to_the_maps(tmp_path):
    det = _detector("fcos", attention="cbam")
    blends = [(n, m) for n, m in det.named_modules() if isinstance(m, Blend)]
    with torch.no_grad():
        for _, m in blends:
            m.gate.fill_(-0.5)
    summary = E.explain_image(det, torch.rand(3, 60, 80), tmp_path, top_k=1, faithful=False)
    assert [b["gate"] for b in summary["blocks"].values()] == [-0.5] * len(blends)
    assert "inverted" in summary["gates"]
    maps = E.attention_maps(det, [torch.rand(3, 60, 80)])
    assert {m.gate for m in maps.values()} == {-0.5}


@pytest.mark.skipif(not COCO_IMAGE.is_file(), reason="coco128 not available")
def test_shipped_model_detections_are_named(tmp_path):
    assert E.label_names(weights=SHIPPED) == SYNTH_NAMES
    model, _ = E.load_model(weights=SHIPPED)
    image = E.read_image_tensor(COCO_IMAGE)
    summary = E.explain_image(model, image, tmp_path, top_k=2, faithful=False)
    assert summary["detections"] and all(d["name"] == SYNTH_NAMES[d["label"]] for d in summary["detections"])
    with Image.open(summary["files"]["grid"]) as im:
        assert im.size[0] >= 1000  # was 660 px
    cfg = _tiny_config(tmp_path)  # no data section: ids stay ids
    assert E.label_names(config=cfg) is None
    cfg.write_text(cfg.read_text() + "data:\n  class_path: visattn.data.SyntheticDataModule\n")
    assert E.label_names(config=cfg) is None  # 3 classes: not the synthetic benchmark's 8
    cfg.write_text(cfg.read_text().replace("num_classes: 3", "num_classes: 8"))
    assert E.label_names(config=cfg) == SYNTH_NAMES


def test_panel_titles_keep_what_tells_the_blocks_apart():
    names = [f"backbone.body.features.layer{i}.0.bn2.attn.block" for i in (1, 2)]
    assert E._panel_names(names) == {names[0]: "layer1.0.bn2", names[1]: "layer2.0.bn2"}
    (title,) = E._panel_names(["a_rather_long_module.name_that_does_not.fit_on_one.line_of_a_panel"]).values()
    assert max(len(line) for line in title.split("\n")) <= 30 and title.replace("\n", "") == (
        "a_rather_long_module.name_that_does_not.fit_on_one.line_of_a_panel")


# --------------------------------------------------------------------------------------------------
# Named errors instead of raw ones, or of an empty / NaN answer


@pytest.mark.parametrize("shape", [(3, 300, 1), (3, 2, 200)])
def test_an_image_the_detector_resizes_to_nothing_is_named(shape):
    det = _detector("fcos", attention="cbam")
    image = torch.rand(*shape)
    for run in (lambda: E.attention_maps(det, [image]), lambda: E.explain_detections(det, image),
                lambda: E.faithfulness(det, image, steps=1, seeds=1)):
        with pytest.raises(ValueError, match=rf"{shape[2]}x{shape[1]} px.*resize.*0 px"):
            run()


def test_a_checkpoint_from_another_config_is_named(tmp_path):
    other = build_detector("fcos", backbone="resnet10t", num_classes=4, attention="eca", fpn_channels=64)
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match=r"does not match the model being built.*missing.*unexpected.*shape mismatch"):
        E.load_model(config=_tiny_config(tmp_path), ckpt=ckpt)


def test_nothing_to_test_is_named_not_an_empty_or_nan_answer(tmp_path):
    model, image, maps = _known_answer()
    with pytest.raises(ValueError, match="no visattn attention blocks"):
        E.faithfulness(model, image, {})
    bad = image.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image has NaN"):
        E.faithfulness(model, bad)
    with pytest.raises(ValueError, match="images has NaN"):
        E.attention_maps(model, bad[None])
    (m,) = maps.values()
    m.image_maps[0]["spatial"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"maps\['0'\] has NaN"):
        E.faithfulness(model, image, maps)
    blind = build_detector("fcos", backbone="resnet10t", num_classes=3, attention="cbam", fpn_channels=64,
                           min_size=64, max_size=96, score_thresh=1.0).eval()
    with pytest.raises(ValueError, match="no detections"):
        E.faithfulness(blind, torch.rand(3, 40, 50), steps=1, seeds=1)
    summary = E.explain_image(blind, torch.rand(3, 40, 50), tmp_path, steps=1, seeds=1)
    assert summary["faithfulness"] == {} and "no detections" in summary["faithfulness_skipped"]
    assert json.loads((tmp_path / "faithfulness.json").read_text())["faithfulness_skipped"]
    plain = _detector("fcos")
    with pytest.raises(ValueError, match="no visattn attention blocks"):
        E.explain_detections(plain, torch.rand(3, 40, 50))
