"""Render a raster and its segments side by side with QGIS's own map renderer, headless, into a PNG.

``QT_QPA_PLATFORM=offscreen /usr/bin/python3 qgis_plugin/render_example.py INPUT.tif SEGMENTS.tif OUT.png``

Runs in QGIS's Python (PyQGIS), not the project's environment. The segments layer is drawn the way QGIS
opens it: a paletted renderer from the file's colour table. Prints one JSON line about the two layers
(validity, renderer, palette classes), which the plugin test reads.
"""

from __future__ import annotations

import json
import sys

from qgis.core import QgsApplication, QgsMapRendererSequentialJob, QgsMapSettings, QgsRasterLayer
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage, QPainter

PANEL_WIDTH = 640
GAP = 16


def render(layer: QgsRasterLayer, size: QSize) -> QImage:
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setExtent(layer.extent())
    settings.setOutputSize(size)
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def main(input_path: str, segments_path: str, png_path: str) -> dict[str, object]:
    source, segments = QgsRasterLayer(input_path, "input"), QgsRasterLayer(segments_path, "segments")
    facts = {
        "input_valid": source.isValid(),
        "segments_valid": segments.isValid(),
        "renderer": segments.renderer().type() if segments.isValid() else None,
    }
    if not (source.isValid() and segments.isValid()):
        return facts
    extent = source.extent()
    size = QSize(PANEL_WIDTH, round(PANEL_WIDTH * extent.height() / extent.width()))
    picture = QImage(2 * size.width() + GAP, size.height(), QImage.Format_RGB32)
    picture.fill(QColor("white"))
    painter = QPainter(picture)
    painter.drawImage(0, 0, render(source, size))
    painter.drawImage(size.width() + GAP, 0, render(segments, size))
    painter.end()
    facts["saved"] = picture.save(png_path)
    classes = segments.renderer().classes() if facts["renderer"] == "paletted" else []
    facts["classes"] = [int(entry.value) for entry in classes]
    return facts


if __name__ == "__main__":
    app = QgsApplication([], False)
    app.initQgis()
    print(json.dumps(main(*sys.argv[1:4])))
    app.exitQgis()
