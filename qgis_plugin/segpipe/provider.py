"""The ``segpipe`` Processing provider: one algorithm, ``segpipe:segment``."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider

from .algorithm import SegmentAlgorithm


class SegpipeProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "segpipe"

    def name(self) -> str:
        return "Segpipe"

    def loadAlgorithms(self) -> None:
        self.addAlgorithm(SegmentAlgorithm())

    def supportedOutputRasterLayerExtensions(self) -> list[str]:
        return ["tif"]  # the labels are always a GeoTIFF: colour table, overviews and tags live in it
