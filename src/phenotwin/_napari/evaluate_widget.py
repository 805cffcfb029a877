"""The "Evaluate model" dock widget: the checks of `phenotwin evaluate`, run in a worker.

The same core generators (`phenotwin.evaluate`) as the command line run in a napari worker
with a progress bar and Cancel; the plots are drawn into the dock with the functions the
report files use, the key numbers appear as plain-language sentences, and "Write report"
saves the same files as the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info

from phenotwin._napari.layout import PLOT_MIN_HEIGHT, ScrollableDock, explain, help_button
from phenotwin._napari.workers import DockProgress, DockRun
from phenotwin.errors import PhenotwinError

if TYPE_CHECKING:
    import napari


def _path(edit: FileEdit) -> Path | None:
    """The chosen path, or None when the field was left empty."""
    value = str(edit.value)
    return None if value in ("", ".") else Path(value)


TOOLTIPS = {
    "check": "translation: does the model change the condition and keep the cell? memorization: does it copy "
             "its training images?",
    "n": "How many held-out images to translate in each direction.",
    "steps": "DDIM steps for inversion and generation.",
    "strength": "How far to invert (1 = all the way to noise).",
    "model_a": "A model trained on one half of the data.",
    "train_a": "The images model A was trained on.",
    "count": "How many images to generate per condition.",
    "run_button": "Run the check in the background.",
    "cancel_button": "Stop the check at its next step.",
    "report_folder": "Where to write the report (figures, numbers, verdicts).",
    "report_button": "Write the report of the last check.",
}


class EvaluateWidget(ScrollableDock, Container):
    """Dock widget: translation check or memorisation check, plots and verdicts, Write report."""

    def __init__(self, napari_viewer: napari.Viewer):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__(labels=True, scrollable=True)  # scrolls inside its dock
        self.viewer = napari_viewer
        self.check = ComboBox(label="Check", choices=lambda _: ["translation", "memorization"], value="translation")
        # translation
        self.model = FileEdit(mode="d", label="Model", tooltip="the checkpoint folder to evaluate")
        self.data = FileEdit(mode="d", label="Held-out images",
                             tooltip="DIR/<condition>/*.tif of images the model was NOT trained on")
        self.n = SpinBox(label="Images per direction", min=1, max=10_000, value=8)
        self.steps = SpinBox(label="DDIM steps", min=1, max=1000, value=50)
        self.strength = FloatSpinBox(label="Strength", min=0.05, max=1.0, step=0.05, value=0.5)
        # memorisation
        self.model_a = FileEdit(mode="d", label="Model A", visible=False)
        self.model_b = FileEdit(mode="d", label="Model B", visible=False, tooltip="trained on a disjoint half of the data")
        self.train_a = FileEdit(mode="d", label="Model A's training images", visible=False)
        self.held_out = FileEdit(mode="d", label="Held-out images (optional)", visible=False,
                                 tooltip="real images model A never saw: the baseline for 'close to a training image'")
        self.count = SpinBox(label="Images per condition", min=1, max=10_000, value=16, visible=False)

        self.run_button = PushButton(text="Evaluate")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.verdicts = Label(value="")
        self.report_folder = FileEdit(mode="d", label="Report folder")
        self.report_button = PushButton(text="Write report", enabled=False)
        self.help = help_button("Check a model before trusting it", "Measure a model before trusting it.")
        self.extend([self.help, self.check, self.model, self.data, self.n, self.steps, self.strength, self.model_a, self.model_b,
                     self.train_a, self.held_out, self.count, self.run_button, self.cancel_button, self.status,
                     self.verdicts, self.report_folder, self.report_button])
        explain(self, TOOLTIPS)
        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(PLOT_MIN_HEIGHT)  # readable when docks share the window
        self.add_native(self.canvas)
        for label in (self.status, self.verdicts):
            label.native.setWordWrap(True)

        self.result: dict | None = None
        self._run = DockRun(DockProgress(self.status), self.run_button, self.cancel_button, "Evaluation failed",
                            notify=lambda text: show_error(text), returned=self._on_done, yielded=self._on_progress)
        self._dock = self._run.dock  # progress lines and the activity bar
        self._stage = None
        self.check.changed.connect(self._on_check)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self._run.cancel)
        self.report_button.changed.connect(self.write_report)
        self.native.destroyed.connect(self._on_destroyed)

    def _on_check(self, value: str) -> None:
        translation = value == "translation"
        for widget in (self.model, self.data, self.n, self.strength):
            widget.visible = translation
        for widget in (self.model_a, self.model_b, self.train_a, self.held_out, self.count):
            widget.visible = not translation

    # -- running -----------------------------------------------------------------------------

    def _job(self):
        """The core generator for the chosen check, with the settings in the dock."""
        if self.check.value == "translation":
            from phenotwin.evaluate.translation import evaluate_folder_steps

            if _path(self.model) is None or _path(self.data) is None:
                raise PhenotwinError("choose the model and a folder of held-out images (one subfolder per condition).")
            return evaluate_folder_steps(_path(self.model), _path(self.data), n=self.n.value, steps=self.steps.value,
                                         strengths=[self.strength.value])
        from phenotwin.evaluate.memorization import memorization_steps

        if None in (_path(self.model_a), _path(self.model_b), _path(self.train_a)):
            raise PhenotwinError("choose models A and B (trained on disjoint halves of the data) and model A's training "
                                 "images; to train both from one folder use `phenotwin evaluate memorization --data`.")
        return memorization_steps(_path(self.model_a), _path(self.model_b), _path(self.train_a), _path(self.held_out),
                                  count=self.count.value, steps=self.steps.value)

    _worker = property(lambda self: self._run.worker)  # None when nothing runs

    def start(self, *_) -> None:
        if self._run.start(self._job, "Cannot evaluate", f"Evaluating ({self.check.value})..."):
            self._stage = None  # (its first step arrives after this returns: it is queued to this thread)
            self.report_button.enabled = False

    def cancel(self, *_) -> None:
        """Stop at the next diffusion step."""
        self._run.cancel()

    def _on_progress(self, event) -> None:
        new_stage = event.stage != self._stage
        self._stage = event.stage
        self._dock.show(f"{event.stage}: {event.step}/{event.total}", event.stage, event.step, event.total,
                        force=new_stage or event.step == event.total)

    def _on_done(self, result: dict) -> None:
        from phenotwin.evaluate.report import draw_memorization, draw_translation_metrics, translation_verdicts

        self.result = result
        self.figure.clear()
        if result["kind"] == "translation":
            draw_translation_metrics(self.figure, result)
            lines = [f"Classifier accuracy {result['classifier']['held_out_accuracy']:.0%}."] + translation_verdicts(result)
        else:
            draw_memorization(self.figure, result)
            lines = [f"Verdict: the model {result['verdict']}.", result["reason"] + "."]
        self.canvas.draw_idle()
        self.verdicts.value = "\n".join(lines)
        self._dock.say("Done.")
        self.report_button.enabled = True

    def _on_destroyed(self, *_) -> None:
        """napari is closing: stop the run; the widgets are already gone, so touch none."""
        self._run.close()

    # -- report ------------------------------------------------------------------------------

    def write_report(self, *_) -> None:
        """Write the same files as `phenotwin evaluate` to the report folder."""
        from phenotwin.evaluate.report import write_memorization, write_translation_report

        folder = _path(self.report_folder)
        if self.result is None or folder is None:
            show_error("Evaluate first, and choose a report folder.")
            return
        writer = write_translation_report if self.result["kind"] == "translation" else write_memorization
        files = writer(self.result, folder)
        show_info(f"Wrote {', '.join(p.name for p in files.values())} to {folder}.")
