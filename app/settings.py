"""The app's settings: which model and device, who writes the answers (the reader:
the model itself, a second local model, or a server, and its API key), where the
corpus cache lives and in what precision, whether it is built as documents come in,
how long answers may be, and the theme.

Kept as JSON in the data directory (`settings.json`), written atomically, so the
CLI, the GUI and tests share one plain file; window geometry, which is Qt's own
business, stays in QSettings. Unknown keys are ignored and bad values fall back to
the defaults with a logged warning, so a file written by another version never
stops the app from starting. The defaults are the first-run choice: nothing to pick.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from engine.corpus.settings import CacheSettings
from engine.paths import data_dir, write_atomic

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps", "mlx")
PRECISIONS = ("int8", "int4", "fp16")
THEMES = ("system", "light", "dark")


@dataclass(frozen=True)
class AppSettings:
    model: str = ""  # installed model name, .gguf file or model folder; "" = the default model
    # Who writes answers from the chosen passages (engine/reader.py): "" = the model
    # above; a model name, .gguf or folder = a second local model; URL/v1/MODEL = a
    # model on an OpenAI-compatible server (Ollama, vLLM, LM Studio, llama.cpp).
    reader: str = ""
    reader_api_key: str = ""
    device: str = "auto"
    cache_dir: str = ""  # "" = <data dir>/cache
    precision: str = "int8"
    max_answer_tokens: int = 384
    # Build the cache for new documents as soon as they are added. Off: answers read
    # passages as text (engine.corpus.answerer.Answerer.ask), and a cache costs about an
    # hour of prefill per 250K tokens on a 2-core machine.
    auto_cache: bool = False
    theme: str = "system"
    # The languages OCR reads scanned pages in, Tesseract's codes joined by "+"
    # ("eng+deu"); "" = English where its data is installed (ingest/ocr.py).
    ocr_languages: str = ""

    def __post_init__(self) -> None:
        checks = {
            "device": self.device in DEVICES,
            "precision": self.precision in PRECISIONS,
            "theme": self.theme in THEMES,
            "max_answer_tokens": 16 <= self.max_answer_tokens <= 8192,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid setting(s): {', '.join(bad)}")

    @classmethod
    def from_dict(cls, values: dict) -> AppSettings:
        settings = cls()
        for field in fields(cls):
            if field.name not in values:
                continue
            try:
                settings = replace(settings, **{field.name: type(getattr(settings, field.name))(values[field.name])})
            except (TypeError, ValueError) as error:
                log.warning("setting %s=%r ignored: %s", field.name, values[field.name], error)
        return settings

    def model_spec(self) -> str:
        from engine.runtime import DEFAULT_MODEL

        return self.model or DEFAULT_MODEL

    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else data_dir() / "cache"

    def cache_settings(self) -> CacheSettings:
        return CacheSettings(precision=self.precision)


def apply_ocr_languages(settings: AppSettings, *, override: bool = True) -> None:
    """Hand the OCR languages to ingest (which never imports app) through its
    environment variable; `override` False keeps one a person set in the shell."""
    import os

    from ingest.ocr import LANGUAGES_ENV

    if not override and os.environ.get(LANGUAGES_ENV):
        return
    if settings.ocr_languages.strip():
        os.environ[LANGUAGES_ENV] = settings.ocr_languages.strip()
    else:
        os.environ.pop(LANGUAGES_ENV, None)


def settings_path() -> Path:
    return data_dir() / "settings.json"


def load_settings(path: Path | None = None) -> AppSettings:
    path = path or settings_path()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return AppSettings()
    except (OSError, ValueError) as error:
        log.warning("%s unreadable (%s): using the defaults", path, error)
        return AppSettings()
    return AppSettings.from_dict(values if isinstance(values, dict) else {})


def save_settings(settings: AppSettings, path: Path | None = None) -> None:
    path = path or settings_path()
    text = json.dumps(asdict(settings), indent=2)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
