"""Synthetic generator and CocoDataModule, on generated data and on the real coco128 subset."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from visattn.cli import main as cli
from visattn.data import (
    CocoDataModule,
    CocoDetectionDataset,
    build_transform,
    generate_synthetic,
    load_coco,
)

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
needs_coco128 = pytest.mark.skipif(not COCO128.is_dir(), reason="../shared/data/coco128 not present")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth"), num_images=60, image_size=256, seed=3)


def _json(root):
    return json.loads((Path(root) / "annotations" / "instances.json").read_text())


# -- generator ---------------------------------------------------------------------------------


def test_synthetic_is_valid_coco_with_exact_masks(synth):
    coco = COCO(str(synth / "annotations" / "instances.json"))
    assert len(coco.getImgIds()) == 60 and len(coco.getCatIds()) >= 8
    for ann in coco.dataset["annotations"]:
        rle = ann["segmentation"]
        assert int(mask_utils.area(rle)) == ann["area"] > 0
        assert [round(v) for v in mask_utils.toBbox(rle)] == ann["bbox"]
        x, y, w, h = ann["bbox"]
        ax, ay, aw, ah = ann["amodal_bbox"]
        assert ax <= x and ay <= y and x + w <= ax + aw and y + h <= ay + ah  # visible inside full
        assert 0.0 <= ann["occlusion"] <= 0.95 and ann["iscrowd"] == 0
    img = coco.dataset["images"][0]
    assert (synth / "images" / img["file_name"]).is_file()


def test_synthetic_size_and_occlusion_mix(synth):
    anns = _json(synth)["annotations"]
    area = np.array([a["area"] for a in anns])
    occ = np.array([a["occlusion"] for a in anns])
    assert (area < 32 ** 2).mean() >= 0.30
    assert (area < 16 ** 2).mean() >= 0.10
    assert (area > 64 ** 2).sum() >= 5  # some large
    assert ((occ > 0.1) & (occ <= 0.5)).mean() >= 0.10
    assert (occ > 0.5).mean() >= 0.05
    assert len({a["category_id"] for a in anns}) == 8


def test_synthetic_images_are_textured_not_flat(synth):
    from PIL import Image
    im = np.asarray(Image.open(synth / "images" / "000000.png"), dtype=np.float32)
    assert im.std(axis=(0, 1)).min() > 10
    assert len(np.unique(im.reshape(-1, 3), axis=0)) > 5000


def test_synthetic_is_deterministic_for_any_worker_count(tmp_path):
    a = generate_synthetic(tmp_path / "a", num_images=12, image_size=96, seed=7)
    b = generate_synthetic(tmp_path / "b", num_images=12, image_size=96, seed=7, workers=2)
    c = generate_synthetic(tmp_path / "c", num_images=12, image_size=96, seed=8)
    ja, jb, jc = ((r / "annotations" / "instances.json").read_bytes() for r in (a, b, c))
    assert ja == jb and ja != jc
    assert (a / "images" / "000011.png").read_bytes() == (b / "images" / "000011.png").read_bytes()


def test_synthetic_errors(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate_synthetic(tmp_path, num_images=0)
    with pytest.raises(TypeError, match="unknown option.*max_objects"):
        generate_synthetic(tmp_path, num_images=1, max_objectz=3)


def test_synth_cli_with_preview(tmp_path, capsys):
    assert cli(["synth", str(tmp_path / "s"), "--num-images", "4", "--image-size", "64", "--preview"]) == 0
    assert (tmp_path / "s" / "preview.png").stat().st_size > 1000
    assert "instances.json" in capsys.readouterr().out


# -- data module -------------------------------------------------------------------------------


def _check_batch(images, targets, num_classes, masks=False):
    for img, t in zip(images, targets, strict=True):
        assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
        assert 0.0 <= img.min() and img.max() <= 1.0
        b = t["boxes"]
        assert b.dtype == torch.float32 and b.shape == (len(t["labels"]), 4)
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, 2] <= img.shape[2]).all() and (b[:, 3] <= img.shape[1]).all()
        assert t["labels"].dtype == torch.int64
        assert ((t["labels"] >= 1) & (t["labels"] <= num_classes)).all()
        assert tuple(img.shape[1:]) == t["size"]
        if masks:
            assert t["masks"].shape == (len(b), *img.shape[1:])


def test_datamodule_on_synthetic_masks_equal_area(synth):
    ann = str(synth / "annotations" / "instances.json")
    ds = CocoDetectionDataset(synth / "images", ann, masks=True)
    anns = {im["id"]: [] for im in _json(synth)["images"]}
    for a in _json(synth)["annotations"]:
        anns[a["image_id"]].append(a)
    for i in range(5):
        _, t = ds[i]
        assert sorted(t["masks"].sum(dim=(1, 2)).tolist()) == sorted(a["area"] for a in anns[t["image_id"]])
    dm = CocoDataModule(str(synth / "images"), ann, batch_size=8, image_size=128, augment="small_objects", masks=True)
    dm.setup("fit")
    for images, targets in dm.train_dataloader():
        _check_batch(images, targets, dm.num_classes, masks=True)
        assert all(max(im.shape[1:]) == 128 for im in images)


@needs_coco128
@pytest.mark.parametrize("augment", ["none", "flip", "small_objects"])
def test_datamodule_iterates_coco128(augment):
    ann = COCO128 / "annotations" / "instances.json"
    data = json.loads(ann.read_text())
    dm = CocoDataModule(str(COCO128 / "images"), str(ann), batch_size=16, image_size=256, augment=augment)
    dm.setup("fit")
    seen, boxes = set(), 0
    for images, targets in dm.train_dataloader():
        _check_batch(images, targets, dm.num_classes)
        seen |= {t["image_id"] for t in targets}
        boxes += sum(len(t["boxes"]) for t in targets)
    assert seen == {im["id"] for im in data["images"]}
    expected = sum(1 for a in data["annotations"] if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0)
    if augment != "small_objects":  # the crop may cut some boxes out of view
        assert boxes == expected
    # validation: resize only, every image, and sizes to map predictions back
    images, targets = next(iter(dm.val_dataloader()))
    t = targets[0]
    assert max(t["size"]) == 256 and t["orig_size"] != t["size"]


@needs_coco128
def test_sparse_category_ids_and_image_without_annotations(tmp_path):
    data = json.loads((COCO128 / "annotations" / "instances.json").read_text())
    sparse = copy.deepcopy(data)
    remap = {c["id"]: 100_000 - 37 * c["id"] for c in data["categories"]}  # large, descending
    for c in sparse["categories"]:
        c["id"] = remap[c["id"]]
    sparse["categories"].reverse()
    for a in sparse["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    empty = dict(sparse["images"][0], id=999_999)
    sparse["images"].append(empty)
    path = tmp_path / "sparse.json"
    path.write_text(json.dumps(sparse))
    dm = CocoDataModule(str(COCO128 / "images"), str(path), batch_size=32, augment="none")
    dm.setup("fit")
    cats = dm.categories
    assert cats.category_ids == sorted(remap.values()) and len(cats) == 80
    assert sorted(cats.to_label.values()) == list(range(1, 81))
    by_id = {}
    for images, targets in dm.train_dataloader():
        _check_batch(images, targets, 80)
        by_id.update({t["image_id"]: t for t in targets})
    assert len(by_id) == len(sparse["images"]) and len(by_id[999_999]["boxes"]) == 0
    # labels go back to the original (sparse) category ids
    img_id = data["annotations"][0]["image_id"]
    got = sorted(cats.to_category[int(lbl)] for lbl in by_id[img_id]["labels"])
    want = sorted(remap[a["category_id"]] for a in data["annotations"]
                  if a["image_id"] == img_id and not a.get("iscrowd"))
    assert got == want


def test_crowd_regions_are_not_training_targets(synth, tmp_path):
    data = _json(synth)
    data["annotations"][0]["iscrowd"] = 1
    path = tmp_path / "crowd.json"
    path.write_text(json.dumps(data))
    ds = CocoDetectionDataset(synth / "images", path)
    first = data["annotations"][0]
    idx = [im["id"] for im in ds.images].index(first["image_id"])
    n = sum(1 for a in data["annotations"] if a["image_id"] == first["image_id"]) - 1
    assert len(ds[idx][1]["boxes"]) == n


def test_small_objects_preset_keeps_tiny_boxes():
    image = np.full((64, 64, 3), 127, dtype=np.uint8)
    tf = build_transform("small_objects", 64)
    kept = 0
    for _ in range(40):
        out = tf(image=image, bboxes=np.array([[30.0, 30.0, 33.0, 33.0]]), labels=[1], index=[0])
        kept += len(out["bboxes"])
        for x0, y0, x1, y1 in out["bboxes"]:
            assert 1.5 < x1 - x0 < 5.0
    assert kept >= 25  # dropped only when the random crop leaves it out of view


def _write(tmp_path, obj, raw=False):
    p = tmp_path / "ann.json"
    p.write_text(obj if raw else json.dumps(obj))
    return p


def test_errors_name_the_problem(synth, tmp_path):
    good = _json(synth)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(_write(tmp_path, "{'images': [", raw=True))
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_coco(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="missing list 'categories'"):
        load_coco(_write(tmp_path, {"images": [], "annotations": []}))
    bad = copy.deepcopy(good)
    del bad["annotations"][3]["bbox"]
    with pytest.raises(ValueError, match=r"annotations\[3\] has no 'bbox'"):
        load_coco(_write(tmp_path, bad))
    bad = copy.deepcopy(good)
    bad["annotations"][2]["category_id"] = 4242
    with pytest.raises(ValueError, match=r"annotations\[2\] refers to category id 4242"):
        load_coco(_write(tmp_path, bad))
    bad = copy.deepcopy(good)
    bad["annotations"][1]["bbox"] = [1, 2, -3, 4]
    with pytest.raises(ValueError, match=r"annotations\[1\] bbox"):
        load_coco(_write(tmp_path, bad))
    bad = copy.deepcopy(good)
    bad["images"][5]["file_name"] = "missing_000.png"
    with pytest.raises(FileNotFoundError, match="missing_000.png"):
        CocoDetectionDataset(synth / "images", _write(tmp_path, bad))
    with pytest.raises(ValueError, match="unknown augment preset 'mosaic'"):
        CocoDataModule(str(synth / "images"), str(synth / "annotations" / "instances.json"), augment="mosaic")
