"""The "Train model" dock widget: pick a folder or image layers per condition, train in a worker.

The loss streams into a plot in the dock, progress shows in napari's activity panel, Stop
saves the model (the trainer saves on interruption), and the finished model can be opened
in the Translate widget with one click. The same `Trainer` runs `phenotwin train`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    Select,
    SpinBox,
)
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from phenotwin._napari.layout import PLOT_MIN_HEIGHT, ScrollableDock, explain, help_button
from phenotwin._napari.workers import DockProgress, resolve_diffusers, start_worker
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari


class LossPlot:
    """A small matplotlib canvas (Qt backend) showing the training loss as it arrives."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.2), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(PLOT_MIN_HEIGHT)  # readable when docks share the window
        self.axes = self.figure.add_subplot(111)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.clear()

    def clear(self) -> None:
        self.steps.clear()
        self.losses.clear()
        self.axes.clear()
        self.axes.set_xlabel("step", fontsize=8)
        self.axes.set_ylabel("loss", fontsize=8)
        self.axes.tick_params(labelsize=7)
        (self.line,) = self.axes.plot([], [], lw=0.8, color="tab:blue")
        (self.smooth,) = self.axes.plot([], [], lw=1.5, color="tab:orange")
        self.canvas.draw_idle()

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if len(self.steps) % 5 and len(self.steps) > 5:
            return  # redraw every few steps: drawing costs more than a CPU training step's GUI budget
        self.line.set_data(self.steps, self.losses)
        window = max(1, len(self.losses) // 20)
        smooth = np.convolve(self.losses, np.ones(window) / window, mode="valid")
        self.smooth.set_data(self.steps[window - 1 :], smooth)
        self.axes.relim()
        self.axes.autoscale_view()
        self.axes.set_yscale("log" if min(self.losses) > 0 else "linear")
        self.canvas.draw_idle()


TOOLTIPS = {
    "data_source": "Train from a folder with one subfolder of images per condition, or from image layers.",
    "add_condition": "Add a condition and pick the image layers that show it.",
    "method": "scratch: a new model; full, lora, svdiff: fine-tune the base model (all weights, LoRA adapters "
              "or spectral shifts; 100 images per condition can be enough).",
    "size": "Training crop size in pixels (the model's image size).",
    "steps": "Training steps; the model is saved along the way and at the end.",
    "output": "Where the new model is saved (a new folder, or one phenotwin wrote before).",
    "train_button": "Start training in the background; the loss is plotted as it comes.",
    "stop_button": "Stop at the next step and save the model trained so far.",
    "open_button": "Load the trained model in the Translate widget.",
}


class TrainWidget(ScrollableDock, Container):
    """Dock widget: data (folder or layers), method, steps, Train / Stop, live loss, open in Translate."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True, scrollable=True)  # scrolls inside its dock
        self.viewer = napari_viewer
        self.data_source = ComboBox(label="Data from", choices=["folder", "image layers"], value="folder")
        self.data_folder = FileEdit(mode="d", label="Data folder",
                                    tooltip="A folder with one subfolder of images per condition")
        self.layer_groups = Container(labels=True, label="Conditions", visible=False)
        self.add_condition = PushButton(text="Add condition", visible=False)
        self.method = ComboBox(label="Method", choices=["scratch", "full", "lora", "svdiff"], value="scratch")
        self.base = FileEdit(mode="d", label="Base model", visible=False,
                             tooltip="phenotwin checkpoint or Stable-Diffusion diffusers folder to fine-tune")
        self.size = SpinBox(label="Image size", min=16, max=1024, step=8, value=64)
        self.steps = SpinBox(label="Steps", min=1, max=1_000_000, value=2000)
        self.output = FileEdit(mode="d", label="Save model to")
        self.train_button = PushButton(text="Train")
        self.stop_button = PushButton(text="Stop (saves)", enabled=False)
        self.status = Label(value="")
        self.open_button = PushButton(text="Open in Translate widget", enabled=False)
        self.plot = LossPlot()
        self.help = help_button("Train a model on your own images", "Train or fine-tune a model on your images.")
        self.extend([self.help, self.data_source, self.data_folder, self.layer_groups, self.add_condition, self.method,
                     self.base, self.size, self.steps, self.output, self.train_button, self.stop_button,
                     self.status, self.open_button])
        explain(self, TOOLTIPS)
        self.add_native(self.plot.canvas)
        self.status.native.setWordWrap(True)
        self._worker = None
        self._trainer = None
        self._dock = DockProgress(self.status)  # status line and activity bar
        self.trained: Path | None = None
        self._closed = False  # set when Qt destroys the widget; late worker results are then dropped

        self.data_source.changed.connect(self._on_data_source)
        self.method.changed.connect(lambda value: setattr(self.base, "visible", value != "scratch"))
        self.add_condition.changed.connect(lambda: self._add_condition_row())
        self.train_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.open_button.changed.connect(self.open_in_translate)
        self.native.destroyed.connect(self._on_destroyed)
        self._add_condition_row("control")
        self._add_condition_row("treated")

    # -- data from layers ---------------------------------------------------------------------

    def _image_layers(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _add_condition_row(self, name: str = "") -> None:
        row = Container(layout="horizontal", labels=False)
        row.append(LineEdit(value=name or f"condition {len(self.layer_groups) + 1}",
                            tooltip="The condition's name, as the model will know it."))
        row.append(Select(choices=self._image_layers, tooltip="The image layers of this condition (several: "
                                                              "click with Ctrl or Shift)."))
        self.layer_groups.append(row)

    def _on_data_source(self, value: str) -> None:
        from_layers = value == "image layers"
        self.data_folder.visible = not from_layers
        self.layer_groups.visible = from_layers
        self.add_condition.visible = from_layers
        self.layer_groups.reset_choices()

    def _layers_to_folder(self) -> Path:
        """Write the chosen layers as TIFFs, one subfolder per condition (the trainer's input)."""
        import tifffile

        root = Path(tempfile.mkdtemp(prefix="phenotwin-layers-"))
        for row in self.layer_groups:
            name, select = row[0].value.strip(), row[1]
            if not name:
                raise PhenotwinError("every condition needs a name.")
            folder = root / name
            folder.mkdir()
            for i, layer in enumerate(select.value):
                tifffile.imwrite(folder / f"{i:04d}.tif", np.asarray(layer.data))
        return root

    # -- training ------------------------------------------------------------------------------

    def start(self, *_):
        from phenotwin.train.trainer import TrainConfig, Trainer

        if self._worker is not None:
            return
        try:
            data = self._layers_to_folder() if self.data_source.value == "image layers" else Path(self.data_folder.value)
            if not str(self.output.value) or str(self.output.value) == ".":
                raise PhenotwinError("choose a folder to save the model to.")
            config = TrainConfig(
                data=str(data), out=str(self.output.value), method=self.method.value,
                base=str(self.base.value) if self.method.value != "scratch" else None,
                size=self.size.value, steps=self.steps.value, checkpoint_every=max(1, min(500, self.steps.value)),
                command=f"napari Train model widget ({self.method.value})",
            )
            resolve_diffusers()  # builds models here, perhaps while a Translate widget loads one
            trainer = Trainer(config)
        except (PhenotwinError, ValueError) as err:
            show_error(f"Cannot train: {err}")
            return
        self._trainer = trainer
        self.plot.clear()
        self._steps = trainer.steps()
        self.train_button.enabled = False
        self.stop_button.enabled = True
        self.status.value = f"Training {config.method} on {', '.join(trainer.data.classes)}..."
        self._worker = start_worker(self._steps, yielded=self._on_step, returned=self._on_done, errored=self._on_error,
                                    aborted=self._on_stopped, finished=self._on_finished)
        self._dock.activity.show("phenotwin: training", trainer.step, config.steps)  # from the first moment, and last

    def _on_step(self, event) -> None:
        if self._closed:
            return
        if event.stage != "training":  # after the last step: calibration on the held-out images
            self._dock.show(f"{event.stage.capitalize()} {event.step}/{event.total}", event.stage, event.step,
                            event.total, force=event.step == event.total)
            return
        self.plot.add(event.step, event.loss)
        text = f"Step {event.step}/{event.total}, loss {event.loss:.4f}" + (" (saved)" if event.saved else "")
        self._dock.show(text, "training", event.step, event.total, force=event.saved or event.step == event.total)

    def stop(self, *_):
        """Stop at the next step; the trainer saves the model and its state first."""
        if self._worker is not None:
            self._dock.say("Stopping and saving...")
            self._worker.quit()

    def _on_done(self, path) -> None:
        if self._closed:
            return
        self.trained = Path(path)
        notes = self._trainer.calibration.notes if self._trainer and self._trainer.calibration else []
        self._dock.say(" ".join([f"Done: saved {path}.", *notes]))
        self.open_button.enabled = True

    def _on_stopped(self) -> None:
        """The worker stopped iterating; closing the step generator makes the trainer save (off the GUI thread).
        This runs even when napari is closing: the model is saved, only the widgets are left alone."""
        trainer = self._trainer
        self._saver = start_worker(self._steps.close, errored=self._on_error,
                                   finished=lambda: self._on_saved_after_stop(trainer))

    def _on_saved_after_stop(self, trainer) -> None:
        if self._closed:
            return
        self.train_button.enabled = True
        if trainer.step > 0:
            self.trained = Path(trainer.out)
            self._dock.say(f"Stopped at step {trainer.step}; saved {self.trained} (continue with phenotwin train --resume).")
            self.open_button.enabled = True

    def _on_destroyed(self, *_):
        """napari is closing: stop training; the widgets are already gone, so touch none."""
        self._closed = self._dock.closed = True
        if self._worker is not None:
            self._worker.quit()

    def _on_error(self, err: Exception) -> None:
        if self._closed:
            return
        self._dock.say("Training failed.")
        show_error(f"Training failed: {err}")

    def _on_finished(self) -> None:
        self._dock.close()  # first, even when closed, so no bar stays in the dock
        if self._closed:
            return
        self._worker = None
        self.train_button.enabled = not self.status.value.startswith("Stopping")
        self.stop_button.enabled = False

    def open_in_translate(self, *_):
        """Load the trained model into the Translate widget (docking one if needed)."""
        if self.trained is None:
            return
        from phenotwin._napari.model_registry import forget_translator, translate_widget_of

        forget_translator(self.trained)  # the folder may hold a newer model than a cached one
        widget = translate_widget_of(self.viewer)
        if widget is None:
            _, widget = self.viewer.window.add_plugin_dock_widget("napari-phenotwin", "Translate cells")
        widget.model_path.value = str(self.trained)
        widget.load_model(str(self.trained))
        show_info(f"Loaded {self.trained.name} in the Translate widget.")
