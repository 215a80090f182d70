"""QGIS plugin entry point: QGIS calls ``classFactory`` when the plugin is enabled."""


def classFactory(iface):
    from .plugin import SegpipePlugin

    return SegpipePlugin(iface)
