"""The exported model and everything that runs it.

The numpy runtime is ``pixels``, ``runtime``, ``prototypes`` and ``whole_raster``: numpy and the standard
library alone, importing each other relatively, because ``bin/build-qgis-plugin`` vendors them unchanged
into the QGIS plugin. ``segment`` (rasterio), ``export`` and ``parity`` (torch) are the pipeline's side.
"""
