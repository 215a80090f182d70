"""Shared library of the pipeline: plain Python, torch and rasterio. Never imports dagster."""
