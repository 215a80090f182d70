"""``segpipe:segment``: a raster into K segments with an exported segpipe model, inside QGIS.

The procedure is ``runtime_export.numpy_runtime.whole_raster``'s, vendored into this plugin by ``bin/build-qgis-plugin``
(``python -m runtime_export.segment`` runs the same code through rasterio): the same labels for the same
input, model and K. Memory stays bounded at any raster size; the cell embeddings wait between the two
passes in a nameless scratch file beside the output (about width x height x 25 bytes), which the system frees
when the run ends, however it ends.
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from . import openblas
from .gdal_io import GdalSource, LabelWriter, bounded_block_cache, colour_interpretation, open_input, raster_dtype
from .numpy_runtime.runtime import load_runtime_model, use_matmul
from .numpy_runtime.whole_raster import DEFAULT_NODATA_LABEL, check_k, choose_input_rule, segment_source


class Cancelled(Exception):
    """The user cancelled: raised from the progress callback, it unwinds both passes."""


class SegmentAlgorithm(QgsProcessingAlgorithm):
    INPUT, MODEL, K, DATASET, OUTPUT = "INPUT", "MODEL", "K", "DATASET", "OUTPUT"

    def name(self) -> str:
        return "segment"

    def displayName(self) -> str:
        return "Segment raster into K segments"

    def shortHelpString(self) -> str:
        return (
            "Splits a raster into K segments with a segpipe model: a folder holding model.npz and meta.json, "
            "exported by the segpipe training pipeline. Bands and value scaling follow the model's meta.json "
            "(the rule of the training dataset named in 'Training dataset', else the one for the raster's data "
            "type, else the file's red, green and blue bands). The output is a paletted GeoTIFF: K colours, "
            "nodata (255) transparent, overviews. Runs with numpy alone; any raster size in bounded memory."
        )

    def createInstance(self) -> SegmentAlgorithm:
        return SegmentAlgorithm()

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster"))
        self.addParameter(
            QgsProcessingParameterFile(
                self.MODEL, "Model folder (model.npz + meta.json)", behavior=QgsProcessingParameterFile.Folder
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.K, "Number of segments (K)", QgsProcessingParameterNumber.Integer, 4, minValue=2, maxValue=254
            )
        )
        dataset = QgsProcessingParameterString(
            self.DATASET, "Training dataset whose bands and scaling to use (see meta.json input_rules)", optional=True
        )
        dataset.setFlags(dataset.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(dataset)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, "Segments"))

    def processAlgorithm(self, parameters, context, feedback) -> dict[str, str]:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or layer.providerType() != "gdal":
            raise QgsProcessingException("INPUT: needs a raster file GDAL can read (not a web or virtual layer)")
        input_path = layer.source()
        model_dir = self.parameterAsFile(parameters, self.MODEL, context)
        k = self.parameterAsInt(parameters, self.K, context)
        dataset_id = self.parameterAsString(parameters, self.DATASET, context) or None
        output = Path(self.parameterAsOutputLayer(parameters, self.OUTPUT, context))
        try:
            model = load_runtime_model(model_dir)
            dataset = open_input(input_path)
            rule, rule_source = choose_input_rule(
                model.meta, raster_dtype(dataset), colour_interpretation(dataset), dataset_id
            )
            source = GdalSource(input_path, dataset, rule)
            check_k(model, k, DEFAULT_NODATA_LABEL)
            writer = LabelWriter(output, dataset, model.meta, k, DEFAULT_NODATA_LABEL, rule)
        except (ValueError, OSError) as exc:  # the runtime's ArtifactError is a ValueError
            # The runtime names segment's command-line options; here they are parameters.
            message = " ".join(str(exc).split()).replace("pass --dataset", f"set {self.DATASET}")
            raise QgsProcessingException(message) from None
        feedback.pushInfo(openblas.install(use_matmul))
        feedback.pushInfo(f"Pixel rule ({rule_source}): {rule.to_dict()}")

        def progress(pass_number: int, done: int, tiles: int, pixels: int) -> None:
            if feedback.isCanceled():
                raise Cancelled
            feedback.setProgress(50.0 * (pass_number - 1) + 50.0 * done / tiles)

        try:
            with bounded_block_cache():
                stats = segment_source(model, source, k, writer.write, output.parent, progress=progress)
                feedback.pushInfo("Building overviews")
                writer.commit()
        except Cancelled:
            writer.discard()
            raise QgsProcessingException("Cancelled: no output was written") from None
        except (ValueError, OSError) as exc:
            writer.discard()
            raise QgsProcessingException(" ".join(str(exc).split())) from None
        except BaseException:
            writer.discard()
            raise
        feedback.pushInfo(f"{stats.tiles} tiles, prototypes fitted on {stats.fit_cells} cells")
        return {self.OUTPUT: str(output)}
