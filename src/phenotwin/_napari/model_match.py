"""A model that knows the layers' conditions: the Translate dock never silently proposes others.

When the image layers say (in their metadata) which conditions they show, and the loaded model
lacks one of them (the subtle sample's control and treated, with the demo model's control and
nocodazole), the dock loads a model that knows them: one met in this process (loaded or trained
here) or a shipped one (`model_registry.model_for_conditions`). When none does, a line in the
dock (and a notification) says so, and what to do. A model the user loaded by hand is kept
until the layers' conditions change; the line then names the model that knows them.
"""

from __future__ import annotations

from pathlib import Path

from magicgui import widgets
from napari.utils.notifications import show_warning

from phenotwin._napari import model_registry as registry
from phenotwin._napari.layers import ROLE_KEY

TRAIN_HINT = ("Train a model on these layers (Plugins › napari-phenotwin › Train model: Data from image layers), or "
              "open a model folder that knows them (Model folder, then Load model).")


def named_conditions(layers) -> list[str]:
    """The conditions the user's layers say they show (metadata), in the layers' order; results are not asked."""
    named = []
    for layer in layers:
        meta = (getattr(layer, "metadata", None) or {}).get(ROLE_KEY, {})
        if "role" not in meta and meta.get("condition") and meta["condition"] not in named:
            named.append(str(meta["condition"]))
    return named


class ConditionsNote(widgets.Label):
    """The dock's line about the layers' conditions and the model's; `check` after a model or layer change."""

    def __init__(self) -> None:
        super().__init__(value="", visible=False)
        self.native.setWordWrap(True)
        self.chosen_path: str | None = None  # a model the user is loading by hand (Load model)
        self._kept_for: set[str] | None = None  # the layers' conditions when the user chose the model shown
        self._switched_from: tuple[str, list[str]] | None = None  # (name, conditions) of the model replaced
        self._warned: tuple | None = None

    def check(self, widget) -> None:
        """Load a model that knows the layers' conditions when the loaded one does not, or say none does."""
        translator = widget.translator
        if translator is None:
            return
        named, classes = named_conditions(widget.viewer.layers), list(translator.classes)
        path = str(Path(translator.checkpoint_path).resolve())
        if self.chosen_path == path:  # the user's own choice: kept for these layers
            self._kept_for, self.chosen_path = set(named), None
        lacking = [c for c in named if c not in classes]
        found = registry.model_for_conditions(named, exclude=path) if lacking else None
        if found is not None and self._kept_for != set(named):
            self._switched_from = (Path(path).name, classes)
            if widget.requested_model != str(found.resolve()):
                widget.model_path.value = str(found)
                widget.load_model(str(found))
            self._say(f"These layers show {', '.join(named)}; {Path(path).name} knows {', '.join(classes)}: "
                      f"loading {found.name}, which knows them...")
        elif found is not None:
            self._say(f"These layers show {', '.join(named)}; the model you loaded knows {', '.join(classes)}, not "
                      f"{', '.join(lacking)}. {found} knows them: put it in Model folder and press Load model.")
        elif lacking:
            self._say(f"No loaded model knows {', '.join(lacking)}: these layers show {', '.join(named)}, and "
                      f"{Path(path).name} knows only {', '.join(classes)} (it would propose {widget.source.value} → "
                      f"{widget.target.value}). {TRAIN_HINT}", warn=(tuple(named), path))
        elif self._switched_from is not None and named:
            old, old_classes = self._switched_from
            self._say(f"Loaded {Path(path).name}, which knows these layers' conditions ({', '.join(named)}); "
                      f"{old} knows {', '.join(old_classes)}.")
        else:
            self._say("")

    def _say(self, text: str, warn: tuple | None = None) -> None:
        self.value, self.visible = text, bool(text)
        if warn is not None and warn != self._warned:  # once per layers and model, not at every layer pick
            self._warned = warn
            show_warning(text)
