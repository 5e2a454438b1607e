"""Verified downloads and the offline cache, against an HTTP server on 127.0.0.1 started here."""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading

import pytest

from visattn import weights
from visattn.weights import ChecksumError, DownloadError, OfflineError, download

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not all one byte
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/ok`` serves PAYLOAD with Range support; ``/norange`` ignores Range; ``/drop`` sends half
    the body on the first request then closes; ``/bad`` serves other bytes; ``/404``, ``/500``."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = self.path
        if path in ("/404", "/500"):
            self.send_error(int(path[1:]))
            return
        body = b"x" * len(PAYLOAD) if path == "/bad" else PAYLOAD
        start = 0
        rng = self.headers.get("Range")
        if rng and path != "/norange":
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if path in ("/drop", "/norange") and server.drops > 0:
            server.drops -= 1
            self.wfile.write(body[start:start + len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.drops = [], 1
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for k in ("VISATTN_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VISATTN_PROGRESS", "0")


def _cache_files(tmp_path):
    folder = tmp_path / "cache" / "weights"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_download_then_cache_hit_without_request(server, tmp_path):
    path = download(f"{server.url}/ok", sha256=SHA)
    assert path.read_bytes() == PAYLOAD and path.name == f"{SHA}.safetensors"
    assert download(f"{server.url}/ok", sha256=SHA) == path
    assert len(server.requests) == 1


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    with pytest.raises(ChecksumError, match=r"checksum mismatch for .*/bad"):
        download(f"{server.url}/bad", sha256=SHA)
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_status_and_url(server, tmp_path, status):
    with pytest.raises(DownloadError, match=rf"{server.url}/{status}.*HTTP {status}"):
        download(f"{server.url}/{status}", sha256=SHA)
    assert _cache_files(tmp_path) == []


def test_connection_refused_names_url(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(DownloadError, match=rf"127.0.0.1:{port}/w.*cannot reach"):
        download(f"http://127.0.0.1:{port}/w", sha256=SHA)
    assert _cache_files(tmp_path) == []


def test_dropped_connection_resumes_with_range(server):
    path = download(f"{server.url}/drop", sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]


def test_server_without_range_support_restarts(server):
    assert download(f"{server.url}/norange", sha256=SHA).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_mirrors_are_tried_in_order(server):
    path = download([f"{server.url}/500", f"{server.url}/ok"], sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/500", "/ok"]


def test_every_mirror_failing_lists_each(server, tmp_path):
    with pytest.raises(DownloadError, match=r"every mirror failed(.|\n)*HTTP 404(.|\n)*checksum mismatch"):
        download([f"{server.url}/404", f"{server.url}/bad"], sha256=SHA)
    assert _cache_files(tmp_path) == []


def test_tampered_cache_file_is_removed_and_fetched_again(server):
    path = download(f"{server.url}/ok", sha256=SHA)
    path.write_bytes(b"tampered")
    assert download(f"{server.url}/ok", sha256=SHA).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


@pytest.mark.parametrize("var", ["VISATTN_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_makes_no_request(server, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(OfflineError, match="not in the cache"):
        download(f"{server.url}/ok", sha256=SHA)
    assert server.requests == []


def test_offline_cache_hit_still_loads(server, monkeypatch):
    path = download(f"{server.url}/ok", sha256=SHA)
    monkeypatch.setenv("VISATTN_OFFLINE", "1")
    assert download(f"{server.url}/ok", sha256=SHA) == path


@pytest.mark.parametrize("kwargs, pattern", [
    ({"url": "http://x/a", "sha256": SHA[:8]}, r"full 64-hex-digit sha256"),
    ({"url": "ftp://x/a", "sha256": SHA}, r"url must be an http"),
    ({"url": [], "sha256": SHA}, r"url must be"),
    ({"url": "http://x/a", "sha256": SHA, "file_size": 0}, r"file_size"),
])
def test_download_validates_arguments(kwargs, pattern):
    url = kwargs.pop("url")
    with pytest.raises(ValueError, match=pattern):
        download(url, **kwargs)


def test_pickled_checkpoints_are_refused():
    for name in ("model.pth", "last.ckpt", "w.pt"):
        with pytest.raises(ValueError, match="visattn weights publish"):
            weights.load_pretrained(name)


def test_unknown_name_suggests_close_matches(tmp_path, monkeypatch):
    entry = _entry()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": {"fcos_resnet10t_eca.synth256": entry}}))
    monkeypatch.setenv("VISATTN_WEIGHTS_MANIFEST", str(manifest))
    with pytest.raises(ValueError, match="did you mean fcos_resnet10t_eca.synth256"):
        weights.pretrained_info("fcos_resnet10t_eca.synth265")
    assert weights.list_pretrained("fcos_*") == ["fcos_resnet10t_eca.synth256"]
    assert weights.list_pretrained("retinanet_*") == []


def _entry(**over):
    entry = {"sha256": SHA, "file_size": len(PAYLOAD), "format": "safetensors", "mirrors": ["https://example.org/w"],
             "num_params": 10, "config": {"builder": "build_detector", "kwargs": {}},
             "metrics": {"synthetic-val": {"AP": 0.1}}, "recipe": {"command": "c", "seed": 0, "visattn_version": "0"},
             "license": "Apache-2.0"}
    entry.update(over)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("name, over, pattern", [
    ("Fcos-Resnet", {}, r"arch_backbone_attn\.tag"),
    ("fcos_r_eca.t", {"sha256": SHA[:8]}, r"sha256"),
    ("fcos_r_eca.t", {"format": "pth"}, r"format must be 'safetensors'"),
    ("fcos_r_eca.t", {"mirrors": None}, r"at least one source"),
    ("fcos_r_eca.t", {"mirrors": ["http://insecure/w"]}, r"https://"),
    ("fcos_r_eca.t", {"path": "../../etc/passwd"}, r"inside weights/"),
    ("fcos_r_eca.t", {"num_params": 0}, r"num_params"),
    ("fcos_r_eca.t", {"metrics": {"val": {"AP": float("nan")}}}, r"finite number"),
    ("fcos_r_eca.t", {"config": {"builder": "eval", "kwargs": {}}}, r"builder"),
    ("fcos_r_eca.t", {"recipe": {"command": "c"}}, r"recipe"),
    ("fcos_r_eca.t", {"license": None}, r"missing field"),
])
def test_manifest_schema_errors_name_entry_and_field(name, over, pattern):
    with pytest.raises(ValueError, match=pattern):
        weights.validate_entry(name, _entry(**over))


# -- publish and load: a tiny detector through the real code ---------------------------------------
TINY = {"arch": "fcos", "backbone": "resnet10t", "num_classes": 2, "fpn_channels": 32,
        "detector_kwargs": {"min_size": 64, "max_size": 64}}


@pytest.fixture
def published(tmp_path, monkeypatch):
    import torch
    import yaml

    from visattn.models import build_detector

    torch.manual_seed(0)
    model = build_detector(**TINY)
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, ckpt)
    config = tmp_path / "run" / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "visattn.lit.DetectionModule", "init_args": {
        "model": {"class_path": "visattn.models.build_detector", "init_args": TINY}}}}))
    report = tmp_path / "run" / "report.json"
    report.write_text(json.dumps({"result": {"AP": 0.25, "APs": 0.125, "AP50": 0.5, "APl": -1.0,
                                             "size": {"tiny": {"AP": 0.1}}, "occlusion": {"heavy": {"AP": 0.01}},
                                             "occluded_recall": {"recall": 0.3}}}))
    manifest = tmp_path / "weights" / "manifest.json"
    monkeypatch.setenv("VISATTN_WEIGHTS_MANIFEST", str(manifest))
    entry = weights.publish(ckpt, name="fcos_resnet10t_none.tiny", config=config, report=report,
                            command="pytest", seed=0)
    return model, entry, manifest


def test_publish_then_load_pretrained_roundtrip(published, monkeypatch):
    import torch

    model, entry, manifest = published
    assert entry["path"] == "fcos_resnet10t_none.tiny.safetensors"
    assert entry["metrics"]["synthetic-val"] == {"AP": 25.0, "APs": 12.5, "AP50": 50.0, "AP_tiny": 10.0,
                                                 "AP_occ_heavy": 1.0, "occluded_recall": 30.0}
    assert entry["num_params"] == sum(p.numel() for p in model.parameters())
    monkeypatch.setenv("VISATTN_OFFLINE", "1")  # shipped files need no network
    loaded = load = weights.load_pretrained("fcos_resnet10t_none.tiny")
    assert not load.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a.half().float(), msg=k)  # fp16 storage, float32 model
        else:
            assert torch.equal(a, b), k
    assert weights.list_pretrained() == ["fcos_resnet10t_none.tiny"]


def test_tampered_shipped_file_is_refused(published):
    _, _, manifest = published
    f = manifest.parent / "fcos_resnet10t_none.tiny.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="do not match the manifest"):
        weights.load_pretrained("fcos_resnet10t_none.tiny")


def test_config_that_does_not_match_the_weights_is_refused(published):
    _, _, manifest = published
    data = json.loads(manifest.read_text())
    data["models"]["fcos_resnet10t_none.tiny"]["config"]["kwargs"]["fpn_channels"] = 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="parameters but the manifest says"):
        weights.load_pretrained("fcos_resnet10t_none.tiny")


# -- the shipped manifest -------------------------------------------------------------------------
SHIPPED = weights.load_manifest(weights.WEIGHTS_DIR / "manifest.json")


def test_readme_table_matches_the_manifest():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = "<!-- weights-table:start -->\n", "<!-- weights-table:end -->"
    assert start in readme and end in readme, "README lost its weights table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == weights.format_table(SHIPPED), "README table differs: paste `visattn weights table`"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_entry_is_verified_and_loads_strictly(name, monkeypatch):
    monkeypatch.delenv("VISATTN_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("VISATTN_OFFLINE", "1")
    entry = SHIPPED[name]
    path = weights.weight_file(name)  # sha256 of the shipped file checked here
    assert path.stat().st_size == entry["file_size"]
    model = weights.load_pretrained(name)  # num_params checked, strict load
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_republishing_the_same_weights_adds_an_evaluation_set(published, tmp_path):
    _, entry, manifest = published
    report = tmp_path / "run" / "report16.json"
    report.write_text(json.dumps({"result": {"AP": 0.5}}))
    again = weights.publish(tmp_path / "run" / "last.ckpt", name="fcos_resnet10t_none.tiny",
                            config=tmp_path / "run" / "config.yaml", report=report, command="pytest", seed=0,
                            metrics_set="val-16", eval_command="validate on 16")
    assert again["sha256"] == entry["sha256"]
    assert again["metrics"] == {**entry["metrics"], "val-16": {"AP": 50.0}}
    assert again["recipe"]["evaluations"] == {"val-16": "validate on 16"}
    assert json.loads(manifest.read_text())["models"]["fcos_resnet10t_none.tiny"] == again


SUBSET = "synthetic-val-16"  # the first 16 images of the synthetic validation split
SUBSET_ARGS = ["--data.init_args.num_train=8", "--data.init_args.num_val=16"]


def _validate_with_weights(name: str, tmp_path, extra: list[str] = ()):
    from pathlib import Path

    from visattn.lit.cli import main

    root = Path(__file__).resolve().parent.parent
    config = root / SHIPPED[name]["recipe"].get("config", "configs/quickstart.yaml")
    return main(["validate", "--config", str(config), "--weights", name, f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.enable_progress_bar=false", *extra])


@pytest.mark.parametrize("name", [n for n in sorted(SHIPPED) if SUBSET in SHIPPED[n]["metrics"]])
def test_shipped_model_reproduces_its_recorded_subset_metrics(name, tmp_path, monkeypatch):
    monkeypatch.delenv("VISATTN_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("VISATTN_OFFLINE", "1")
    cli = _validate_with_weights(name, tmp_path, SUBSET_ARGS)
    got = weights.metrics_from_report(cli.model.last_eval)
    want = SHIPPED[name]["metrics"][SUBSET]
    for key in ("AP", "AP50", "APs", "AP_occ_heavy"):
        assert abs(got[key] - want[key]) <= 0.1, (key, got[key], want[key])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in sorted(SHIPPED) if "synthetic-val" in SHIPPED[n]["metrics"]])
def test_shipped_model_reproduces_its_full_validation_metrics(name, tmp_path, monkeypatch):
    monkeypatch.delenv("VISATTN_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("VISATTN_OFFLINE", "1")
    got = weights.metrics_from_report(_validate_with_weights(name, tmp_path).model.last_eval)
    want = SHIPPED[name]["metrics"]["synthetic-val"]
    for key in ("AP", "AP50", "APs"):
        assert abs(got[key] - want[key]) <= 0.1, (key, got[key], want[key])


@pytest.mark.parametrize("extra, pattern", [
    (["--model.init_args.model.init_args.fpn_channels=128"], r"differs from the published one \(fpn_channels"),
    (["--ckpt_path=/nonexistent.ckpt"], r"either --weights or --ckpt_path|does not exist"),
])
def test_weights_flag_refuses_a_different_model(extra, pattern, tmp_path, monkeypatch):
    if not SHIPPED:
        pytest.skip("no shipped model")
    monkeypatch.delenv("VISATTN_WEIGHTS_MANIFEST", raising=False)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        _validate_with_weights(sorted(SHIPPED)[0], tmp_path, [*SUBSET_ARGS, *extra])


@pytest.mark.parametrize("backbone", ["resnet10t", "torchvision:resnet18"])
def test_imagenet_backbone_that_cannot_be_fetched_says_so(backbone, monkeypatch):
    import timm
    import torchvision

    from visattn.models import build_detector

    def no_network(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("VISATTN_OFFLINE", "1")
    monkeypatch.setattr(timm, "create_model", no_network)
    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(OSError, match=r"ImageNet weights of backbone .*need the network.*Offline mode"):
        build_detector("fcos", backbone=backbone, num_classes=2, fpn_channels=32, pretrained_backbone=True)


def test_hub_source_is_still_checked_against_the_manifest(tmp_path, monkeypatch):
    import sys
    import types

    got = tmp_path / "hub" / "model.safetensors"
    got.parent.mkdir()
    got.write_bytes(PAYLOAD)
    fake = types.ModuleType("huggingface_hub")
    calls = []
    fake.hf_hub_download = lambda repo_id, filename, revision=None: calls.append(repo_id) or str(got)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    manifest = tmp_path / "manifest.json"
    entry = _entry(mirrors=None, hf={"repo_id": "visattn/x", "filename": "model.safetensors"})
    manifest.write_text(json.dumps({"models": {"fcos_r_none.hub": entry}}))
    monkeypatch.setenv("VISATTN_WEIGHTS_MANIFEST", str(manifest))
    path = weights.weight_file("fcos_r_none.hub")
    assert path.read_bytes() == PAYLOAD and path.name == f"{SHA}.safetensors" and calls == ["visattn/x"]
    assert weights.weight_file("fcos_r_none.hub") == path and calls == ["visattn/x"]  # cached: no second call
    path.unlink()
    got.write_bytes(b"other bytes")
    with pytest.raises(ChecksumError, match="hf://visattn/x/model.safetensors"):
        weights.weight_file("fcos_r_none.hub")
    assert not path.exists()


def test_weights_cli(capsys, monkeypatch):
    from visattn.cli import main

    monkeypatch.delenv("VISATTN_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("VISATTN_OFFLINE", "1")
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED)
    assert main(["weights", "table"]) == 0
    assert capsys.readouterr().out == weights.format_table(SHIPPED)
    assert main(["weights", "verify", "--all"]) == 0
    assert capsys.readouterr().out.count(": OK") == len(SHIPPED)
    assert main(["weights", "info", "fcos_resnet10t_eca.synth265"]) == 2
    assert "did you mean fcos_resnet10t_eca.synth256" in capsys.readouterr().err
    assert main(["weights", "verify"]) == 2
    assert "give a NAME or --all" in capsys.readouterr().err
