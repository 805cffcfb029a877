"""Everything that touches napari or Qt lives here; the rest of phenotwin never imports it."""
