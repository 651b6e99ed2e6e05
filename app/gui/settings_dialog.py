"""Settings: model (an installed one, or a GGUF file or model folder picked on
disk), device, cache location and precision, answer length, and the theme. Every
field starts at a working default, so the first run needs no visit here.
"""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from app.settings import DEVICES, PRECISIONS, THEMES, AppSettings

DEVICE_LABELS = {"auto": "Automatic", "cpu": "CPU", "cuda": "CUDA (NVIDIA GPU)", "mps": "MPS (Apple GPU, torch)", "mlx": "MLX (Apple Silicon)"}


def installed_model_names() -> list[str]:
    try:
        from engine.install import list_installed

        return [info.name for info in list_installed()]
    except Exception:  # noqa: BLE001 — an unreadable models folder must not block the dialog
        return []


class SettingsDialog(QDialog):
    def __init__(self, settings: AppSettings, parent=None, *, models: list[str] | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Quire Settings")
        self.original = settings
        from engine.runtime import DEFAULT_MODEL

        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.setToolTip("An installed model, a .gguf file or a Hugging Face model folder")
        self.model.addItem(f"{DEFAULT_MODEL} (default)", "")
        for name in models if models is not None else installed_model_names():
            if name != DEFAULT_MODEL:
                self.model.addItem(name, name)
        if settings.model:
            index = self.model.findData(settings.model)
            if index < 0:
                self.model.addItem(settings.model, settings.model)
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
        self.theme = QComboBox()
        for theme in THEMES:
            self.theme.addItem(theme.capitalize(), theme)
        self.theme.setCurrentIndex(THEMES.index(settings.theme))

        form = QFormLayout(self)
        form.addRow("Model", self._row(model_row))
        form.addRow("Device", self.device)
        form.addRow("Cache folder", self._row(cache_row))
        form.addRow("Cache precision", self.precision)
        form.addRow("Answer length", self.max_tokens)
        form.addRow("", self.auto_cache)
        form.addRow("Theme", self.theme)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel | QDialogButtonBox.StandardButton.RestoreDefaults
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults).clicked.connect(self._restore_defaults)
        form.addRow(buttons)

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
        )
