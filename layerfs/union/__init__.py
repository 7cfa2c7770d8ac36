"""The union filesystem as a model, free of FUSE: lower layers, the merged index, the view."""
