"""Datasets: the one raster layer every stage reads pixels through.

- ``errors``    ``DatasetError``: bad input, named by file, field and problem.
- ``schema``    the dataset header (pydantic) and its YAML I/O.
- ``discovery`` dataset folders, items paired by stem, the content hash (the raw data version).
- ``pixels``    the pixel rule (band selection, value scaling, validity) in numpy alone: the numpy
                runtime applies the same rule to raw rasters.
- ``rasters``   rasterio I/O under that rule: windowed reads, file facts and checks, block streaming.
- ``scan``      reading a whole dataset once: validation against a header, or header inference.

This ``__init__`` imports nothing, so ``training_core.datasets.pixels`` stays importable with numpy alone.
"""
