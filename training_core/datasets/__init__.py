"""Datasets: dataset folders, their headers, and reading a whole dataset once.

- ``schema``    the dataset header (pydantic) and its YAML I/O.
- ``discovery`` dataset folders, items paired by stem, the content hash (the raw data version).
- ``scan``      reading a whole dataset once: validation against a header (``check_against``), or header
                inference.
- ``built``     a built dataset's header: the copy the shard build writes beside the shards.

Pixels are read through ``runtime_export.rasters`` (rasterio I/O under the pixel rule of
``runtime_export.numpy_runtime.pixels``: windowed reads, file facts, block streaming), the one raster layer
every stage shares, and bad input raises ``runtime_export.errors.DatasetError``: both sit below this package
so that ``runtime_export.segment`` reads pixels without training_core.

This ``__init__`` imports nothing.
"""
