"""The "Train model" dock widget: pick a folder or image layers per condition, train in a worker.

The loss streams into a plot in the dock, progress shows in napari's activity panel, Stop
saves the model (the trainer saves on interruption), and the finished model can be opened
in the Translate widget with one click. The same `Trainer` runs `phenotwin train`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    Select,
    SpinBox,
)
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from phenotwin._napari import training_layers
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
    "reconstruction_target": "0: off. Otherwise the calibration at the end of training looks for default settings "
                             "that reconstruct your held-out cells at least this well (e.g. 38 dB), with more steps "
                             "or a refinement when needed: a sharper trust verdict, and slower translations (1.9 times "
                             "the model calls on the demo model at 38 dB).",
    "channels": "The channels of the model, in order (e.g. nucleus, golgi): each condition's layer whose name holds "
                "a channel's name feeds that channel, and layers named alike but for the channel make one image. "
                "Guessed from the layer names; empty: every layer is a one-channel image.",
    "output": "Where the new model is saved (a new folder, or one phenotwin wrote before).",
    "existing": "What to do when Save model to already holds a model or a stopped run: stop and say so, continue "
                "its training (the same settings), or replace it (only files phenotwin wrote are replaced).",
    "train_button": "Start training in the background; the loss is plotted as it comes.",
    "stop_button": "Stop at the next step and save the model trained so far.",
    "open_button": "Load the trained model in the Translate widget.",
}


EXISTING_LABEL = "If the folder has a model"
STOP, CONTINUE, REPLACE = "stop and say so", "continue its training", "replace it"
OPEN_TEXT = "Open in Translate widget"
OPEN_WHILE_TRAINING, OPEN_NOTHING = "when training has finished", "no model trained yet"
# The trainer's errors name `phenotwin train`'s flags; the dock names its own controls instead.
CONTROLS = {"--data": "Data folder", "--out": "Save model to", "--method": "Method", "--base": "Base model",
            "--size": "Image size", "--steps": "Steps", "--channel-names": "Channels",
            "--reconstruction-target": "Reconstruction target (dB)"}


def in_widget_words(err: Exception) -> str:
    """The error in the dock's words: its controls' names, never a command-line flag it has not got."""
    from phenotwin.train.config import OutputFolderInUse

    if isinstance(err, OutputFolderInUse):
        return err.describe(resume=f"set {EXISTING_LABEL} to {CONTINUE!r}",
                            overwrite=f"set {EXISTING_LABEL} to {REPLACE!r}")
    text = str(err)
    text = re.sub(r"[Ss]tart without --resume", f"Set {EXISTING_LABEL} to {STOP!r} to start a new run", text)
    text = re.sub(r"(?:pass |give )?--resume\b", f"{EXISTING_LABEL}: {CONTINUE!r}", text)
    text = re.sub(r"(?:pass |give )?--overwrite\b", f"{EXISTING_LABEL}: {REPLACE!r}", text)
    for flag, control in CONTROLS.items():
        text = re.sub(rf"{flag}\b", control, text)
    return re.sub(r"--([a-z][a-z-]*)", r"the command line's --\1 (phenotwin train; not a setting of this dock)", text)


def describe_trainer(trainer) -> str:
    """What the trainer got, before it trains: channels, conditions, images (and those held out)."""
    data, held = trainer.data, trainer.validation
    names = trainer.channel_names or []
    channels = f"{data.channels}-channel images" + (f" ({', '.join(names)})" if names else "")
    held_counts = held.counts() if held is not None else {}
    counts = ", ".join(f"{name} {n} image{'s' * (n != 1)}" + (f" (+{held_counts[name]} held out)"
                                                                if held_counts.get(name) else "")
                       for name, n in data.counts().items())
    return f"{channels}: {counts}."


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
        self.channels = LineEdit(label="Channels", value="", visible=False)
        self.built = Label(value="", visible=False)  # what the layers make: channels, conditions, image count
        self.method = ComboBox(label="Method", choices=["scratch", "full", "lora", "svdiff"], value="scratch")
        self.base = FileEdit(mode="d", label="Base model", visible=False,
                             tooltip="phenotwin checkpoint or Stable-Diffusion diffusers folder to fine-tune")
        self.size = SpinBox(label="Image size", min=16, max=1024, step=8, value=64)
        self.steps = SpinBox(label="Steps", min=1, max=1_000_000, value=2000)
        self.reconstruction_target = FloatSpinBox(label="Reconstruction target (dB)", min=0, max=99, step=1, value=0)
        self.output = FileEdit(mode="d", label="Save model to")
        self.existing = ComboBox(label=EXISTING_LABEL, choices=[STOP, CONTINUE, REPLACE], value=STOP)
        self.train_button = PushButton(text="Train")
        self.stop_button = PushButton(text="Stop (saves)", enabled=False)
        self.status = Label(value="")
        self.open_button = PushButton(text=OPEN_TEXT, enabled=False)
        self.plot = LossPlot()
        self.help = help_button("Train a model on your own images", "Train or fine-tune a model on your images.")
        self.extend([self.help, self.data_source, self.data_folder, self.layer_groups, self.add_condition,
                     self.channels, self.built, self.method, self.base, self.size, self.steps,
                     self.reconstruction_target, self.output,
                     self.existing, self.train_button, self.stop_button, self.status, self.open_button])
        explain(self, TOOLTIPS)
        self.add_native(self.plot.canvas)
        for label in (self.status, self.built):
            label.native.setWordWrap(True)
        self._guessed_channels = ""  # the Channels box follows the layers until the user edits it
        self._named_by_user: set[int] = set()  # condition rows whose name the user typed (ids)
        self._naming = False  # the widget, not the user, is writing a row's name
        self._data_folder: Path | None = None  # the layers written for the trainer, removed when it ends
        self._worker = None
        self._trainer = None
        self._dock = DockProgress(self.status)  # status line and activity bar
        self.trained: Path | None = None
        self._closed = False  # set when Qt destroys the widget; late worker results are then dropped

        self.data_source.changed.connect(self._on_data_source)
        self.method.changed.connect(lambda value: setattr(self.base, "visible", value != "scratch"))
        self.add_condition.changed.connect(lambda: self._add_condition_row())
        self.channels.changed.connect(lambda *_: self._describe_layers())
        self.train_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.open_button.changed.connect(self.open_in_translate)
        self.native.destroyed.connect(self._on_destroyed)
        self._add_condition_row("control")
        self._add_condition_row("treated")
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)

    # -- data from layers ---------------------------------------------------------------------

    def _image_layers(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _add_condition_row(self, name: str = "") -> None:
        """A condition: its name (the whole dock's width: 'nocodazole' must read whole) over its layers."""
        row = Container(layout="vertical", labels=False)
        box = LineEdit(value=name or f"condition {len(self.layer_groups) + 1}",
                       tooltip="The condition's name, as the model will know it (filled in from the layers' "
                               "metadata when they say).")
        box.native.setMinimumWidth(box.native.fontMetrics().horizontalAdvance("nocodazole treated") + 24)
        row.append(box)
        row.append(Select(choices=self._image_layers, tooltip="The image layers of this condition (several: "
                                                              "click with Ctrl or Shift)."))
        box.changed.connect(lambda *_, r=row: self._on_name_edited(r))
        row[1].changed.connect(lambda *_, r=row: self._on_layers_chosen(r))
        self.layer_groups.append(row)

    def _on_name_edited(self, row) -> None:
        if not self._naming:
            self._named_by_user.add(id(row))
        self._describe_layers()

    def _on_layers_chosen(self, row) -> None:
        """The layers' own condition (metadata) names the row, unless the user named it."""
        said = {training_layers.layer_condition(layer) for layer in row[1].value}
        if len(said) == 1 and None not in said and id(row) not in self._named_by_user:
            self._naming = True
            row[0].value = said.pop()
            self._naming = False
        self._describe_layers()

    def _on_data_source(self, value: str) -> None:
        from_layers = value == "image layers"
        self.data_folder.visible = not from_layers
        for widget in (self.layer_groups, self.add_condition, self.channels, self.built):
            widget.visible = from_layers
        self.layer_groups.reset_choices()
        self._describe_layers()

    def _refresh_layers(self, *_) -> None:
        if self._closed:
            return
        self.layer_groups.reset_choices()
        self._describe_layers()

    def _layer_groups(self) -> dict[str, list]:
        groups = {}
        for row in self.layer_groups:
            name = row[0].value.strip()
            if not name:
                raise PhenotwinError("every condition needs a name: type one in its box above its layers.")
            if name in groups:
                raise PhenotwinError(f"two conditions are named {name!r}: give each its own name.")
            groups[name] = list(row[1].value)
        return groups

    def _describe_layers(self) -> None:
        """Guess the channels from the layer names and say what training would get (before Train)."""
        if self.data_source.value != "image layers":
            return
        try:
            groups = self._layer_groups()
            if self.channels.value == self._guessed_channels:  # not edited by the user: follow the layers
                guessed = ", ".join(training_layers.guess_channels(groups))
                self._guessed_channels = guessed
                if guessed != self.channels.value:
                    self.channels.value = guessed  # emits again, and describes
                    return
            built = training_layers.build(groups, training_layers.parse_channels(self.channels.value), copy=False)
            self.built.value = f"Training data: {built.summary()}"
        except PhenotwinError as err:
            self.built.value = f"Not ready to train: {err}"

    def _layers_to_folder(self) -> tuple[Path, training_layers.BuiltData]:
        """Write the chosen layers as TIFFs, one subfolder per condition (the trainer's input)."""
        built = training_layers.build(self._layer_groups(), training_layers.parse_channels(self.channels.value))
        self._remove_data_folder()  # a run that failed to start may have left one
        self._data_folder = built.write(Path(tempfile.mkdtemp(prefix="phenotwin-layers-")))
        return self._data_folder, built

    # -- training ------------------------------------------------------------------------------

    def start(self, *_):
        from phenotwin.train.trainer import TrainConfig, Trainer

        if self._worker is not None:
            return
        self._set_open(False, OPEN_WHILE_TRAINING)  # the model in the folder is about to change
        try:
            if not str(self.output.value) or str(self.output.value) == ".":
                raise PhenotwinError("choose a folder to save the model to (Save model to).")
            from_layers = self.data_source.value == "image layers"
            data, built = self._layers_to_folder() if from_layers else (Path(self.data_folder.value), None)
            config = TrainConfig(
                data=str(data), out=str(self.output.value), method=self.method.value,
                base=str(self.base.value) if self.method.value != "scratch" else None,
                size=self.size.value, steps=self.steps.value, checkpoint_every=max(1, min(500, self.steps.value)),
                channel_names=(built.channels or None) if built else None,
                channel_axis=0 if built and built.channel_count > 1 else None,  # written channels first
                reconstruction_target=self.reconstruction_target.value or None,  # 0: off
                resume=self.existing.value == CONTINUE, overwrite=self.existing.value == REPLACE,
                command=f"napari Train model widget ({self.method.value})",
            )
            resolve_diffusers()  # builds models here, perhaps while a Translate widget loads one
            trainer = Trainer(config)
        except (PhenotwinError, ValueError) as err:
            self._remove_data_folder()
            self._set_open(self.trained is not None, OPEN_NOTHING)  # nothing was written: the last model stands
            show_error(f"Cannot train: {in_widget_words(err)}")
            return
        self._trainer, self.trained = trainer, None  # the last model is no longer the one to open
        self.plot.clear()
        self._steps = trainer.steps()
        self.train_button.enabled = False
        self.stop_button.enabled = True
        self.built.value, self.built.visible = f"Training data: {describe_trainer(trainer)}", True
        self.status.value = f"Training {config.method}..."
        self._worker = start_worker(self._steps, yielded=self._on_step, returned=self._on_done, errored=self._on_error,
                                    aborted=self._on_stopped, finished=self._on_finished)
        self._dock.activity.show("phenotwin: training", trainer.step, config.steps)  # from the first moment, and last

    def _set_open(self, enabled: bool, reason: str = "") -> None:
        """Open in Translate only for a finished model; while disabled, the button says why."""
        self.open_button.enabled = enabled
        self.open_button.text = OPEN_TEXT if enabled or not reason else f"{OPEN_TEXT} ({reason})"
        self.open_button.tooltip = TOOLTIPS["open_button"] + ("" if enabled or not reason else f" Not now: {reason}.")

    def _remove_data_folder(self) -> None:
        """The layers' TIFFs were the trainer's input only (it holds the images in memory)."""
        if self._data_folder is not None:
            shutil.rmtree(self._data_folder, ignore_errors=True)
            self._data_folder = None

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
        self._remove_data_folder()
        if self._closed:
            return
        self.trained = Path(path)
        notes = self._trainer.calibration.notes if self._trainer and self._trainer.calibration else []
        self._dock.say(" ".join([f"Done: saved {path}.", *notes]))
        self._set_open(True)

    def _on_stopped(self) -> None:
        """The worker stopped iterating; closing the step generator makes the trainer save (off the GUI thread).
        This runs even when napari is closing: the model is saved, only the widgets are left alone."""
        trainer = self._trainer
        self._saver = start_worker(self._steps.close, errored=self._on_error,
                                   finished=lambda: self._on_saved_after_stop(trainer))

    def _on_saved_after_stop(self, trainer) -> None:
        self._remove_data_folder()  # the stopped trainer has saved: its input is no longer read
        if self._closed:
            return
        self.train_button.enabled = True
        if trainer.step > 0:
            self.trained = Path(trainer.out)
            self._dock.say(f"Stopped at step {trainer.step}; saved {self.trained}. To continue it, set "
                           f"{EXISTING_LABEL} to {CONTINUE!r} and press Train.")
            self._set_open(True)

    def _on_destroyed(self, *_):
        """napari is closing: stop training; the widgets are already gone, so touch none."""
        self._closed = self._dock.closed = True
        if self._worker is not None:
            self._worker.quit()

    def _on_error(self, err: Exception) -> None:
        self._remove_data_folder()
        if self._closed:
            return
        self._dock.say("Training failed.")
        self._set_open(False, OPEN_NOTHING)
        show_error(f"Training failed: {in_widget_words(err)}")

    def _on_finished(self) -> None:
        self._dock.close()  # first, even when closed, so no bar stays in the dock
        if self._closed:
            return
        self._worker = None
        self.train_button.enabled = not self.status.value.startswith("Stopping")
        self.stop_button.enabled = False

    def open_in_translate(self, *_):
        """Load the trained model into the Translate widget (docking one if needed)."""
        if self.trained is None or self._worker is not None:
            return  # never a model that is still training
        from phenotwin._napari.model_registry import forget_translator, remember_model, translate_widget_of

        forget_translator(self.trained)  # the folder may hold a newer model than a cached one
        remember_model(self.trained)  # the folder may hold a newer model than a cached one
        widget = translate_widget_of(self.viewer)
        if widget is None:
            _, widget = self.viewer.window.add_plugin_dock_widget("napari-phenotwin", "Translate cells")
        widget.model_path.value = str(self.trained)
        widget.load_model(str(self.trained))
        show_info(f"Loaded {self.trained.name} in the Translate widget.")
