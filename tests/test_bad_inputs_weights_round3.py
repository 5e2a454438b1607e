"""Published weights and checkpoints: no silent wrong answers (issue #24, round 3).

Tables, one line per case:

- ``PUBLISH_REFUSED``: ``weights.publish`` refuses NaN / inf tensors, values float16 cannot hold,
  tensors that do not fit the config and bad arguments, naming each, and writes nothing;
- ``BAD_FILES``: a published file with NaN, bad safetensors headers, or tensors whose names, shapes
  or dtypes do not match its config is refused by both ``verify`` and ``load_pretrained``;
- ``BAD_MANIFESTS``: duplicated names or keys, malformed sha256, a wrong ``file_size``;
- ``BAD_CHECKPOINTS``: ``DetectionModule.load_from_checkpoint`` / ``SegmentationModule...`` verify
  the checkpoint as the training CLI does (zip CRCs, ``weights_only``, finite weights, keys and
  shapes), and ``load_from_checkpoint(path)`` without ``model=`` rebuilds the model from what the
  run saved or says what to pass.

Everything is offline and tiny: one training run of a 2-layer model through the real CLI
(seconds), an FCOS with a 32-channel FPN for the weights.
"""
from __future__ import annotations

import json
import shutil
import struct
import zipfile
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from visattn import weights
from visattn.lit import DetectionModule, SegmentationModule, WarmupCosineLR
from visattn.lit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests.test_bad_inputs_weights_round3"
NAME = "fcos_resnet10t_none.tiny"
TINY = {"arch": "fcos", "backbone": "resnet10t", "num_classes": 2, "fpn_channels": 32,
        "detector_kwargs": {"min_size": 64, "max_size": 64}}
LOGITS, FPN_BIAS, COUNTER = ("head.classification_head.cls_logits.bias", "backbone.fpn.inner_blocks.0.0.bias",
                             "backbone.body.features.bn1.num_batches_tracked")


# -- published weights ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    from visattn.models import build_detector

    torch.manual_seed(0)
    return build_detector(**TINY).state_dict()


@pytest.fixture
def run(tmp_path, monkeypatch) -> Path:
    """A run folder with ``config.yaml`` and ``report.json``; the manifest is ``<tmp>/weights``."""
    monkeypatch.setenv("VISATTN_OFFLINE", "1")  # never any network here
    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VISATTN_WEIGHTS_MANIFEST", str(tmp_path / "weights" / "manifest.json"))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": "visattn.lit.DetectionModule",
        "init_args": {"model": {"class_path": "visattn.models.build_detector", "init_args": TINY}}}}))
    (folder / "report.json").write_text(json.dumps({"result": {"AP": 0.25}}))
    return folder


def _publish(run: Path, state: dict, **kwargs) -> dict:
    ckpt = run / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, ckpt)
    args = {"name": NAME, "config": run / "config.yaml", "report": run / "report.json", "command": "pytest",
            "seed": 0, **kwargs}
    return weights.publish(ckpt, **args)


def _with(state: dict, key: str, value) -> dict:
    return {**state, key: value(state[key].clone())}


def _fill(x: float):
    def f(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[0] = x
        return t
    return f


def _written(run: Path) -> list[str]:
    folder = run.parent / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


#: (id, state change (key, tensor -> tensor) or None, publish keywords, exception, message regex)
PUBLISH_REFUSED = [
    ("nan", (LOGITS, _fill(float("nan"))), {}, weights.WeightsError, rf"non-finite values in {LOGITS}"),
    ("inf-fp32", (LOGITS, _fill(float("inf"))), {"fp16": False}, weights.WeightsError,
     rf"non-finite values in {LOGITS}"),
    ("fp16-overflow", (FPN_BIAS, _fill(1e6)), {}, weights.WeightsError,
     rf"{FPN_BIAS}.*max abs 1e\+06.*float16.*fp16_overflow='float32'"),
    ("shape", (FPN_BIAS, lambda t: t.reshape(1, -1)), {}, ValueError,
     rf"does not match .*{FPN_BIAS}: checkpoint \(1, 32\), model \(32,\)"),
    ("name-newline", None, {"name": NAME + "\n"}, ValueError, r"is not arch_backbone_attn.tag"),
    ("seed", None, {"seed": -1}, ValueError, r"seed must be an int >= 0"),
    ("seed-str", None, {"seed": "0"}, TypeError, r"seed must be an int"),
    ("command", None, {"command": ""}, ValueError, r"command must be a non-empty str"),
    ("fp16-bool", None, {"fp16": "yes"}, TypeError, r"fp16 must be True or False"),
    ("overflow-choice", None, {"fp16_overflow": "keep"}, ValueError, r"fp16_overflow must be one of"),
    ("license", None, {"license": ""}, ValueError, r"license must be a non-empty str"),
]


@pytest.mark.parametrize(("change", "kwargs", "exc", "message"), [c[1:] for c in PUBLISH_REFUSED],
                         ids=[c[0] for c in PUBLISH_REFUSED])
def test_publish_refuses_and_writes_nothing(run, tiny_state, change, kwargs, exc, message):
    state = tiny_state if change is None else _with(tiny_state, *change)
    with pytest.raises(exc, match=message):
        _publish(run, state, **kwargs)
    assert _written(run) == []


def test_checkpoint_with_nan_weights_is_not_loaded_for_prediction(run, tiny_state):
    from visattn.predict import load_detector

    ckpt = run / "nan.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _with(tiny_state, LOGITS, _fill(float("nan"))).items()}},
               ckpt)
    with pytest.raises(weights.WeightsError, match=rf"nan.ckpt: non-finite values in {LOGITS}"):
        load_detector(ckpt=ckpt, config=run / "config.yaml")


def test_publish_keeps_float32_for_overflowing_tensors_when_asked(run, tiny_state):
    entry = _publish(run, _with(tiny_state, FPN_BIAS, _fill(1e6)), fp16_overflow="float32")
    assert entry["dtype"] == "float16+float32"
    assert weights.verify(NAME).name == f"{NAME}.safetensors"
    model = weights.load_pretrained(NAME)
    assert model.state_dict()[FPN_BIAS][0].item() == 1e6  # float32: exact, not inf
    assert model.state_dict()[LOGITS].dtype == torch.float32


def test_cli_publish_fp16_overflow_option(run, tiny_state, capsys):
    from visattn.cli import main as visattn_main

    ckpt = run / "big.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in _with(tiny_state, FPN_BIAS, _fill(1e6)).items()}}, ckpt)
    argv = ["weights", "publish", str(ckpt), "--name", NAME, "--config", str(run / "config.yaml"), "--report",
            str(run / "report.json"), "--recipe-command", "pytest", "--seed", "0"]
    assert visattn_main(argv) == 2  # refused by default, one line naming the tensor
    assert FPN_BIAS in capsys.readouterr().err
    assert visattn_main([*argv, "--fp16-overflow", "float32"]) == 0
    assert weights.pretrained_info(NAME)["dtype"] == "float16+float32"


def test_failed_republish_leaves_the_published_file_and_manifest_as_they_were(run, tiny_state, monkeypatch):
    _publish(run, tiny_state)
    manifest = run.parent / "weights" / "manifest.json"
    before = {p.name: p.read_bytes() for p in manifest.parent.iterdir()}
    other = _with(tiny_state, LOGITS, _fill(0.5))
    with pytest.raises(ValueError, match="license"):
        _publish(run, other, license="")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("visattn._io.atomic_write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _publish(run, other)
    assert {p.name: p.read_bytes() for p in manifest.parent.iterdir()} == before
    weights.verify(NAME)


def _ship(run: Path, content: bytes | dict, **over) -> None:
    """A manifest entry for ``content`` (raw bytes or a state dict saved as safetensors) with the
    right sha256, size and parameter count, as a careless publisher would write it."""
    folder = run.parent / "weights"
    folder.mkdir(exist_ok=True)
    path = folder / f"{NAME}.safetensors"
    if isinstance(content, dict):
        save_file({k: v.contiguous() for k, v in content.items()}, str(path))
    else:
        path.write_bytes(content)
    entry = {"sha256": weights.sha256_file(path), "file_size": path.stat().st_size, "format": "safetensors",
             "path": path.name, "num_params": 5074304, "config": {"builder": "build_detector", "kwargs": TINY},
             "metrics": {"val": {"AP": 1.0}}, "recipe": {"command": "c", "seed": 0, "visattn_version": "0"},
             "license": "MIT", **over}
    (folder / "manifest.json").write_text(json.dumps({"models": {NAME: entry}}))


def _fp16(state: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _file(state: dict) -> bytes:
    """The bytes of a well-formed fp16 safetensors file of ``state``."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in _fp16(state).items()})


#: (id, file content from the tiny state, manifest fields, message regex); both verify and
#: load_pretrained raise weights.WeightsError (a ValueError) naming the model
BAD_FILES = [
    ("nan", lambda s: _fp16(_with(s, LOGITS, _fill(float("nan")))), {}, rf"non-finite values in {LOGITS}"),
    ("inf", lambda s: _fp16(_with(s, LOGITS, _fill(float("inf")))), {}, rf"non-finite values in {LOGITS}"),
    ("header-too-large", lambda s: struct.pack("<Q", 2**40) + b"{}", {}, r"header too large"),
    ("truncated", lambda s: _file(s)[:-100], {}, r"incomplete metadata|truncated"),
    ("bad-json-header", lambda s: struct.pack("<Q", 6) + b"{abc} ", {}, r"invalid JSON"),
    ("shape", lambda s: _fp16(_with(s, FPN_BIAS, lambda t: t.reshape(1, -1))), {},
     rf"shape mismatch \(1\): {FPN_BIAS}: weights file \(1, 32\), model \(32,\)"),
    ("missing", lambda s: _fp16({k: v for k, v in s.items() if k != FPN_BIAS}), {}, rf"missing \(1\): {FPN_BIAS}"),
    ("int-weight", lambda s: _fp16(_with(s, LOGITS, lambda t: t.to(torch.int8))), {}, rf"{LOGITS}.*int8"),
    ("float-counter", lambda s: _fp16(_with(s, COUNTER, lambda t: t.float())), {}, rf"{COUNTER}: file float16, model int64"),
    ("dtype-not-as-declared", lambda s: s, {"dtype": "float16"}, r"float32.*manifest says float16"),
]


@pytest.mark.parametrize(("content", "over", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_published_file_is_refused_by_verify_and_load(run, tiny_state, content, over, message):
    _ship(run, content(tiny_state), **over)
    for call in (weights.verify, weights.load_pretrained):
        with pytest.raises(weights.WeightsError, match=rf"{NAME}(.|\n)*({message})"):
            call(NAME)


def _manifest_text(entry: dict, twice: str) -> str:
    body, name = json.dumps(entry), json.dumps(NAME)
    if twice == "name":
        return f'{{"models": {{\n {name}: {body},\n "fcos_r_none.b": {body},\n {name}: {body}\n}}}}'
    return f'{{"models": {{{name}: {body[:-1]}, "license": "MIT"}}}}}}'


def _entry(**over) -> dict:
    entry = {"sha256": "a" * 64, "file_size": 10, "format": "safetensors", "mirrors": ["https://example.org/w"],
             "num_params": 10, "config": {"builder": "build_detector", "kwargs": {}},
             "metrics": {"val": {"AP": 1.0}}, "recipe": {"command": "c", "seed": 0, "visattn_version": "0"},
             "license": "Apache-2.0"}
    return {**entry, **over}


#: (id, manifest text, message regex): load_manifest raises ValueError
BAD_MANIFESTS = [
    ("duplicated-name", _manifest_text(_entry(), "name"),
     rf"duplicated model name '{NAME}': entries 1 and 3 of 'models' \(lines 2 and 4\)"),
    ("duplicated-field", _manifest_text(_entry(), "field"), rf"{NAME}.*duplicated key 'license'"),
    ("sha-upper-case", json.dumps({"models": {NAME: _entry(sha256="A" * 64)}}), r"sha256 must be .*lower-case"),
    ("sha-newline", json.dumps({"models": {NAME: _entry(sha256="a" * 64 + "\n")}}), r"sha256 must be"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifest_is_an_error_naming_the_fault(tmp_path, text, message):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        weights.load_manifest(path)


def test_manifest_file_size_that_differs_from_the_file_is_refused(run, tiny_state):
    _ship(run, _fp16(tiny_state))
    data = json.loads((run.parent / "weights" / "manifest.json").read_text())
    data["models"][NAME]["file_size"] += 1
    (run.parent / "weights" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(weights.ChecksumError, match=rf"{NAME}.*file_size"):
        weights.verify(NAME)


# -- checkpoints --------------------------------------------------------------------------------
class TinyDetector(nn.Module):
    """``model(images, targets)`` -> ``{"mse": loss}`` in training, empty detections in eval."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, 1)

    def forward(self, images, targets=None):
        out = self.head(self.conv(torch.stack(images)).mean((2, 3))).squeeze(1)
        if not self.training:
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in images]
        return {"mse": ((out - torch.stack([t["y"] for t in targets])) ** 2).mean()}


class TinyData(L.LightningDataModule):
    """Two batches of two 3x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.rand(3, 8, 8, generator=g), {"y": torch.rand((), generator=g)}) for _ in range(4)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=2, collate_fn=lambda b: tuple(zip(*b, strict=True)))


#: the keys Lightning itself writes: a checkpoint of an earlier visattn, without what this one adds
LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
                  "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``last.ckpt`` of a 1-epoch ``train.py fit`` of the quickstart config with TinyDetector(width=3);
    its ``config.yaml`` is two folders up, where the CLI writes it."""
    root = tmp_path_factory.mktemp("fit")
    cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs=1",
              f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              f"--model.init_args.model={HERE}.TinyDetector", "--model.init_args.model.init_args.width=3",
              "--model.init_args.scheduler.init_args.warmup_steps=1", f"--data={HERE}.TinyData"])
    return next(root.glob("**/checkpoints/last.ckpt"))


def _flip_middle_byte(src: Path, dst: Path) -> Path:
    """Flip one byte in the middle of the largest tensor in the archive (headers untouched)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
    name_len, extra_len = (int.from_bytes(data[info.header_offset + i: info.header_offset + i + 2], "little")
                           for i in (26, 28))
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _rewrite(src: Path, dst: Path, change) -> Path:
    ckpt = torch.load(src, weights_only=True)
    change(ckpt)
    torch.save(ckpt, dst)
    return dst


def _nan(ckpt: dict) -> None:
    ckpt["state_dict"]["model.head.weight"][0, 0] = float("nan")


def _lightning_only(ckpt: dict) -> None:
    for k in [k for k in ckpt if k not in LIGHTNING_KEYS]:
        del ckpt[k]


def _other_lr(version: Path, dst: Path) -> Path:
    """``dst`` beside a ``config.yaml`` of another run (another learning rate)."""
    cfg = yaml.safe_load((version / "config.yaml").read_text())
    cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.5
    (dst.parent.parent / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def _in_run_layout(tmp: Path) -> Path:
    (tmp / "v" / "checkpoints").mkdir(parents=True)
    return tmp / "v" / "checkpoints"


def _given(width: int = 3) -> dict:
    """``model=`` as the user passes it: these loads fail for what is in the file, not for want of a model."""
    return {"model": TinyDetector(width=width)}


#: (id, module class, make(checkpoint, tmp) -> path or argument, keywords, exception, message regex)
BAD_CHECKPOINTS = [
    ("flipped-byte", DetectionModule, lambda c, t: _flip_middle_byte(c, t / "flipped.ckpt"), _given(), ValueError,
     r"flipped.ckpt.* is corrupt: member '.*' fails its CRC check"),
    ("flipped-byte-seg", SegmentationModule, lambda c, t: _flip_middle_byte(c, t / "flipped.ckpt"), {}, ValueError,
     r"flipped.ckpt.* is corrupt"),
    ("truncated", DetectionModule, lambda c, t: _cut(c, t / "cut.ckpt"), _given(), ValueError,
     r"cut.ckpt.* is truncated"),
    ("nan-weights", DetectionModule, lambda c, t: _rewrite(c, t / "nan.ckpt", _nan), _given(), FloatingPointError,
     r"refusing to load checkpoint '.*nan.ckpt': non-finite values in model.head.weight"),
    ("pickled-code", DetectionModule, lambda c, t: _code(t / "code.ckpt"), _given(), ValueError,
     r"code.ckpt.* cannot be loaded: UnpicklingError"),
    ("other-config-model-given", DetectionModule, lambda c, t: shutil.copy(c, t / "w3.ckpt"),
     _given(width=5), ValueError,
     r"checkpoint '.*w3.ckpt' does not match the model .*model.conv.weight: checkpoint \(3, 3, 3, 3\), model \(5, "),
    ("no-recipe", DetectionModule, lambda c, t: _rewrite(c, t / "alone.ckpt", _lightning_only), {}, ValueError,
     r"alone.ckpt.*cannot rebuild the model.*pass model=.*or config="),
    ("config-of-another-run", DetectionModule,
     lambda c, t: _other_lr(c.parent.parent, _rewrite(c, _in_run_layout(t) / "last.ckpt", _lightning_only)), {},
     ValueError, r"config.yaml.*is not the config of .*last.ckpt.*optimizer"),
    ("config-missing", DetectionModule, lambda c, t: c, {"config": "/nonexistent/config.yaml"}, FileNotFoundError,
     r"config '/nonexistent/config.yaml' does not exist"),
    ("url", DetectionModule, lambda c, t: "https://127.0.0.1:9/last.ckpt", {}, ValueError,
     r"checkpoint_path 'https://127.0.0.1:9/last.ckpt'.*local file"),
    ("path-type", DetectionModule, lambda c, t: 3, {}, TypeError, r"checkpoint_path must be a path"),
    ("missing-file", DetectionModule, lambda c, t: t / "nowhere.ckpt", {}, FileNotFoundError, r"nowhere.ckpt"),
]


def _cut(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    return dst


def _code(dst: Path) -> Path:
    torch.save({"state_dict": {}, "payload": TinyDetector()}, dst)
    return dst


@pytest.mark.parametrize(("cls", "make", "kwargs", "exc", "message"), [c[1:] for c in BAD_CHECKPOINTS],
                         ids=[c[0] for c in BAD_CHECKPOINTS])
def test_load_from_checkpoint_verifies_like_the_cli(trained, tmp_path, cls, make, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        cls.load_from_checkpoint(make(trained, tmp_path), **kwargs)


def _same_weights(module: DetectionModule, ckpt: Path) -> bool:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("where", ["config-beside", "checkpoint-alone", "config-given"])
def test_load_from_checkpoint_without_model_rebuilds_it(trained, tmp_path, where):
    if where == "config-beside":  # a checkpoint of an earlier visattn, in the CLI's run layout
        path = _rewrite(trained, _in_run_layout(tmp_path) / "last.ckpt", _lightning_only)
        shutil.copy(trained.parent.parent / "config.yaml", path.parent.parent / "config.yaml")
        module = DetectionModule.load_from_checkpoint(path)
    elif where == "checkpoint-alone":  # what this visattn writes carries its model's config
        path = Path(shutil.copy(trained, tmp_path / "copy.ckpt"))
        module = DetectionModule.load_from_checkpoint(path)
    else:
        path = _rewrite(trained, tmp_path / "alone.ckpt", _lightning_only)
        module = DetectionModule.load_from_checkpoint(path, config=trained.parent.parent / "config.yaml")
    assert isinstance(module.model, TinyDetector) and module.model.conv.out_channels == 3
    assert _same_weights(module, trained) and module.hparams.scheduler_interval == "step"


@pytest.mark.parametrize("bad", ["flipped", "nan"])
def test_plain_trainer_ckpt_path_is_verified(trained, tmp_path, bad):
    path = (_flip_middle_byte(trained, tmp_path / "bad.ckpt") if bad == "flipped"
            else _rewrite(trained, tmp_path / "bad.ckpt", _nan))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    module = DetectionModule(TinyDetector(width=3), optimizer=partial(torch.optim.AdamW, lr=0.002, weight_decay=1e-4),
                             scheduler=partial(WarmupCosineLR, warmup_steps=1), scheduler_interval="step")  # as trained
    with pytest.raises(ValueError if bad == "flipped" else FloatingPointError,
                       match=r"bad.ckpt.*(fails its CRC check|non-finite values in model.head.weight)"):
        trainer.fit(module, datamodule=TinyData(), ckpt_path=path)
