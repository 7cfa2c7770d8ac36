"""OCI image tools: import and export of image layouts and archives (installed as ``layerfs.tools``)."""
