"""Registers the Processing provider while the plugin is enabled (no menus or toolbars of its own)."""

from __future__ import annotations

from qgis.core import QgsApplication

from .provider import SegpipeProvider


class SegpipePlugin:
    def __init__(self, iface) -> None:
        self.iface = iface
        self.provider: SegpipeProvider | None = None

    def initProcessing(self) -> None:
        self.provider = SegpipeProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()

    def unload(self) -> None:
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
