"""DilatedNet (Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions") in Keras 3.

Front-end: VGG-16 with pool4 and pool5 removed, conv5 dilated by 2 and fc6 (as a 7x7 conv) by 4, so features
stay at 1/8 resolution; then the context module (3x3 convs dilated 1, 1, 2, 4, 8, 16, 1, and a 1x1), bilinear
upsampling back to the input size and an 8-class softmax. Input: 256x256 RGB scaled to [0, 1].
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from ..classes import LABEL_SETS, NUM_CLASSES, recognise_label_set
from ..preprocessing import Normalization, Pipeline, as_distribution, to_batch
from ..registry import SPECS, Loaded, label_set_of, pipeline_of
from ..training import Schedule
from .base import Predictor

PRESETS: dict[str, dict] = {
    # VGG-16 widths and depths, fc6/fc7 of 4096 (134 M parameters at 8 classes).
    "full": dict(blocks=((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), fc=4096, fc_kernel=7,
                 input_size=(256, 256)),
    "small": dict(blocks=((16, 1), (32, 1), (48, 2), (64, 2), (64, 1)), fc=96, fc_kernel=3,
                  input_size=(256, 256)),
}
CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)

SPEC = SPECS["dilatednet"]
# The Cityscapes app this replaces: `Image.resize((256, 256))` with Pillow's default filter (bicubic for RGB), and
# `tf.image.resize(probabilities, (H, W), "bilinear")` before the arg-max.
REFERENCE_PIPELINE = SPEC.pipeline


def build_model(preset: str = "small", seed: int = 0, classes: int = NUM_CLASSES) -> keras.Model:
    if preset not in PRESETS:
        raise ValueError(f"unknown DilatedNet preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    keras.utils.set_random_seed(seed)
    h, w = p["input_size"]
    inputs = keras.Input((h, w, 3), name="image")  # [N, 256, 256, 3] in [0, 1]
    x = inputs
    for b, (width, depth) in enumerate(p["blocks"]):
        dilation = 2 if b == 4 else 1  # conv5 dilated; no pooling after conv4 and conv5
        for i in range(depth):
            x = layers.Conv2D(width, 3, padding="same", dilation_rate=dilation, activation="relu",
                              name=f"conv{b + 1}_{i + 1}")(x)
        if b < 3:
            x = layers.MaxPooling2D(2, name=f"pool{b + 1}")(x)  # -> 1/8 after pool3
    x = layers.Conv2D(p["fc"], p["fc_kernel"], padding="same", dilation_rate=4, activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Conv2D(p["fc"], 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    x = layers.Conv2D(classes, 1, name="final")(x)  # [N, h/8, w/8, classes] front-end scores
    # The "basic" context module: C = 8 channels throughout, identity-initialised (the paper's key to training it).
    for i, d in enumerate(CONTEXT_DILATIONS):
        x = layers.Conv2D(classes, 3, padding="same", dilation_rate=d, activation="relu", name=f"ctx_conv{i + 1}")(x)
    x = layers.Conv2D(classes, 1, name="ctx_final")(x)
    x = layers.UpSampling2D(8, interpolation="bilinear", name="upsample")(x)  # [N, h, w, 8]
    outputs = layers.Softmax(name="softmax")(x)
    model = keras.Model(inputs, outputs, name=f"dilatednet_{preset}")
    _identity_init_context(model)
    return model


def _identity_init_context(model: keras.Model) -> None:
    """Each context layer starts as the identity map (its kernel's centre tap is the unit matrix, bias 0), so the
    untrained module passes the front-end's scores through unchanged. Set as weights, not as a custom
    initializer, so the saved .keras file holds only built-in objects."""
    for layer in model.layers:
        if layer.name.startswith("ctx_"):
            kernel, bias = layer.get_weights()  # kernel [k, k, C, C]
            k = kernel.shape[0]
            kernel = np.zeros_like(kernel)
            kernel[k // 2, k // 2] = np.eye(kernel.shape[2], kernel.shape[3])
            layer.set_weights([kernel, np.zeros_like(bias)])


def load_keras(path: Path, lean: bool = False) -> keras.Model:
    """A ``.keras`` file. ``compile=False``: custom training losses (dice, ...) are not needed to serve, and
    ``safe_mode`` stays on, so no lambda or pickled code is ever run.

    ``lean=True`` (serving) builds the layers with zero initialisers and then loads the weights: drawing random
    initial values first costs a second copy of the weights that TensorFlow's oneDNN allocator keeps for the life
    of the process (hundreds of MB for the ``full`` preset). A lean model's config names those Zeros
    initialisers, so it is for inference; import a user's file with ``lean=False`` to store it as it came."""
    if path.suffix != ".keras":
        raise ValueError(f"a DilatedNet artifact must be a .keras file, got {path.name!r}")
    if not lean:
        model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    else:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        model = keras.saving.deserialize_keras_object(_zero_initialisers(config), safe_mode=True)
        model.load_weights(str(path))
    check_signature(model)
    return model


_ZEROS = {"module": "keras.initializers", "class_name": "Zeros", "config": {}, "registered_name": None}


def _zero_initialisers(config):
    """``config`` (a saved model's JSON) with every ``*_initializer`` replaced by Zeros."""
    if isinstance(config, dict):
        return {k: _ZEROS if k.endswith("_initializer") and v is not None else _zero_initialisers(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [_zero_initialisers(v) for v in config]
    return config


def check_signature(model: keras.Model) -> tuple[int, int]:
    """The model must take (N, h, w, 3) and give (N, h, w, K) class scores at its input size, K its classes (8
    superclasses, or a Cityscapes label set: segmentation.classes.LABEL_SETS). Returns (h, w)."""
    ins, outs = tuple(model.input_shape), tuple(model.output_shape)
    if len(ins) != 4 or ins[-1] != 3 or ins[1] is None or ins[2] is None:
        raise ValueError(f"DilatedNet must take a fixed-size (N, h, w, 3) RGB batch; this model takes {ins}")
    if len(outs) != 4 or outs[1:3] != ins[1:3] or not 2 <= (outs[-1] or 0) <= 255:
        raise ValueError(f"DilatedNet must output (N, h, w, classes) at its input size; this model outputs {outs}")
    return int(ins[1]), int(ins[2])


def mixed_bfloat16(model: keras.Model) -> keras.Model:
    """Switch ``model``'s feature layers, in place, to compute in bfloat16 (Keras' ``mixed_bfloat16`` policy:
    the weights stay the same fp32 variables, so nothing is copied) while the class-score layers (those with at
    most as many output channels as the model has classes: the final and context convolutions, the upsampling,
    the softmax) stay in fp32. About 2x the forward rate on a CPU with AVX512_BF16. Returns ``model``."""
    for layer in model.layers:
        channels = getattr(getattr(layer, "output", None), "shape", None) or (None,)
        if channels[-1] is not None and channels[-1] > model.output_shape[-1]:
            layer.dtype_policy = "mixed_bfloat16"
    return model


def copied(model: keras.Model) -> keras.Model:
    """A separate model with the same layers and weights: to run one model in two precisions side by side."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


class DilatedNetPredictor(Predictor):
    name = "dilatednet"
    num_classes = NUM_CLASSES

    def __init__(
        self,
        model: keras.Model,
        norm: Normalization = Normalization(),
        precision: str = "fp32",
        pipeline: Pipeline = REFERENCE_PIPELINE,
        input_size: tuple[int, int] | None = None,
    ):
        self.norm = norm
        self.pipeline = pipeline
        self.precision = self.checked_precision(precision)
        if model is None:  # a shell: a compiled runtime will run the forward (segmentation/runtimes.py)
            self.model, self._infer, self.input_size = None, None, tuple(input_size)
            return
        import tensorflow as tf

        self.input_size = check_signature(model)
        # bf16 switches the model's own layers (see mixed_bfloat16): the predictor owns the model it is given.
        self.model = mixed_bfloat16(model) if self.precision == "bf16" else model
        run = self.model
        # One traced graph, called directly: `model.predict` costs a large fixed overhead per call.
        self._infer = tf.function(lambda x: run(x, training=False), reduce_retracing=True)

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        return to_batch(images, self.input_size, self.norm, self.pipeline.resize)  # [N, h, w, 3] float32

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self._infer(batch).numpy()  # [N, h, w, 8] float32 probabilities

    def exportable(self) -> keras.Model:
        if self.precision != "fp32":
            raise ValueError("a compiled runtime is converted from the fp32 model")
        return self.model

    def outputs(self, probs: np.ndarray) -> list[np.ndarray]:
        if self.pipeline.upsample == "labels-nearest":
            return list(np.argmax(probs, axis=-1).astype(np.uint8))  # [h, w] each
        return [np.ascontiguousarray(p.transpose(2, 0, 1)) for p in probs]  # [8, h, w] each

    def class_probabilities(self, probs: np.ndarray) -> list[np.ndarray]:
        return [as_distribution(np.ascontiguousarray(p.transpose(2, 0, 1), dtype=np.float32)) for p in probs]


# --- the architecture's side of the store and the import (segmentation.registry.Architecture) -------------------

def save(model: keras.Model, folder: Path, processor=None) -> None:
    model.save(folder / SPEC.artifact)


def load(folder: Path, metadata: dict, precision: str) -> DilatedNetPredictor:
    norm = Normalization.from_dict(metadata.get("normalization"))
    model = load_keras(folder / SPEC.artifact, lean=True)
    predictor = DilatedNetPredictor(model, norm, precision=precision, pipeline=pipeline_of(SPEC.name, metadata))
    return predictor.fold_into(label_set_of(metadata))


def shell(folder: Path, metadata: dict) -> DilatedNetPredictor:
    norm = Normalization.from_dict(metadata.get("normalization"))
    predictor = DilatedNetPredictor(None, norm, pipeline=pipeline_of(SPEC.name, metadata),
                                    input_size=tuple(metadata["input_size"]))
    return predictor.fold_into(label_set_of(metadata))


def _loaded(model: keras.Model, preset: str, pipeline: Pipeline = REFERENCE_PIPELINE, label_set=None) -> Loaded:
    label_set = label_set or LABEL_SETS["superclass"]

    def make(precision: str) -> DilatedNetPredictor:  # bf16 switches layers in place: keep `model` (stored) as it is
        served = copied(model) if precision == "bf16" else model
        return DilatedNetPredictor(served, precision=precision, pipeline=pipeline).fold_into(label_set)

    return Loaded(model, make, check_signature(model), preset, int(model.count_params()), label_set=label_set)


def load_artifact(path: Path, pipeline: Pipeline | None, labels: str | None) -> Loaded:
    model = load_keras(path)
    label_set = recognise_label_set(int(model.output_shape[-1]), None, labels)
    return _loaded(model, "custom", pipeline or REFERENCE_PIPELINE, label_set)


SCHEDULE = Schedule(steps=450, batch_size=8, lr=1e-3)


def fit(model, data, seed: int = 0) -> None:
    import tensorflow as tf

    from ..training import batches, progress, resized

    images, labels = resized(*data, size=tuple(model.input_shape[1:3]))
    x = images.astype(np.float32) / 255.0
    sched = SCHEDULE
    model.compile(optimizer=keras.optimizers.Adam(sched.lr), loss="sparse_categorical_crossentropy")
    with progress("dilatednet", sched.steps) as bar:
        for idx in batches(len(x), sched, seed):
            loss = model.train_on_batch(tf.constant(x[idx]), tf.constant(labels[idx]))
            bar.set_postfix(loss=f"{float(np.asarray(loss).ravel()[0]):.3f}", refresh=False)
            bar.update()


def train_demo(data) -> Loaded:
    model = build_model("small")
    fit(model, data)
    return _loaded(model, "small")


def build_full() -> Loaded:
    return _loaded(build_model("full"), "full")
