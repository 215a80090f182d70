"""Datasets: the one raster layer every stage reads pixels through.

- ``errors``    ``DatasetError``: bad input, named by file, field and problem.
- ``schema``    the dataset header (pydantic) and its YAML I/O.
- ``discovery`` dataset folders, items paired by stem, the content hash (the raw data version).
- ``rasters``   rasterio I/O under the pixel rule (``runtime_export.numpy_runtime.pixels``: band selection, value
                scaling, validity, in numpy alone, so the numpy runtime applies the same rule): windowed
                reads, file facts and checks, block streaming.
- ``scan``      reading a whole dataset once: validation against a header, or header inference.

This ``__init__`` imports nothing: ``rasters`` stays importable without pydantic (``runtime_export.segment``).
"""
