"""napari-dsparse: live pixel classification with exact d-regularly sparse kernels.

The package root and its core modules import without Qt or napari; only the
``_``-prefixed modules (widget, sample data, worker) touch the GUI.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
