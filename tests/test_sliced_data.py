"""Large, non-square synthetic scenes and sliced training (random crops) in the data modules."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from visattn.data import (
    CocoDataModule,
    SynthConfig,
    SyntheticDataModule,
    generate_synthetic,
    render_image,
)


def test_square_images_are_unchanged():
    """A square size renders byte-identical images and masks to before (W, H) sizes existed, so
    existing caches stay valid without a generator version bump."""
    h = hashlib.sha1()
    for i in range(2):
        img, objs = render_image(i, 3, SynthConfig())
        h.update(img.tobytes())
        for o in objs:
            h.update(o["mask"].tobytes())
    assert h.hexdigest() == "2ddf8c6ff3e9a35c09c97f0dc68df5a42c691ae2"


def test_cache_keys_of_existing_settings_are_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path))
    assert SyntheticDataModule().root.name == "synthetic-5079179112"
    assert SyntheticDataModule(num_train=16, num_val=9, image_size=96).root.name == "synthetic-a5252568c1"
    # one spelling per setting: an equal pair is the int, a list is the tuple
    assert SyntheticDataModule(image_size=[256, 256]).root == SyntheticDataModule().root
    assert SyntheticDataModule(image_size=[96, 64]).root == SyntheticDataModule(image_size=(96, 64)).root


@pytest.mark.parametrize(("size", "error", "name"), [
    ((64,), ValueError, "image_size"), ("256", TypeError, "image_size"), ((16, 64), ValueError, r"image_size\[0\]"),
    ((64, 9000), ValueError, "image_size"), (31, ValueError, "image_size"), ((64.0, 64), TypeError, r"image_size\[0\]"),
])
def test_image_size_is_checked(size, error, name):
    with pytest.raises(error, match=name):
        SynthConfig(image_size=size)
    with pytest.raises(error, match=name):
        generate_synthetic("/nonexistent/never", num_images=1, image_size=size)


def test_large_non_square_scene_has_exact_coco_annotations(tmp_path):
    """(width, height): images are H x W, masks too; boxes, areas and occlusion follow the masks."""
    root = generate_synthetic(tmp_path / "s", num_images=2, image_size=(160, 96), seed=1, min_size=4,
                              max_size_frac=0.2, min_objects=10, max_objects=16)
    data = json.loads((root / "annotations" / "instances.json").read_text())
    assert data["info"]["config"]["image_size"] == [160, 96]
    for im in data["images"]:
        assert (im["width"], im["height"]) == (160, 96)
        assert Image.open(root / "images" / im["file_name"]).size == (160, 96)
    anns = data["annotations"]
    assert anns and min(a["area"] for a in anns) < 64  # tiny objects exist (under 8 x 8)
    for a in anns:
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == (96, 160) and int(m.sum()) == a["area"]
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        assert 0.0 <= a["occlusion"] <= 0.95
        x, y, w, h = a["amodal_bbox"]
        assert x + w <= 160 and y + h <= 96
    img, objs = render_image(0, 1, SynthConfig(image_size=(160, 96)))
    assert img.shape == (96, 160, 3) and all(o["mask"].shape == (96, 160) for o in objs)


def test_synthetic_module_non_square_is_made_once_and_reused(tmp_path):
    kw = {"num_train": 2, "num_val": 1, "image_size": (80, 48), "root": str(tmp_path / "r"), "crop_size": 32,
              "synth": {"min_size": 4, "max_objects": 6}}
    dm = SyntheticDataModule(**kw)
    dm.prepare_data()
    made = (tmp_path / "r" / "train" / "annotations" / "instances.json").stat().st_mtime_ns
    SyntheticDataModule(**kw).prepare_data()  # same settings: found, not remade, no error
    assert (tmp_path / "r" / "train" / "annotations" / "instances.json").stat().st_mtime_ns == made
    with pytest.raises(ValueError, match="other settings"):
        SyntheticDataModule(**{**kw, "synth": {"min_size": 5, "max_objects": 6}}).prepare_data()
    dm.setup("fit")
    image, _ = dm.train_set[0]
    assert image.shape == (3, 32, 32)
    image, _target = dm.val_set[0]
    assert image.shape == (3, 48, 80)  # validation: whole images, never resized


def test_synth_settings_are_checked():
    with pytest.raises(ValueError, match="max_objectz"):
        SyntheticDataModule(synth={"max_objectz": 3})
    with pytest.raises(ValueError, match="image_size"):
        SyntheticDataModule(synth={"image_size": 64})
    with pytest.raises(TypeError, match="synth"):
        SyntheticDataModule(synth=[("min_size", 4)])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    return generate_synthetic(root / "s", num_images=3, image_size=(128, 96), seed=2, min_size=4, max_size_frac=0.3,
                              min_objects=12, max_objects=16)


@pytest.mark.parametrize("augment", ["none", "flip", "small_objects"])
def test_random_crops_keep_boxes_and_masks_consistent(scene, augment):
    dm = CocoDataModule(str(scene / "images"), str(scene / "annotations" / "instances.json"), crop_size=48,
                        augment=augment, masks=True)
    dm.setup("fit")
    seen = 0
    for i in range(len(dm.train_set)):
        for _ in range(3):
            image, t = dm.train_set[i]
            assert image.shape == (3, 48, 48) and t["masks"].shape[1:] == (48, 48)
            assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
            for box, m in zip(t["boxes"], t["masks"], strict=True):
                assert 0 <= box[0] < box[2] <= 48 and 0 <= box[1] < box[3] <= 48
                ys, xs = np.nonzero(m.numpy())
                if augment != "small_objects":  # no rescale: the mask lies in the clipped box
                    # (not necessarily touching it: the clipped box of an object cut by the crop is
                    # the crop of its box, looser than the box of its cropped mask when its extreme
                    # pixels lie outside the crop, as albumentations and torchvision clip boxes)
                    x0, y0, x1, y1 = (round(float(v)) for v in box)
                    assert len(xs) and x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
                seen += 1
    assert seen > 0


def test_crop_pads_small_images_and_is_checked(scene):
    dm = CocoDataModule(str(scene / "images"), str(scene / "annotations" / "instances.json"), crop_size=112,
                        augment="none")
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (3, 112, 112)  # 96 px high: padded at the bottom
    with pytest.raises(ValueError, match="crop_size"):
        CocoDataModule("a", "b", crop_size=4)
    with pytest.raises(TypeError, match="crop_size"):
        CocoDataModule("a", "b", crop_size="64")
