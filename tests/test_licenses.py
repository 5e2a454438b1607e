"""Licences: visattn is Apache-2.0 (the LICENSE file says so in full), and the default install
(pyproject's ``dependencies`` and everything they require, extras left out) holds no GPL or AGPL
code: every installed distribution of that closure declares a licence from an allow-list, or is
listed in ``REVIEWED`` with the reason it is acceptable."""
from __future__ import annotations

import functools
import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
#: Licence words that are fine in the default install of an Apache-2.0 library.
ALLOWED = re.compile(r"MIT|BSD|Apache|PSF|Python Software Foundation|ISC|MPL|Mozilla|Zlib|CMU|HPND|CC0|BSL-1\.0|"
                     r"LicenseRef-NVIDIA|NVIDIA Proprietary|Other/Proprietary", re.IGNORECASE)
#: GPL and AGPL (copyleft over the whole program); LGPL is not matched (``\bGPL`` needs a word start).
FORBIDDEN = re.compile(r"\bA?GPL\b|GNU (Affero )?General Public", re.IGNORECASE)
#: Distributions whose metadata names no licence, checked by hand.
REVIEWED = {
    "faster-coco-eval": "Apache-2.0: its wheel's LICENSE file, no metadata field",
    "cuda-toolkit": "NVIDIA's CUDA runtime meta-package, pulled in by torch's CUDA build (NVIDIA EULA, redistributable)",
}


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


@functools.cache
def default_install() -> dict[str, metadata.PackageMetadata]:
    """Installed distributions of the default install's closure, by normalised name."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [Requirement(d) for d in deps], {}
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            md = metadata.metadata(req.name)
        except metadata.PackageNotFoundError:
            continue  # not for this platform / Python
        seen[name] = md
        todo += [Requirement(r) for r in md.get_all("Requires-Dist") or []]
    return seen


def licence_text(name: str, md) -> str:
    """What a distribution says of its licence: SPDX expression, classifiers, the License field and
    the first lines of its licence files."""
    parts = [md.get("License-Expression") or "", md.get("License") or ""]
    parts += [c for c in md.get_all("Classifier") or [] if c.startswith("License ::")]
    dist = metadata.distribution(name)
    for f in dist.files or []:
        if "licen" in f.name.lower() or "copying" in f.name.lower():
            try:
                parts.append("\n".join(f.read_text().splitlines()[:5]))
            except (OSError, UnicodeDecodeError):
                pass
    return "\n".join(parts)


def test_the_project_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "Apache-2.0" in str(project["license"])


@pytest.mark.parametrize("name", sorted(default_install()))
def test_default_install_has_no_gpl(name):
    md = default_install()[name]
    text = licence_text(name, md)
    declared = " ".join([md.get("License-Expression") or "", (md.get("License") or "").split("\n")[0],
                         *(c for c in md.get_all("Classifier") or [] if c.startswith("License ::"))])
    assert not FORBIDDEN.search(declared), f"{name} declares a GPL/AGPL licence: {declared[:200]!r}"
    if name in REVIEWED:
        return
    assert ALLOWED.search(text), (f"{name}: no licence from the allow-list in its metadata ({text[:200]!r}); check it "
                                  "by hand and add it to REVIEWED with the reason, or drop the dependency")


@pytest.mark.parametrize("declared, forbidden", [
    ("GPL-3.0-only", True), ("AGPL-3.0-or-later", True), ("License :: OSI Approved :: GNU General Public License v3", True),
    ("GNU Affero General Public License", True), ("LGPL-2.1-or-later", False),
    ("License :: OSI Approved :: GNU Lesser General Public License v3", False), ("MIT", False),
])
def test_the_gpl_rule_itself(declared, forbidden):
    assert bool(FORBIDDEN.search(declared)) == forbidden
