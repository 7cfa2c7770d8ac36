"""layerfs: a content-addressed container layer store and union filesystem."""

__version__ = "0.1.0"
