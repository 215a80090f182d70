"""The numpy runtime: loads an exported artifact and segments pixels with numpy and the standard library alone.

- ``pixels``       the pixel rule: band selection, value scaling to the model's uint8 RGB, validity.
- ``runtime``      the artifact (``model.npz`` + ``meta.json``) and the model's forward pass, op for op.
- ``prototypes``   prototypes fitted over all of a raster's tiles (a lattice of cells).
- ``whole_raster`` the whole-raster procedure behind any reader and writer (rasterio here, GDAL in QGIS).
- ``label_style``  what a label raster carries to look right when opened: colours, tags, overviews, QGIS style.

Numpy and the standard library only, and relative imports only: ``qgis_plugin/build.py`` copies this folder
whole into the QGIS plugin (``segpipe/numpy_runtime/``), where it runs unchanged; ``tests/test_import_direction.py``
holds it to that.
"""
