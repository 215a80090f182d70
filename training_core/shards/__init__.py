"""Processed shards (layout v0): build, read and verify.

```
<processed_root>/<dataset_id>/<split>/shard-00000/inputs/<item_id>.tif
                                                /targets/<item_id>.tif   (labeled items)
                                                /index.jsonl
<processed_root>/<dataset_id>/manifest.json       counts, tile counts, seed, header hash, data version
<processed_root>/<dataset_id>/dataset_header.yaml the header the build used
```

Chips. A source raster taller or wider than ``sharding.chip_size`` is cut into chips on a grid of that size
from its top-left pixel; the last row and column of chips are clipped, so every pixel is in exactly one
chip. Each chip is an item ``<source item id>@r<row>_c<col>`` (pixel offsets) whose index line adds
``source_item`` and ``window`` (``[col_off, row_off, width, height]``); a smaller raster stays one item
under its own id. The split rule and the manifest's ``counts`` are about source rasters: every chip of a
source is in its source's split (no area of one raster in two splits); ``tile_counts`` counts the items.

Tiles are uncompressed GeoTIFFs (unless the header says otherwise) keeping bands, dtype, CRS, nodata and
mask band; a chip's transform is its window's. Each chip (input and target tile) is its own task, reading
only its window of the source, so a build holds about one chip per worker whatever the size of the rasters.

Items are written in parallel into a hidden sibling ``.<dataset_id>.building-*``; the manifest is written
last, then the folder is swapped in: the previous one is renamed aside, the new one renamed in, the old one
deleted. A crash at any point leaves a complete old or new folder: if it hits between the two renames the
old one waits aside and the next build puts it back before anything else; leftovers of dead builds are
removed then too. Builds of one dataset
must not run concurrently (Dagster runs one per partition). The manifest holds no timestamps, so a rebuild
of the same data and settings is byte-identical.

A processed dataset folder that is a symbolic link (shards kept on another disk) stays a link: the build is
staged beside the folder it leads to and swapped in there. A build never replaces what is not a build: a
non-empty folder without a manifest, a file, or a place overlapping the raw dataset folder is refused.

An item is listed once: ``read_index`` and ``iter_split_items`` (what the loaders read) refuse an item or a
tile listed twice, naming the index file, the line and the item (a duplicated line would be trained on and
scored twice), and ``verify_shards`` reports each repeat.

Modules, one job each: ``plan`` (chips, split assignment, shards), ``write`` (``build_shards``: the parallel
write, the swap and crash recovery), ``index`` (the layout's names; reading the manifest and the indexes),
``verify`` (``verify_shards``), ``__main__`` (the command line, ``segpipe-shards``).
"""
