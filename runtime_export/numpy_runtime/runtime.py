"""The numpy-only runtime: loads an exported artifact and reproduces ``SegmentationModel.forward``.

This module must never import torch: the QGIS plugin ships numpy alone. It mirrors the torch
model op for op, in float32, in the same order (``training_core/model.py`` is the contract):

1. ``x = (rgb / 255 - mean) / std`` (``meta.json``'s ``input_scale`` is the 1/255);
2. stride-4 encoder (batch norm already folded into the conv weights by the export), computed
   channels-last: each 3x3 conv is one im2col copy plus one BLAS matmul;
3. ``F.normalize`` of the features, optionally followed by ``avg_pool(x, 4, ceil)`` in the opponent
   basis (luminance, red-green, yellow-blue), scaled by ``luminance_weight`` and ``chroma_weight``;
4. seed logits = the first K channels of the 1x1 seed projection;
5. soft k-means with expanded squared distances (``|e|^2 - 2 p.e + |p|^2``);
6. smoothing with the exported 3x3 kernel, edge-replicated;
7. bilinear upsampling with ``align_corners=False``.

Pixels are ``[3, H, W]`` uint8 model pixels; the artifact's scale and normalisation are applied
here. Raw rasters (any band layout, uint16...) become model pixels under a ``PixelRule``:
``meta.json``'s ``input_rules`` records the rule of every dataset the model was trained or evaluated
on, and ``select_input_rule`` picks the one for a raster. Whole rasters go through
``runtime_export.segment``, which uses ``embed``, ``fit_prototypes`` and ``assign`` to share one set
of prototypes across tiles.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .pixels import PixelRule, is_int, is_number

RUNTIME_VERSION = "segpipe-numpy-runtime/3"  # 3: input_rules (multi-band and non-uint8 inputs)
MODEL_FILENAME = "model.npz"
META_FILENAME = "meta.json"
METRICS_FILENAME = "metrics.json"
STRIDE = 4
NORM_EPS = 1e-12  # F.normalize's eps
MASS_EPS = 1e-6  # soft k-means clamp on cluster mass
CONV_CHUNK_PIXELS = 8192  # output pixels per im2col band
LABEL_BAND_ROWS = 128  # output rows per band when only labels are needed
# training_core.model.OPPONENT_BASIS: orthonormal rows luminance, red-green, yellow-blue.
OPPONENT_BASIS = np.array(
    [[3**-0.5, 3**-0.5, 3**-0.5], [2**-0.5, -(2**-0.5), 0.0], [6**-0.5, 6**-0.5, -2 * 6**-0.5]], dtype=np.float64
)

META_KEYS = (
    "runtime_version",
    "max_k",
    "embed_dim",
    "temperature",
    "cluster_iters",
    "smooth_iters",
    "smoothing",
    "luminance_weight",
    "chroma_weight",
    "input_mean",
    "input_std",
    "input_scale",
    "stride",
    "supports_learned_refine",
    "input_rules",
)
_CONV_NAMES = (
    "encoder.conv1",
    "encoder.conv2",
    "encoder.res1.conv1",
    "encoder.res1.conv2",
    "encoder.res2.conv1",
    "encoder.res2.conv2",
)


# Every matrix product of the runtime goes through this one function (``use_matmul``).
_matmul: Callable[..., np.ndarray] = np.matmul


def use_matmul(matmul: Callable[..., np.ndarray]) -> None:
    """Route the runtime's matrix products through ``matmul`` (``np.matmul``'s signature: ``a, b, out=None``).

    For hosts whose process resolves numpy's CBLAS calls to a slow reference CBLAS: QGIS on Debian links
    GSL's ``libgslcblas`` ahead of numpy's BLAS, and the QGIS plugin passes a direct OpenBLAS call (the
    same ``sgemm`` numpy would make, so the same numbers, 4x faster there).
    """
    global _matmul
    _matmul = matmul


class ArtifactError(ValueError):
    """A runtime artifact that cannot be used; the message names the file, the key and the problem."""


def expected_array_shapes(embed_dim: int, max_k: int) -> dict[str, tuple[int, ...]]:
    """Every array ``model.npz`` holds, with its shape (conv weights in torch layout [out, in, 3, 3])."""
    hidden = max(embed_dim // 2, 1)
    d = embed_dim
    conv_io = {
        "encoder.conv1": (hidden, 3),
        "encoder.conv2": (d, hidden),
        "encoder.res1.conv1": (d, d),
        "encoder.res1.conv2": (d, d),
        "encoder.res2.conv1": (d, d),
        "encoder.res2.conv2": (d, d),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (c_out, c_in) in conv_io.items():
        shapes[f"{name}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"{name}.bias"] = (c_out,)
    shapes["seed_proj.weight"] = (max_k, d)
    shapes["seed_proj.bias"] = (max_k,)
    shapes["smooth_kernel"] = (3, 3)
    shapes["input_mean"] = (3,)
    shapes["input_std"] = (3,)
    return shapes


@dataclass
class Embedding:
    """What the encoder makes of one tile, before clustering (pixel-major, float32)."""

    embeddings: np.ndarray  # [h*w, D'] the clustered embedding
    seed_logits: np.ndarray  # [h*w, max_k] all seed channels; a forward uses the first K
    grid: tuple[int, int]  # (h, w) the stride-4 grid
    size: tuple[int, int]  # (H, W) the input size


@dataclass
class RuntimeOutput:
    """The numpy twin of ``training_core.model.ModelOutput`` for one tile (no batch axis)."""

    probs: np.ndarray  # [K, H, W]
    low_res_probs: np.ndarray  # [K, h, w]
    embeddings: np.ndarray  # [D', h, w]
    prototypes: np.ndarray  # [K, D']


class RuntimeModel:
    """An exported segmentation model, runnable with numpy alone."""

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.meta = meta
        self.max_k = int(meta["max_k"])
        self.embed_dim = int(meta["embed_dim"])
        self.temperature = np.float32(meta["temperature"])
        self.cluster_iters = int(meta["cluster_iters"])
        self.smooth_iters = int(meta["smooth_iters"]) if meta["smoothing"] != "none" else 0
        self.colour_projection = _colour_projection(meta["luminance_weight"], meta["chroma_weight"])
        # Divide by 1 / scale (exactly 255 for 1/255), as torch's ``rgb / 255`` does, for bitwise-equal inputs.
        self.input_divisor = np.float32(1.0 / meta["input_scale"])
        self.mean = arrays["input_mean"].reshape(3, 1, 1)
        self.std = arrays["input_std"].reshape(3, 1, 1)
        # im2col layout: rows ordered (ky, kx, c_in) to match the strided window view below.
        self.convs = {name: (_im2col_weight(arrays[f"{name}.weight"]), arrays[f"{name}.bias"]) for name in _CONV_NAMES}
        self.seed_weight = np.ascontiguousarray(arrays["seed_proj.weight"].T)  # [D, max_k]
        self.seed_bias = arrays["seed_proj.bias"]
        self.smooth_kernel = arrays["smooth_kernel"]

    # -- encoder -------------------------------------------------------------------------------

    def embed(self, rgb: np.ndarray) -> Embedding:
        """Encode one ``[3, H, W]`` uint8 tile into its stride-4 embedding and seed logits."""
        rgb = _check_rgb(rgb)
        height, width = rgb.shape[1:]
        x = (rgb.astype(np.float32) / self.input_divisor - self.mean) / self.std  # [3, H, W]
        hwc = np.ascontiguousarray(x.transpose(1, 2, 0))
        feat = _relu(self._conv("encoder.conv1", hwc, stride=2))
        feat = _relu(self._conv("encoder.conv2", feat, stride=2))
        feat = self._residual("encoder.res1", feat)
        feat = self._residual("encoder.res2", feat)
        h, w, d = feat.shape
        flat = feat.reshape(h * w, d)
        seed_logits = _matmul(flat, self.seed_weight)
        seed_logits += self.seed_bias
        norm = np.sqrt(np.einsum("nd,nd->n", flat, flat))
        embeddings = flat / np.maximum(norm, np.float32(NORM_EPS))[:, None]
        if self.colour_projection is not None:
            colour = _avg_pool_ceil(hwc, STRIDE).reshape(h * w, 3)
            embeddings = np.concatenate([embeddings, _matmul(colour, self.colour_projection.T)], axis=1)
        return Embedding(embeddings=embeddings, seed_logits=seed_logits, grid=(h, w), size=(height, width))

    def _conv(self, name: str, x: np.ndarray, stride: int) -> np.ndarray:
        weight, bias = self.convs[name]
        out = conv3x3(x, weight, stride)
        out += bias
        return out

    def _residual(self, prefix: str, x: np.ndarray) -> np.ndarray:
        y = _relu(self._conv(f"{prefix}.conv1", x, stride=1))
        out = self._conv(f"{prefix}.conv2", y, stride=1)
        out += x
        return _relu(out)

    # -- clustering ----------------------------------------------------------------------------

    def fit_prototypes(
        self, embedding: Embedding, k: int, cluster_iters: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Soft k-means over one embedding set; returns (last assignment [N, K], prototypes [K, D'])."""
        self.check_k(k)
        iters = self.cluster_iters if cluster_iters is None else cluster_iters
        return soft_kmeans(embedding.embeddings, embedding.seed_logits[:, :k], iters, self.temperature)

    def assign(self, embedding: Embedding, prototypes: np.ndarray) -> np.ndarray:
        """Soft assignment [N, K] of an embedding set to fixed prototypes (one k-means E-step)."""
        return _assign(embedding.embeddings, _sq_norm(embedding.embeddings), prototypes, self.temperature)

    def low_res_from_assignment(
        self, assignment: np.ndarray, embedding: Embedding, smooth_iters: int | None = None
    ) -> np.ndarray:
        """A pixel-major assignment [N, K] as [K, h, w] on the stride-4 grid, smoothed."""
        h, w = embedding.grid
        low_res = np.ascontiguousarray(assignment.T).reshape(-1, h, w)
        smooth = self.smooth_iters if smooth_iters is None else smooth_iters
        if self.meta["smoothing"] != "none" and smooth > 0:
            low_res = smooth_probs(low_res, self.smooth_kernel, smooth)
        return low_res

    def labels_from_assignment(self, assignment: np.ndarray, embedding: Embedding) -> np.ndarray:
        """Cluster ids [H, W] (uint8): arg-max of the upsampled probabilities, without holding them all."""
        return upsample_argmax(self.low_res_from_assignment(assignment, embedding), embedding.size)

    # -- public forward ------------------------------------------------------------------------

    def forward(
        self, rgb: np.ndarray, k: int, cluster_iters: int | None = None, smooth_iters: int | None = None
    ) -> RuntimeOutput:
        """The model's forward pass on one ``[3, H, W]`` uint8 tile."""
        self.check_k(k)
        embedding = self.embed(rgb)
        assignment, prototypes = self.fit_prototypes(embedding, k, cluster_iters)
        low_res = self.low_res_from_assignment(assignment, embedding, smooth_iters)
        probs = upsample_bilinear(low_res, embedding.size)
        h, w = embedding.grid
        embeddings = np.ascontiguousarray(embedding.embeddings.T).reshape(-1, h, w)
        return RuntimeOutput(probs=probs, low_res_probs=low_res, embeddings=embeddings, prototypes=prototypes)

    def predict_labels(self, rgb: np.ndarray, k: int) -> np.ndarray:
        """Cluster ids ``[H, W]`` (uint8) for one ``[3, H, W]`` uint8 tile: the arg-max of ``forward``'s probs."""
        self.check_k(k)  # before the encoder's work
        embedding = self.embed(rgb)
        assignment, _ = self.fit_prototypes(embedding, k)
        return self.labels_from_assignment(assignment, embedding)

    def check_k(self, k: int) -> None:
        """A K this model cannot cluster into is a ValueError naming K and the model's range."""
        check_k_range(k, self.max_k)


def check_k_range(k: int, max_k: int) -> None:
    """The one K-range rule, for a model with ``max_k`` seed channels: K is an int from 2 to ``max_k`` (fewer
    seed channels than K would silently fit fewer clusters). A ValueError names K and the range."""
    if not is_int(k) or not 2 <= k <= max_k:
        raise ValueError(f"k={k!r} is outside the model's k_range [2, {max_k}] (2 to its max_k)")


# -- loading -------------------------------------------------------------------------------------


def load_runtime_model(artifact_dir: str | Path) -> RuntimeModel:
    """Load ``model.npz`` + ``meta.json`` from an artifact directory, checking version, keys, types, shapes, dtypes
    and values (finite numbers, positive input std): an ``ArtifactError`` naming the file, the key and the problem."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        problem = "not a folder" if artifact_dir.exists() else "no such folder"
        raise ArtifactError(f"{artifact_dir}: {problem} (an artifact holds {META_FILENAME} and {MODEL_FILENAME})")
    meta = read_meta(artifact_dir / META_FILENAME)
    arrays = read_arrays(artifact_dir / MODEL_FILENAME, expected_array_shapes(meta["embed_dim"], meta["max_k"]))
    return RuntimeModel(meta, arrays)


class _NonFinite:
    """Stands in for JSON's non-standard NaN / Infinity / -Infinity while parsing, to name the key that holds one."""

    def __init__(self, constant: str) -> None:
        self.constant = constant


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` as a dict; a missing file or key, another runtime version, a value of the wrong type or range,
    or a NaN / Infinity anywhere is an ``ArtifactError`` naming the key."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (an artifact needs {META_FILENAME} and {MODEL_FILENAME})")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_NonFinite)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, value in _leaves(meta):
        if isinstance(value, _NonFinite):
            raise ArtifactError(f"{path}: {key} is {value.constant}, not a finite number")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    if meta["runtime_version"] != RUNTIME_VERSION:
        raise ArtifactError(
            f"{path}: runtime_version {meta['runtime_version']!r} does not match this runtime ({RUNTIME_VERSION!r})"
        )
    if not is_int(meta["stride"]) or meta["stride"] != STRIDE:
        raise ArtifactError(f"{path}: stride {meta['stride']!r} is not supported (this runtime runs stride {STRIDE})")
    if not isinstance(meta["smoothing"], str) or meta["smoothing"] not in ("fast", "learned", "none"):
        raise ArtifactError(f"{path}: smoothing {meta['smoothing']!r} is not one of fast|learned|none")
    # The least value each integer takes: K runs from 2, the encoder has at least one channel.
    for key, least in (("max_k", 2), ("embed_dim", 1), ("cluster_iters", 0), ("smooth_iters", 0)):
        if not is_int(meta[key]) or meta[key] < least:
            raise ArtifactError(f"{path}: {key} must be an integer >= {least}, got {meta[key]!r}")
    for key in ("temperature", "input_scale"):
        if not is_number(meta[key]) or meta[key] <= 0:
            raise ArtifactError(f"{path}: {key} must be a positive number, got {meta[key]!r}")
    for key in ("luminance_weight", "chroma_weight"):
        if not is_number(meta[key]) or meta[key] < 0:
            raise ArtifactError(f"{path}: {key} must be a non-negative number, got {meta[key]!r}")
    for key, positive in (("input_mean", False), ("input_std", True)):
        value = meta[key]
        if not (isinstance(value, list) and len(value) == 3 and all(is_number(v) for v in value)):
            raise ArtifactError(f"{path}: {key} must be a list of 3 numbers (R, G, B), got {value!r}")
        if positive and min(value) <= 0:
            raise ArtifactError(f"{path}: {key} must be positive (pixels are divided by it), got {value!r}")
    refine = meta["supports_learned_refine"]
    if not isinstance(refine, bool):
        raise ArtifactError(f"{path}: supports_learned_refine must be true or false, got {refine!r}")
    if not isinstance(meta.get("lineage", {}), dict):
        raise ArtifactError(f"{path}: lineage must be an object, got {type(meta['lineage']).__name__}")
    _check_input_rules(path, meta["input_rules"])
    return meta


def _leaves(value: object, key: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every non-container value inside parsed JSON (``training_data.x.crs``, ``k_range[1]``)."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _leaves(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{key}[{index}]")
    else:
        yield key, value


def _check_input_rules(path: Path, rules: object) -> None:
    """``input_rules``: ``{dataset_id: {"dtype": str, **PixelRule.to_dict()}}`` (may be empty)."""
    if not isinstance(rules, dict):
        raise ArtifactError(f"{path}: input_rules must be an object of dataset id -> rule, got {type(rules).__name__}")
    for dataset_id, entry in rules.items():
        where = f"{path}: input_rules.{dataset_id}"
        if not isinstance(entry, dict):
            raise ArtifactError(f"{where} must be an object, got {type(entry).__name__}")
        if not isinstance(entry.get("dtype"), str):
            raise ArtifactError(f"{where}.dtype must be the input's dtype name, got {entry.get('dtype')!r}")
        try:
            PixelRule.from_dict(entry).check_dtype(entry["dtype"])
        except (ValueError, TypeError, IndexError) as exc:
            raise ArtifactError(f"{where}: not a pixel rule ({exc})") from None


def select_input_rule(
    meta: dict[str, Any],
    dtype: str,
    dataset_id: str | None = None,
    *,
    own_value_range: bool = False,
    raster_name: str = "the raster",
) -> PixelRule | None:
    """The pixel rule for a raw raster of ``dtype`` (``meta`` as ``read_meta`` returns it; ``raster_name`` names
    the raster in messages).

    - ``dataset_id`` given: that dataset's rule (an ``ArtifactError`` lists the known ids if absent; a
      ``ValueError`` names both dtypes if the dataset's is not ``dtype``);
    - else the rules recorded for inputs of the same dtype: one distinct rule is used;
    - none for ``uint8`` (or for any dtype when the caller brings ``own_value_range``): None, meaning
      "no rule of the model's: take R, G, B (and alpha) from the file's colour interpretation";
    - several distinct rules, or none for another dtype: a ``ValueError`` saying what to pass
      (``--dataset``, or ``--value-range`` to scale values the model has never seen).
    """
    rules: dict[str, dict[str, Any]] = meta["input_rules"]
    if dataset_id is not None:
        if dataset_id not in rules:
            known = sorted(rules)
            raise ArtifactError(f"dataset {dataset_id!r}: the model records no input rule for it (known: {known})")
        rule_dtype = rules[dataset_id]["dtype"]
        if rule_dtype != dtype:  # another dtype's scaling would make the pixels near black or white
            raise ValueError(
                f"dataset {dataset_id!r}: its input rule is for {rule_dtype} data, {raster_name} is {dtype}: "
                f"choose a dataset of {dtype} data, or none"
            )
        return PixelRule.from_dict(rules[dataset_id])
    matching: dict[PixelRule, list[str]] = {}
    for name, entry in sorted(rules.items()):
        if entry["dtype"] == dtype:
            matching.setdefault(PixelRule.from_dict(entry), []).append(name)
    if len(matching) == 1:
        return next(iter(matching))
    if len(matching) > 1:
        choices = sorted(name for names in matching.values() for name in names)
        raise ValueError(
            f"the model was trained on {dtype} datasets with different pixel rules: pass --dataset, one of {choices}"
        )
    if dtype == "uint8" or own_value_range:
        return None
    seen = sorted({entry["dtype"] for entry in rules.values()})
    raise ValueError(
        f"the model was trained on no {dtype} data (its inputs: {', '.join(seen) or 'uint8 synthetic tiles'}): "
        "pass --value-range LO,HI to scale the values to 0..255"
    )


def read_arrays(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The arrays of ``model.npz`` (no pickles), each float32 with exactly the expected shape and finite values;
    ``input_std`` positive (pixels are divided by it)."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (an artifact needs {META_FILENAME} and {MODEL_FILENAME})")
    arrays: dict[str, np.ndarray] = {}
    try:
        npz = np.load(path, allow_pickle=False)
    # Not a zip: numpy falls back to (refused) pickle; a cut zip has no central directory.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: not a readable npz archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ArtifactError(f"{path}: expected an npz archive of named arrays, got a single array")
    with npz:
        missing = sorted(set(shapes) - set(npz.files))
        unexpected = sorted(set(npz.files) - set(shapes))
        if missing or unexpected:
            raise ArtifactError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
        for key, shape in shapes.items():
            try:
                array = npz[key]
            # An object array refuses to load without pickle (ValueError); a cut or damaged archive fails anywhere.
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise ArtifactError(f"{path}: array {key!r} cannot be read ({exc})") from exc
            if array.dtype != np.float32:
                raise ArtifactError(f"{path}: array {key!r} has dtype {array.dtype}, expected float32")
            if array.shape != shape:
                raise ArtifactError(f"{path}: array {key!r} has shape {array.shape}, expected {shape}")
            if not np.isfinite(array).all():
                raise ArtifactError(f"{path}: array {key!r} holds NaN or infinity (a diverged model?)")
            arrays[key] = array
    std = arrays["input_std"]
    if std.min() <= 0:
        raise ArtifactError(f"{path}: array 'input_std' must be positive (pixels are divided by it), got {std}")
    return arrays


# -- numerics (each mirrors one op of training_core/model.py) ------------------------------------


def conv3x3(x: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    """3x3 convolution, zero padding 1, on channels-last ``x`` [H, W, C] with im2col ``weight`` [9C, C_out].

    Output rows are done in bands of about ``CONV_CHUNK_PIXELS``: the im2col copy of a band stays
    small (memory bounded for any tile size, cache friendly) and each output pixel's dot product is
    the same whatever the band, so results do not depend on the tile size.
    """
    height, width, channels = x.shape
    padded = np.zeros((height + 2, width + 2, channels), dtype=np.float32)
    padded[1:-1, 1:-1] = x
    out_h = (height - 1) // stride + 1
    out_w = (width - 1) // stride + 1
    s_row, s_col, s_ch = padded.strides
    windows = as_strided(
        padded,
        shape=(out_h, out_w, 3, 3, channels),
        strides=(s_row * stride, s_col * stride, s_row, s_col, s_ch),
        writeable=False,
    )
    out = np.empty((out_h, out_w, weight.shape[1]), dtype=np.float32)
    rows = max(1, CONV_CHUNK_PIXELS // out_w)
    for row in range(0, out_h, rows):
        cols = windows[row : row + rows].reshape(-1, 9 * channels)  # the im2col copy of one band
        _matmul(cols, weight, out=out[row : row + rows].reshape(-1, weight.shape[1]))
    return out


def _im2col_weight(weight: np.ndarray) -> np.ndarray:
    """Torch conv weight [out, in, 3, 3] -> [(ky, kx, in), out], the row order ``conv3x3`` builds."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0]))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0), out=x)


def _colour_projection(luminance_weight: float, chroma_weight: float) -> np.ndarray | None:
    """[3, 3] float32: normalised RGB -> the weighted opponent colour (None: both weights 0)."""
    if luminance_weight == 0 and chroma_weight == 0:
        return None
    weights = np.array([luminance_weight, chroma_weight, chroma_weight], dtype=np.float64)
    return (weights[:, None] * OPPONENT_BASIS).astype(np.float32)


def _avg_pool_ceil(hwc: np.ndarray, size: int) -> np.ndarray:
    """``F.avg_pool2d(x, size, ceil_mode=True)`` on [H, W, C]: partial edge windows average what they cover."""
    height, width, channels = hwc.shape
    h, w = -(-height // size), -(-width // size)
    padded = np.zeros((h * size, w * size, channels), dtype=np.float32)
    padded[:height, :width] = hwc
    sums = padded.reshape(h, size, w, size, channels).sum(axis=(1, 3))
    rows = np.minimum(np.arange(h) * size + size, height) - np.arange(h) * size
    cols = np.minimum(np.arange(w) * size + size, width) - np.arange(w) * size
    counts = (rows[:, None] * cols[None, :]).astype(np.float32)
    return sums / counts[:, :, None]


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the cluster axis in pixel-major layout), in place."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _sq_norm(embeddings: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", embeddings, embeddings)[:, None]


def _weighted_means(assign: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    # float64 mass: numpy's column sums are sequential while torch's are pairwise; the wider
    # accumulator keeps us as close to torch as torch is to the exact sum.
    mass = np.maximum(assign.sum(axis=0, dtype=np.float64), MASS_EPS).astype(np.float32)
    return _matmul(assign.T, embeddings) / mass[:, None]


def _assign(embeddings: np.ndarray, sq_norm: np.ndarray, prototypes: np.ndarray, temperature: np.float32) -> np.ndarray:
    proto_sq_norm = (prototypes * prototypes).sum(axis=1)[None, :]
    dist = sq_norm - np.float32(2.0) * _matmul(embeddings, prototypes.T) + proto_sq_norm
    return _softmax(-dist / temperature)


def soft_kmeans(
    embeddings: np.ndarray, seed_logits: np.ndarray, iters: int, temperature: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Soft k-means over ``embeddings`` [N, D] seeded by ``seed_logits`` [N, K] -> (assign [N, K], protos [K, D])."""
    assign = _softmax(np.array(seed_logits, dtype=np.float32, copy=True))
    sq_norm = _sq_norm(embeddings)
    prototypes = _weighted_means(assign, embeddings)
    for _ in range(iters):
        assign = _assign(embeddings, sq_norm, prototypes, temperature)
        prototypes = _weighted_means(assign, embeddings)
    return assign, prototypes


def smooth_probs(probs: np.ndarray, kernel: np.ndarray, iters: int) -> np.ndarray:
    """Blur each channel of ``probs`` [K, h, w] with the 3x3 ``kernel``, edge-replicated, ``iters`` times."""
    _, h, w = probs.shape
    for _ in range(iters):
        padded = np.pad(probs, ((0, 0), (1, 1), (1, 1)), mode="edge")
        out = np.zeros_like(probs)
        for dy in range(3):
            for dx in range(3):
                out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
        probs = out
    return probs


def _source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Torch's ``align_corners=False`` source indices and weights, computed in float32 as torch does."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    lambda1 = src - i0.astype(np.float32)
    return i0, i1, np.float32(1) - lambda1, lambda1


def upsample_bilinear(low_res: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode="bilinear", align_corners=False)`` of [K, h, w] to [K, H, W] (width first, as torch)."""
    _, h, w = low_res.shape
    c0, c1, wc0, wc1 = _source_index(w, size[1])
    r0, r1, wr0, wr1 = _source_index(h, size[0])
    cols = wc0 * low_res[:, :, c0] + wc1 * low_res[:, :, c1]  # [K, h, W]
    return wr0[:, None] * cols[:, r0, :] + wr1[:, None] * cols[:, r1, :]


def upsample_argmax(low_res: np.ndarray, size: tuple[int, int], band_rows: int = LABEL_BAND_ROWS) -> np.ndarray:
    """``upsample_bilinear(low_res, size).argmax(axis=0)`` as uint8, computed in bands of output rows.

    Each band interpolates only the low-res rows it needs, with the same float32 operations as the
    full upsampling, so the labels are identical while memory stays at one band of probabilities.
    """
    _, h, w = low_res.shape
    c0, c1, wc0, wc1 = _source_index(w, size[1])
    r0, r1, wr0, wr1 = _source_index(h, size[0])
    labels = np.empty(size, dtype=np.uint8)
    for start in range(0, size[0], band_rows):
        band = slice(start, min(start + band_rows, size[0]))
        lo, hi = int(r0[band].min()), int(r1[band].max()) + 1
        rows = low_res[:, lo:hi]
        cols = wc0 * rows[:, :, c0] + wc1 * rows[:, :, c1]
        probs = wr0[band, None] * cols[:, r0[band] - lo, :] + wr1[band, None] * cols[:, r1[band] - lo, :]
        labels[band] = probs.argmax(axis=0)
    return labels


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[0] != 3:
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"expected RGB pixels of shape [3, H, W] as rasterio reads them, got {shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB pixels (0..255), got dtype {rgb.dtype}")
    if rgb.shape[1] < 1 or rgb.shape[2] < 1:
        raise ValueError(f"expected a non-empty tile, got shape {rgb.shape}")
    return rgb
