"""The exported model and everything that runs it, without torch.

``numpy_runtime/`` (pixels, runtime, prototypes, whole_raster, label_style) is numpy and the standard library alone,
importing itself relatively, because ``bin/build-qgis-plugin`` vendors the folder unchanged into the QGIS
plugin. ``segment`` (rasterio) runs it over whole rasters, the pipeline's side; ``cli`` is every command's
error reporting; ``leftovers`` finds what killed runs left beside their outputs.
"""
