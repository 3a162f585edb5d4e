"""Explain a scan's prediction: Grad-CAM where the model folder allows it, saliency otherwise.

Served models are SavedModels, whose restored functions do not expose inner activations, so
Grad-CAM needs either the network split at its feature map — the ``gradcam_maps`` and
``gradcam_head`` signatures ``training.export.export_savedmodel`` writes (ensembles ship only these)
— or the Keras model, ``model.keras``, which ``brainscan train`` writes beside a single network's
SavedModel and which is preferred where present (folders exported before the split signatures).

- ``gradcam`` (Selvaraju et al.): the gradient of the explained class's log-probability with respect
  to a spatial feature map, averaged per channel, weights the channels; ReLU, upsampled to the
  input size, scaled to [0, 1]. The feature map is the card's ``gradcam_layer``, else the last layer
  with a spatial (rank-4) output: ``stage4_block1_out`` in the compact net, the ResNet50 backbone's
  ``conv5_block3_out`` (a nested backbone counts as one layer; naming a layer inside it works too);
  through the split signatures, the map the ``pool`` layer averages (``maps`` in an ensemble).
  The log-probability is used rather than the probability: it only rescales the map (normalised
  away) but keeps gradients of a confident softmax from underflowing.
- ``saliency`` (Simonyan et al.): for a folder with neither (the original project's card-less
  export), the absolute gradient of the class's log-probability with respect to the input
  pixels, through the SavedModel's serving function; max over channels, lightly blurred, [0, 1].

The explained class is the model's own top class for the scan. Both maps have the model's input
size. ``brainscan.heatmaps`` stores the rendered overlays; this module is the Celery side.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.heatmaps import HeatmapStore
from brainscan.settings import get_settings
from worker.celery import GRADCAM_TASK, app

log = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
GRADCAM = "gradcam"
SALIENCY = "saliency"
_EPS = 1e-7


# ---- the two algorithms ---------------------------------------------------------------------------
def _normalise(maps: np.ndarray) -> np.ndarray:
    """Each map to [0, 1] (a map with no signal stays all zeros)."""
    maps = np.maximum(np.nan_to_num(maps.astype(np.float32)), 0.0)
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return np.where(high - low > _EPS, (maps - low) / np.maximum(high - low, _EPS), 0.0).astype(np.float32)


def _spatial(layer: Any) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) == 4 and (shape[1] or 0) > 1 and (shape[2] or 0) > 1


def _outer_node(layer: Any) -> Any:
    # The node where the outer model calls ``layer``: its tensors live in the outer graph (a nested
    # model's own ``.output`` is a tensor of its inner graph).
    return layer._inbound_nodes[-1]


def grad_model(model: Any, layer_name: str | None = None) -> tuple[Any, str]:
    """A function ``x -> (feature map, probabilities)`` for Grad-CAM, and the feature layer's name."""
    import keras

    top = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if layer_name is None:
        spatial = [layer for layer in top if _spatial(layer)]
        if not spatial:
            raise ValueError(f"model {model.name} has no layer with a spatial output to explain")
        layer = spatial[-1]
        inner_name = None
        if isinstance(layer, keras.Model):  # a nested backbone: its last spatial layer is the map
            inner = [sub for sub in layer.layers if _spatial(sub)]
            inner_name = inner[-1].name if inner else None
        feature = _outer_node(layer).output_tensors[0]
        return keras.Model(model.inputs, [feature, model.output]), inner_name or layer.name
    for layer in top:
        if layer.name == layer_name:
            return keras.Model(model.inputs, [_outer_node(layer).output_tensors[0], model.output]), layer_name
    for nested in top:  # a layer inside a nested model (one level): pre -> nested -> post
        if not isinstance(nested, keras.Model):
            continue
        try:
            target = nested.get_layer(layer_name)
        except ValueError:
            continue
        node = _outer_node(nested)
        pre = keras.Model(model.inputs, node.input_tensors[0])
        inner = keras.Model(nested.inputs, [target.output, nested.output])
        post = keras.Model(node.output_tensors[0], model.output)

        return _composed(pre, inner, post), layer_name
    raise ValueError(f"model {model.name} has no layer named {layer_name!r}")


def _composed(pre: Any, inner: Any, post: Any) -> Any:
    def composed(x: Any, training: bool = False) -> tuple[Any, Any]:
        feature, out = inner(pre(x, training=training), training=training)
        return feature, post(out, training=training)

    return composed


def gradcam(
    model: Any, batch: np.ndarray, layer_name: str | None = None, class_index: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM maps ``[n, h, w]`` in [0, 1] at the input size, the probabilities ``[n, k]`` (the
    model's output order) and the feature layer used. ``class_index``: per scan, default the top class.
    """
    import tensorflow as tf

    function, used = grad_model(model, layer_name)
    x = tf.convert_to_tensor(np.asarray(batch, np.float32))
    with tf.GradientTape() as tape:
        feature, probabilities = function(x, training=False)
        chosen = _choose(probabilities, class_index)
        score = tf.math.log(tf.gather(probabilities, chosen, axis=1, batch_dims=1) + _EPS)
    grads = tape.gradient(score, feature)
    if grads is None:
        raise ValueError(f"no gradient reaches layer {used}")
    return _cam(feature, grads, x.shape[1:3]), probabilities.numpy().astype(np.float32), used


def gradcam_split(
    to_maps: Any, from_maps: Any, batch: np.ndarray, class_index: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``gradcam`` through a SavedModel's split signatures (``gradcam_maps``, ``gradcam_head``)."""
    import tensorflow as tf

    from brainscan.heatmaps import GRADCAM_MAPS_OUTPUT

    x = tf.convert_to_tensor(np.asarray(batch, np.float32))
    feature = to_maps(**{_input_name(to_maps): x})[GRADCAM_MAPS_OUTPUT]
    with tf.GradientTape() as tape:
        tape.watch(feature)
        probabilities = from_maps(**{_input_name(from_maps): feature})["output_0"]
        chosen = _choose(probabilities, class_index)
        score = tf.math.log(tf.gather(probabilities, chosen, axis=1, batch_dims=1) + _EPS)
    grads = tape.gradient(score, feature)
    if grads is None:
        raise ValueError("no gradient reaches the SavedModel's Grad-CAM map")
    return _cam(feature, grads, x.shape[1:3]), probabilities.numpy().astype(np.float32)


def _input_name(signature: Any) -> str:
    _, kwargs = signature.structured_input_signature
    (name,) = kwargs
    return str(name)


def _cam(feature: Any, grads: Any, size: Any) -> np.ndarray:
    """Channels weighted by their mean gradient, summed, ReLU, upsampled to ``size``, [0, 1]."""
    import tensorflow as tf

    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature, axis=-1))[..., None]
    cam = tf.image.resize(cam, (size[0], size[1]), method="bilinear")[..., 0]
    return _normalise(cam.numpy())


def saliency(
    function: Any,
    input_name: str,
    output_name: str,
    batch: np.ndarray,
    class_index: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient saliency through a SavedModel's serving function: maps ``[n, h, w]`` in [0, 1]."""
    import tensorflow as tf

    x = tf.convert_to_tensor(np.asarray(batch, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        probabilities = function(**{input_name: x})[output_name]
        chosen = _choose(probabilities, class_index)
        score = tf.math.log(tf.gather(probabilities, chosen, axis=1, batch_dims=1) + _EPS)
    grads = tape.gradient(score, x)
    if grads is None:
        raise ValueError("the SavedModel's serving function is not differentiable")
    magnitude = tf.reduce_max(tf.abs(grads), axis=-1, keepdims=True)
    # Raw input gradients are speckled pixel by pixel; a small box blur shows regions instead.
    size = max(3, (int(x.shape[1]) // 32) | 1)
    blurred = tf.nn.avg_pool2d(magnitude, ksize=size, strides=1, padding="SAME")[..., 0]
    return _normalise(blurred.numpy()), probabilities.numpy().astype(np.float32)


def _choose(probabilities: Any, class_index: Sequence[int] | None) -> Any:
    import tensorflow as tf

    if class_index is None:
        return tf.argmax(probabilities, axis=1, output_type=tf.int32)
    return tf.constant(list(class_index), dtype=tf.int32)


# ---- one model folder's explainer --------------------------------------------------------------------
@dataclass
class Explainer:
    """Explains scans for one model folder (``ref``): Grad-CAM from ``model.keras`` or the SavedModel's
    split signatures, else saliency."""

    ref: Any  # brainscan.modelrepo.ModelRef
    kind: str
    model: Any = field(repr=False, default=None)
    module: Any = field(repr=False, default=None)
    signature: tuple[Any, str, str] | None = field(repr=False, default=None)
    split: tuple[Any, Any] | None = field(repr=False, default=None)  # (gradcam_maps, gradcam_head)
    layer: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def label(self) -> str:
        return f"{self.ref.card.name}/{self.ref.card.version}"

    def explain(self, pixels: np.ndarray) -> tuple[np.ndarray, int, float]:
        """Model input ``[h, w, c]`` -> (map ``[h, w]`` in [0, 1], class index in CLASSES, probability)."""
        from brainscan.runtime import class_order

        with self.lock:  # Keras models and tapes are not meant for concurrent calls
            if self.kind == GRADCAM and self.split is not None:
                maps, probabilities = gradcam_split(*self.split, pixels[None])
            elif self.kind == GRADCAM:
                maps, probabilities, self.layer = gradcam(self.model, pixels[None], self.layer)
            else:
                assert self.signature is not None
                maps, probabilities = saliency(*self.signature, pixels[None])
        order = class_order(self.ref.card)  # model output order -> CLASSES order
        in_classes = probabilities[0][order]
        best = int(np.argmax(in_classes))
        return maps[0], best, float(in_classes[best])


def load_explainer(ref: Any) -> Explainer:
    card = ref.card
    keras_file = Path(ref.path) / KERAS_FILE
    if keras_file.is_file():
        import keras

        model = keras.models.load_model(keras_file, compile=False, safe_mode=True)
        layer = getattr(card, "gradcam_layer", None) or None
        return Explainer(ref, GRADCAM, model=model, layer=layer)
    import tensorflow as tf

    from brainscan.heatmaps import GRADCAM_HEAD, GRADCAM_MAPS
    from brainscan.runtime import serving_signature

    module = tf.saved_model.load(str(ref.path))
    signatures = module.signatures
    if GRADCAM_MAPS in signatures and GRADCAM_HEAD in signatures:
        split = (signatures[GRADCAM_MAPS], signatures[GRADCAM_HEAD])
        layer = getattr(card, "gradcam_layer", None) or None
        return Explainer(ref, GRADCAM, module=module, split=split, layer=layer)
    return Explainer(ref, SALIENCY, module=module, signature=serving_signature(module))


_EXPLAINERS: dict[str, Explainer] = {}
_EXPLAINERS_LOCK = threading.Lock()


def current_explainer() -> Explainer:
    """The explainer for the model workers serve now (re-resolved each call: promotions apply)."""
    from brainscan.modelrepo import resolve_model

    settings = get_settings()
    ref = resolve_model(settings.model_dir, settings.model_name, settings.model_version)
    key = str(Path(ref.path).resolve())
    with _EXPLAINERS_LOCK:
        explainer = _EXPLAINERS.get(key)
        if explainer is None:
            from worker.engine import configure_tensorflow

            configure_tensorflow(settings.tf_threads)
            _EXPLAINERS.clear()  # one model's worth of memory: the previous one is not served any more
            explainer = _EXPLAINERS[key] = load_explainer(ref)
            log.info("explainer for %s: %s", explainer.label, explainer.kind)
        return explainer


# ---- rendering ------------------------------------------------------------------------------------
def jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map: values in [0, 1] -> uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255.0).astype(np.uint8)


def overlay_png(
    display: np.ndarray, heat: np.ndarray, text: dict[str, str] | None = None, min_side: int = 256
) -> bytes:
    """The scan in grey with the heatmap in jet over it (alpha grows with the heat), as PNG.

    ``display`` is the scan as the model saw it (uint8, model size, after any crop), so the map lines
    up; small models' overlays are scaled up to ``min_side`` for the eye.
    """
    from PIL import Image, PngImagePlugin

    grey = display.astype(np.float32).mean(axis=-1) if display.ndim == 3 else display.astype(np.float32)
    grey_rgb = np.repeat(grey[..., None], 3, axis=-1)
    alpha = (0.25 + 0.5 * np.clip(heat, 0.0, 1.0))[..., None]
    blended = (1.0 - alpha) * grey_rgb + alpha * jet(heat).astype(np.float32)
    image = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), mode="RGB")
    scale = max(1, int(np.ceil(min_side / max(1, min(image.size)))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def explain_scan(explainer: Explainer, data: bytes, max_pixels: int) -> bytes:
    """Scan bytes -> overlay PNG. Raises ``brainscan.imaging.ScanError`` for an undecodable scan."""
    from brainscan import CLASSES
    from brainscan.imaging import load_pixels, normalize

    spec = explainer.ref.card.input_spec
    display = load_pixels(data, spec, max_pixels)  # the serving path's decode, crop and resize
    pixels = normalize(display, spec.preprocessing).astype(np.float32)
    heat, best, probability = explainer.explain(pixels)
    text = {
        "explainer": explainer.kind,
        "model": explainer.label,
        "class": f"{CLASSES[best]} ({probability:.3f})",
    }
    if explainer.layer:
        text["layer"] = explainer.layer
    return overlay_png(display, heat, text)


# ---- the task -------------------------------------------------------------------------------------
def compute_heatmaps(item_ids: Sequence[int]) -> int:
    """Write the overlay of each item that has a stored scan and no overlay yet; returns how many."""
    from sqlalchemy import select

    from brainscan.db import Item, session_scope
    from brainscan.imaging import ScanError
    from brainscan.storage import ScanStore

    settings = get_settings()
    heatmaps = HeatmapStore(settings.resolved_storage_dir)
    scans = ScanStore(settings.resolved_storage_dir)
    ids = sorted({int(i) for i in item_ids})
    with session_scope() as session:
        rows = session.execute(select(Item.id, Item.sha256).where(Item.id.in_(ids))).all()
    explainer = current_explainer()
    written = 0
    for item_id, sha256 in rows:
        if heatmaps.png_path(item_id).exists():
            continue  # idempotent: a redelivered or repeated request costs nothing
        try:
            if sha256 is None or not scans.exists(sha256):
                raise ScanError("no scan stored for this item")
            heatmaps.write(item_id, explain_scan(explainer, scans.read(sha256), settings.max_image_pixels))
            written += 1
        except ScanError as exc:
            heatmaps.write_failure(item_id, str(exc))
        except Exception as exc:  # one scan must not stop the others, nor the worker
            log.exception("Grad-CAM failed for item %d", item_id)
            heatmaps.write_failure(item_id, f"explanation failed: {type(exc).__name__}")
    for missing in set(ids) - {row.id for row in rows}:
        heatmaps.release_pending(missing)
    return written


@app.task(name=GRADCAM_TASK, ignore_result=True)
def gradcam_task(item_ids: list[int]) -> int:
    """Celery entry point: ``brainscan.gradcam([item ids])``."""
    try:
        ids = [int(i) for i in item_ids]
    except (TypeError, ValueError):
        log.warning("ignoring malformed Grad-CAM message")
        return 0
    return compute_heatmaps(ids)
