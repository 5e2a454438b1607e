"""Bad inputs to the data area (issue 11, "Data"): each is refused with an error that names it, or
read exactly. Add a refused input as one line in ``BAD``: ``(id, call, exception, message regex)``,
where ``call`` gets the ``ds`` fixture (a tiny COCO set on disk, see :func:`_tiny_coco`).
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visattn.data import (
    CategoryMap,
    CocoDataModule,
    CocoDetectionDataset,
    SynthConfig,
    SyntheticDataModule,
    build_transform,
    check_coco,
    decode_image,
    generate_synthetic,
    load_coco,
    preview,
    read_image,
    render_image,
    resolve_image,
)
from visattn.data import synthetic as synthetic_mod

# --------------------------------------------------------------------------------------------------
# A tiny COCO set: three 8x6 RGB PNGs, two boxes on image 1, one on image 2, none on image 3


class Tiny:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.ann = root / "annotations" / "instances.json"
        self.data = json.loads(self.ann.read_text())

    def write(self, data: dict, name: str = "edited.json") -> Path:
        path = self.root / "annotations" / name
        path.write_text(json.dumps(data))
        return path

    def edited(self, change) -> Path:
        """The annotations with ``change(data)`` applied, written to a file."""
        data = copy.deepcopy(self.data)
        change(data)
        return self.write(data)

    def dataset(self, change=lambda d: None, **kw) -> CocoDetectionDataset:
        return CocoDetectionDataset(self.images, self.edited(change), **kw)

    def module(self, **kw) -> CocoDataModule:
        return CocoDataModule(str(self.images), str(self.ann), **kw)


def _tiny_coco(root: Path) -> Tiny:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for i in range(3):
        pixels = np.full((6, 8, 3), 40 * (i + 1), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 8, "height": 6})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 3, 2], "area": 6, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [4, 2, 3, 3], "area": 9, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 8, 6], "area": 48, "iscrowd": 0},
    ]
    cats = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / "instances.json").write_text(json.dumps(data))
    (root / "secret.png").write_bytes((root / "images" / "0.png").read_bytes())  # outside the root
    return Tiny(root)


@pytest.fixture
def ds(tmp_path) -> Tiny:
    return _tiny_coco(tmp_path / "coco")


def _set(path: str, value):
    """A change for :meth:`Tiny.edited`: ``data[a][i][b] = value`` for ``path = "a.i.b"``."""
    def change(data):
        *keys, last = path.split(".")
        obj = data
        for k in keys:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        obj[int(last) if last.isdigit() else last] = value
    return change


def _drop(path: str):
    def change(data):
        *keys, last = path.split(".")
        obj = data
        for k in keys:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        del obj[last]
    return change


def _preview_with(d: Tiny, change) -> Path:
    d.edited(change).replace(d.ann)
    return preview(d.root, d.root / "p.png")


# --------------------------------------------------------------------------------------------------
# The table: (id, call(ds), exception, message regex)

BAD = [
    # 1. file names that leave the image root (every loader; preview below)
    ("dotdot", lambda d: d.dataset(_set("images.1.file_name", "../secret.png")), ValueError,
     r"image id 2.*'\.\./secret\.png'.*'\.\.'"),
    ("dotdot-inside-sub", lambda d: d.dataset(_set("images.1.file_name", "sub/../../secret.png")),
     ValueError, r"image id 2.*'\.\.'"),
    ("absolute", lambda d: d.dataset(_set("images.1.file_name", str(d.root / "secret.png"))), ValueError,
     r"image id 2.*secret\.png.*absolute"),
    ("windows-drive", lambda d: d.dataset(_set("images.0.file_name", "C:/data/0.png")), ValueError,
     r"image id 1.*absolute"),
    ("windows-backslash", lambda d: d.dataset(_set("images.0.file_name", "..\\secret.png")), ValueError,
     r"image id 1.*backslash"),
    ("unc", lambda d: d.dataset(_set("images.0.file_name", "//server/share/0.png")), ValueError,
     r"image id 1.*absolute"),
    ("empty-name", lambda d: d.dataset(_set("images.2.file_name", "")), ValueError, r"image id 3.*empty"),
    ("nul-byte", lambda d: d.dataset(_set("images.2.file_name", "2.png\x00.jpg")), ValueError,
     r"image id 3.*NUL"),
    ("root-itself", lambda d: d.dataset(_set("images.2.file_name", ".")), ValueError,
     r"image id 3.*image folder itself"),
    ("preview-dotdot", lambda d: _preview_with(d, _set("images.0.file_name", "../secret.png")), ValueError,
     r"image id 1.*'\.\.'"),
    ("resolve-non-str", lambda d: resolve_image(d.images, 5, image_id=9), TypeError, r"image id 9.*file_name"),
    # 3. decoded size vs the JSON's width/height
    ("size-mismatch", lambda d: d.dataset(_set("images.1.width", 10))[1], ValueError,
     r"image id 2 \(.*1\.png\).*10x6.*8x6"),
    ("width-without-height", lambda d: d.dataset(_drop("images.1.height")), ValueError,
     r"images\[1\].*'width' and 'height'"),
    ("height-negative", lambda d: d.dataset(_set("images.1.height", -6)), ValueError, r"images\[1\].*height=-6"),
    # 4. arguments of the data modules and functions
    ("dm-image-size-negative", lambda d: d.module(image_size=-5), ValueError, r"image_size must be an int >= 1, got -5"),
    ("dm-image-size-zero", lambda d: d.module(image_size=0), ValueError, r"image_size"),
    ("dm-image-size-str", lambda d: d.module(image_size="256"), TypeError, r"image_size"),
    ("dm-batch-size-zero", lambda d: d.module(batch_size=0), ValueError, r"batch_size"),
    ("dm-batch-size-bool", lambda d: d.module(batch_size=True), TypeError, r"batch_size"),
    ("dm-batch-size-float", lambda d: d.module(batch_size=2.0), TypeError, r"batch_size"),
    ("dm-val-batch-size", lambda d: d.module(val_batch_size=-1), ValueError, r"val_batch_size"),
    ("dm-num-workers", lambda d: d.module(num_workers=-1), ValueError, r"num_workers"),
    ("dm-masks-str", lambda d: d.module(masks="yes"), TypeError, r"masks"),
    ("dm-train-images-none", lambda d: CocoDataModule(None, str(d.ann)), TypeError, r"train_images"),
    ("dm-augment", lambda d: d.module(augment="mosaic"), ValueError, r"unknown augment preset 'mosaic'"),
    ("dm-missing-folder", lambda d: CocoDataModule(str(d.root / "nope"), str(d.ann)).setup("fit"),
     FileNotFoundError, r"image folder not found.*nope"),
    ("dm-missing-json", lambda d: CocoDataModule(str(d.images), str(d.root / "nope.json")).setup("fit"),
     FileNotFoundError, r"nope\.json"),
    ("ds-masks-int", lambda d: d.dataset(masks=1), TypeError, r"masks"),
    ("ds-categories", lambda d: d.dataset(categories=[{"id": 1}]), TypeError, r"categories"),
    ("transform-size", lambda d: build_transform("none", -5), ValueError, r"image_size"),
    ("synth-dm-image-size", lambda d: SyntheticDataModule(image_size=-5, root=str(d.root)), ValueError,
     r"image_size must be an int >= 32"),
    ("synth-dm-num-train", lambda d: SyntheticDataModule(num_train=0, root=str(d.root)), ValueError, r"num_train"),
    ("synth-dm-seed", lambda d: SyntheticDataModule(seed=-1, root=str(d.root)), ValueError, r"seed"),
    ("synth-dm-gen-workers", lambda d: SyntheticDataModule(gen_workers=0, root=str(d.root)), ValueError,
     r"gen_workers"),
    ("gen-seed", lambda d: generate_synthetic(d.root / "s", num_images=1, image_size=32, seed=-1), ValueError,
     r"seed"),
    ("gen-workers", lambda d: generate_synthetic(d.root / "s", num_images=1, image_size=32, workers=0),
     ValueError, r"workers"),
    ("gen-image-size-bool", lambda d: generate_synthetic(d.root / "s", num_images=1, image_size=True),
     TypeError, r"image_size"),
    ("gen-objects", lambda d: generate_synthetic(d.root / "s", num_images=1, image_size=32, min_objects=5,
                                                 max_objects=2), ValueError, r"max_objects must be an int >= 5"),
    ("gen-fraction", lambda d: SynthConfig(small_frac=2.0), ValueError, r"small_frac"),
    ("gen-out-is-file", lambda d: generate_synthetic(d.root / "secret.png", num_images=1, image_size=32),
     NotADirectoryError, r"secret\.png"),
    ("render-index", lambda d: render_image(-1, 0), ValueError, r"index"),
    ("preview-num-images", lambda d: preview(d.root, d.root / "p.png", num_images=0), ValueError, r"num_images"),
    ("preview-columns", lambda d: preview(d.root, d.root / "p.png", columns=0), ValueError, r"columns"),
    # 6. malformed COCO
    ("dup-annotation-id", lambda d: load_coco(d.edited(_set("annotations.2.id", 1))), ValueError,
     r"annotations\[2\] repeats annotation id 1"),
    ("dup-category-id", lambda d: load_coco(d.edited(_set("categories.1.id", 7))), ValueError,
     r"categories\[1\] repeats category id 7"),
    ("dup-image-id", lambda d: load_coco(d.edited(_set("images.2.id", 1))), ValueError,
     r"images\[2\] repeats image id 1"),
    ("bbox-nan", lambda d: load_coco(d.edited(_set("annotations.0.bbox", [1, float("nan"), 2, 2]))), ValueError,
     r"annotations\[0\] bbox"),
    ("bbox-inf", lambda d: load_coco(d.edited(_set("annotations.0.bbox", [1, 1, float("inf"), 2]))), ValueError,
     r"annotations\[0\] bbox"),
    ("bbox-length", lambda d: load_coco(d.edited(_set("annotations.1.bbox", [1, 1, 2]))), ValueError,
     r"annotations\[1\] bbox"),
    ("bbox-bool", lambda d: load_coco(d.edited(_set("annotations.1.bbox", [True, 1, 2, 2]))), ValueError,
     r"annotations\[1\] bbox"),
    ("bbox-str", lambda d: load_coco(d.edited(_set("annotations.1.bbox", ["1", 1, 2, 2]))), ValueError,
     r"annotations\[1\] bbox"),
    ("image-id-float", lambda d: load_coco(d.edited(_set("annotations.0.image_id", 1.0))), ValueError,
     r"annotations\[0\] refers to image id 1\.0"),
    ("category-id-bool", lambda d: load_coco(d.edited(_set("annotations.0.category_id", True))), ValueError,
     r"annotations\[0\] refers to category id True"),
    ("missing-image", lambda d: load_coco(d.edited(_set("annotations.0.image_id", 99))), ValueError,
     r"annotations\[0\] refers to image id 99"),
    ("annotation-id-str", lambda d: load_coco(d.edited(_set("annotations.0.id", "a"))), ValueError,
     r"annotations\[0\] 'id'"),
    ("area-nan", lambda d: load_coco(d.edited(_set("annotations.0.area", float("nan")))), ValueError,
     r"annotations\[0\] area"),
    ("iscrowd-2", lambda d: load_coco(d.edited(_set("annotations.0.iscrowd", 2))), ValueError,
     r"annotations\[0\] iscrowd"),
    ("segmentation-str", lambda d: load_coco(d.edited(_set("annotations.0.segmentation", "x"))), ValueError,
     r"annotations\[0\] segmentation"),
    ("dict-is-checked-too", lambda d: CocoDetectionDataset(d.images, {**d.data, "annotations": [
        {**d.data["annotations"][0], "bbox": [0, 0, -1, 1]}]}), ValueError, r"annotations\[0\] bbox"),
    ("categorymap-dup", lambda d: CategoryMap([{"id": 1}, {"id": 1}]), ValueError, r"repeats category id 1"),
    ("categorymap-str", lambda d: CategoryMap("abc"), TypeError, r"categories"),
    ("load-coco-none", lambda d: load_coco(None), TypeError, r"path"),
    ("decode-not-image", lambda d: decode_image(np.zeros((2, 2))), TypeError, r"PIL"),
    ("read-image-width", lambda d: read_image(d.images / "0.png", width=0, height=6), ValueError, r"width"),
]


@pytest.mark.parametrize(("call", "exc", "match"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_refused_naming_it(ds, call, exc, match):
    with pytest.raises(exc, match=match):
        call(ds)


# --------------------------------------------------------------------------------------------------
# 1. what stays allowed


def test_subfolders_and_links_placed_in_the_root_work(ds):
    (ds.images / "train").mkdir()
    (ds.images / "0.png").rename(ds.images / "train" / "0.png")
    (ds.images / "1.png").rename(ds.root / "elsewhere.png")
    os.symlink(ds.root / "elsewhere.png", ds.images / "1.png")  # the root's owner put it there

    def change(data):
        data["images"][0]["file_name"] = "train/0.png"
        data["images"][2]["file_name"] = "./2.png"
    d = ds.dataset(change)
    assert [p.name for p in d.paths] == ["0.png", "1.png", "2.png"]
    assert len(d[0][1]["boxes"]) == 2 and len(d[1][1]["boxes"]) == 1
    assert resolve_image("r", "a/b.png") == Path("r", "a", "b.png")


# --------------------------------------------------------------------------------------------------
# 2. decoding: the real range, every mode


def _png(ds: Tiny, im: Image.Image, **save) -> CocoDetectionDataset:
    im.save(ds.images / "0.png", **save)
    return ds.dataset()


def test_16bit_png_keeps_its_range(ds):
    a = np.array([[0, 16384, 32768, 65535] * 2] * 6, dtype=np.uint16)
    image, target = _png(ds, Image.fromarray(a))[0]
    assert str(image.dtype) == "torch.float32" and image.shape == (3, 6, 8)
    assert image[:, 0, :4].numpy() == pytest.approx(np.array([[0.0, 16384 / 65535, 32768 / 65535, 1.0]] * 3))
    assert len(target["boxes"]) == 2


def test_16bit_big_endian_and_32bit_int():
    a = np.array([[0, 1000, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 1), a.astype(">u2").tobytes())
    assert np.allclose(decode_image(big)[0, :, 0], a[0] / 65535)
    assert np.allclose(decode_image(Image.fromarray(a.astype(np.int32), "I"))[0, :, 1], a[0] / 65535)
    with pytest.raises(OSError, match="outside the 16-bit range"):
        decode_image(Image.fromarray(np.array([[70000]], dtype=np.int32), "I"), name="deep.tif")


@pytest.mark.parametrize(("mode", "make", "expected"), [
    ("L", lambda: Image.new("L", (2, 1), 77), [77, 77, 77]),
    ("LA", lambda: Image.new("LA", (2, 1), (77, 0)), [77, 77, 77]),  # alpha dropped, not composited
    ("RGBA", lambda: Image.new("RGBA", (2, 1), (10, 20, 30, 0)), [10, 20, 30]),
    ("1", lambda: Image.new("1", (2, 1), 1), [255, 255, 255]),
    ("CMYK", lambda: Image.new("CMYK", (2, 1), (0, 255, 255, 0)), [255, 0, 0]),
    ("F", lambda: Image.fromarray(np.full((1, 2), 0.25, dtype=np.float32), "F"), [0.25, 0.25, 0.25]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_mode_decodes_to_three_channels(mode, make, expected):
    out = decode_image(make())
    assert out.shape == (1, 2, 3) and out[0, 0].tolist() == pytest.approx(expected)
    assert out.dtype == (np.float32 if mode == "F" else np.uint8)


def test_palette_with_transparency_and_bad_float():
    p = Image.new("P", (2, 1), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.info["transparency"] = 1
    assert decode_image(p)[0, 0].tolist() == [200, 100, 50]
    with pytest.raises(OSError, match="float image.*0..1"):
        decode_image(Image.fromarray(np.full((1, 1), 3.0, dtype=np.float32), "F"), name="x.tif")


# --------------------------------------------------------------------------------------------------
# 3. EXIF orientation and the JSON's size


def _exif_png(ds: Tiny, orientation: int) -> None:
    """Image 1 stored as 8x6 with EXIF ``orientation``; a red pixel at stored (x=0, y=0)."""
    im = Image.new("RGB", (8, 6), (40, 40, 40))
    im.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(ds.images / "0.png", exif=exif)


def test_exif_rotation_applied_where_only_the_rotated_size_matches(ds):
    _exif_png(ds, 6)  # rotate 90 degrees clockwise to display: 6 wide, 8 high

    def change(data):
        data["images"][0].update(width=6, height=8)
        data["annotations"][0]["bbox"] = [4, 0, 2, 2]  # the red corner, in displayed pixels
    image, target = ds.dataset(change)[0]
    assert tuple(image.shape[1:]) == (8, 6) and target["orig_size"] == (8, 6)
    assert image[:, 0, 5].tolist() == [1.0, 0.0, 0.0]  # stored (0, 0) is displayed at (x=5, y=0)
    assert target["boxes"][0].tolist() == [4.0, 0.0, 6.0, 2.0]


def test_exif_ignored_where_the_stored_size_matches(ds):
    _exif_png(ds, 6)
    image, _ = ds.dataset()[0]  # JSON says 8x6: annotated on the stored pixels (COCO's convention)
    assert tuple(image.shape[1:]) == (6, 8) and image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_missing_size_uses_stored_pixels_unless_exif_makes_it_ambiguous(ds):
    def no_size(data):
        for im in data["images"]:
            del im["width"], im["height"]
    assert tuple(ds.dataset(no_size)[0][0].shape[1:]) == (6, 8)
    _exif_png(ds, 8)
    with pytest.raises(ValueError, match=r"image id 1 .*EXIF orientation 8.*no width/height"):
        ds.dataset(no_size)[0]


def test_size_mismatch_names_the_rotated_size_too(ds):
    _exif_png(ds, 6)
    with pytest.raises(ValueError, match=r"image id 1 .*0\.png.*7x7.*8x6.*6x8 after its EXIF"):
        ds.dataset(lambda d: d["images"][0].update(width=7, height=7))[0]


# --------------------------------------------------------------------------------------------------
# 6. results independent of the file's order


def test_targets_do_not_depend_on_file_order(ds):
    forward = ds.dataset()

    def shuffle(data):
        data["images"].reverse()
        data["annotations"].reverse()
        data["categories"].reverse()
    backward = ds.dataset(shuffle)
    for i in range(len(forward)):
        a, b = forward[i][1], backward[i][1]
        assert a["image_id"] == b["image_id"]
        assert a["boxes"].tolist() == b["boxes"].tolist() and a["labels"].tolist() == b["labels"].tolist()
    assert forward.categories.category_ids == backward.categories.category_ids == [3, 7]


def test_check_coco_accepts_a_valid_set(ds):
    assert check_coco(copy.deepcopy(ds.data), "x")["images"] == ds.data["images"]


@pytest.mark.parametrize("segm, match", [
    ({"size": [8, 8], "counts": "0"}, r"annotations\[0\] segmentation is not a valid RLE: its runs cover 0 pixels"),
    ({"size": [8, 8], "counts": "P~~"}, r"annotations\[0\].*not an RLE character"),
    ({"size": [8, 8], "counts": [10, 20]}, r"annotations\[0\].*runs cover 30 pixels, not height \* width = 64"),
    ({"size": [8], "counts": "0"}, r"annotations\[0\].*'size' must be \[height, width\]"),
])
def test_check_coco_refuses_a_corrupt_rle(ds, segm, match):
    """pycocotools decodes a corrupt RLE silently (a wrong mask, or a long loop): refused at load."""
    data = copy.deepcopy(ds.data)
    data["annotations"][0]["segmentation"] = segm
    with pytest.raises(ValueError, match=match):
        check_coco(data, "x")


# --------------------------------------------------------------------------------------------------
# 5. writers stage their whole output and swap it in


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _staging(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if ".partial-" in p.name)


def test_failed_regeneration_leaves_the_old_set(tmp_path, monkeypatch):
    out = generate_synthetic(tmp_path / "s", num_images=3, image_size=32, seed=1)
    before = _snapshot(out)
    real = synthetic_mod._render_and_save

    def fail_at_2(job):
        if job[0] == 2:
            raise RuntimeError("disk full")
        return real(job)
    monkeypatch.setattr(synthetic_mod, "_render_and_save", fail_at_2)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic(out, num_images=4, image_size=32, seed=2)
    assert _snapshot(out) == before and _staging(out) == []


def test_regeneration_replaces_the_whole_set(tmp_path):
    out = generate_synthetic(tmp_path / "s", num_images=4, image_size=32, seed=1)
    (out / "notes.txt").write_text("mine")
    generate_synthetic(out, num_images=2, image_size=32, seed=2)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert load_coco(out / "annotations" / "instances.json")["info"]["seed"] == 2
    assert (out / "notes.txt").read_text() == "mine" and _staging(out) == []


_KILLABLE = textwrap.dedent(f"""
    import sys, types
    pkg = types.ModuleType("visattn")  # skip visattn/__init__ (torch): the generator needs none of it
    pkg.__path__ = [{str(Path(__file__).resolve().parents[1] / "visattn")!r}]
    sys.modules["visattn"] = pkg
    from visattn.data.synthetic import generate_synthetic
    generate_synthetic(sys.argv[1], num_images=100000, image_size=32, seed=5, workers=2)
""")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_generation_leaves_old_set_and_no_workers(tmp_path, sig):
    out = generate_synthetic(tmp_path / "s", num_images=2, image_size=32, seed=1)
    before = _snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(out)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # until both workers render
            stage = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
            if stage and len(list((stage[0] / "images").glob("*.png"))) > 20 and len(_children(proc.pid)) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the generator did not start (exit code {proc.poll()})")
        workers = _children(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the killed generator"
    assert _snapshot(out) == before  # the old complete set, untouched
    if sig == signal.SIGTERM:
        assert _staging(out) == []  # cleaned up on the way out
    generate_synthetic(tmp_path / "s", num_images=1, image_size=32, seed=1)
    assert _staging(out) == []  # a later run removes what a SIGKILL left


# --------------------------------------------------------------------------------------------------
# 5. the synthetic module's cache


def test_cache_with_other_settings_is_an_error_not_reused(tmp_path):
    generate_synthetic(tmp_path / "c" / "train", num_images=2, image_size=32, seed=0)
    dm = SyntheticDataModule(num_train=3, num_val=2, image_size=32, root=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"c/train holds a synthetic split made with other settings.*num_images"):
        dm.prepare_data()


def test_cache_is_made_once_and_reused(tmp_path):
    kw = {"num_train": 2, "num_val": 1, "image_size": 32, "root": str(tmp_path / "c")}
    SyntheticDataModule(**kw).prepare_data()
    ann = tmp_path / "c" / "train" / "annotations" / "instances.json"
    stamp = ann.stat().st_mtime_ns
    dm = SyntheticDataModule(**kw)
    dm.prepare_data()
    assert ann.stat().st_mtime_ns == stamp
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 1
    a = SyntheticDataModule(num_train=2, num_val=1, image_size=32)
    b = SyntheticDataModule(num_train=2, num_val=1, image_size=64)
    assert a.root != b.root
