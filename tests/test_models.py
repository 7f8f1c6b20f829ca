"""The three architectures on small random weights: structure, loading, and batch invariance."""

import numpy as np
import pytest

from segmentation.scenes import generate_scene

SCENES = [generate_scene(s, h, w)[0] for s, (h, w) in zip(range(3), [(96, 200), (120, 120), (64, 250)])]


def assert_batch_invariant(predictor):
    together = predictor.predict(SCENES).labels
    for img, labels in zip(SCENES, together):
        assert labels.shape == img.shape[:2] and labels.dtype == np.uint8
        (alone,) = predictor.predict([img]).labels
        assert np.array_equal(alone, labels)


# --- UNet ----------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def test_unet_full_is_the_reference_layout():
    from segmentation.models.unet import PRESETS, UNet

    model = UNet(PRESETS["full"])
    sd = model.state_dict()
    assert [sd["inc.0.weight"].shape[0]] + [sd[f"downs.{i}.0.weight"].shape[0] for i in range(4)] == [
        32,
        64,
        128,
        256,
        512,
    ]
    # up blocks take deep + skip channels: 512+256 -> 256, 256+128 -> 128, 128+64 -> 64, 64+32 -> 32
    assert [tuple(sd[f"ups.{i}.conv.0.weight"].shape[:2]) for i in range(4)] == [
        (256, 768),
        (128, 384),
        (64, 192),
        (32, 96),
    ]
    assert [u.dropout.p for u in model.ups] == [0.3, 0.2, 0.1, 0.0]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(n.affine for n in norms)
    assert model(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 256, 256)


def test_unet_predicts_in_eval_mode_even_if_left_in_training_mode():
    from segmentation.models.unet import PRESETS, UNet, UNetPredictor

    torch.manual_seed(0)
    model = UNet(PRESETS["small"]).train()
    p = UNetPredictor(model)
    a, b = p.predict(SCENES[:1]).labels[0], p.predict(SCENES[:1]).labels[0]
    assert np.array_equal(a, b) and set(np.unique(a)) <= {0, 1}
    assert_batch_invariant(p)


@pytest.mark.parametrize("fmt", ["plain.pth", "wrapped.pt", "weights.safetensors"])
def test_unet_checkpoint_formats_load_the_same_weights(tmp_path, fmt):
    from safetensors.torch import save_file

    from segmentation.models.unet import PRESETS, UNet, load_state_dict, read_state_dict

    model = UNet(PRESETS["small"])
    sd = model.state_dict()
    path = tmp_path / fmt
    if fmt.startswith("plain"):
        torch.save(sd, path)
    elif fmt.startswith("wrapped"):
        torch.save({"model_state_dict": sd, "epoch": 3}, path)
    else:
        save_file(sd, str(path))
    loaded = load_state_dict(read_state_dict(path))
    assert loaded.widths == PRESETS["small"] and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k])


class _Payload:
    """Unpickling this calls open(marker, "w"): if the file appears, code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unet_checkpoint_with_code_is_never_unpickled(tmp_path):
    from segmentation.models.unet import read_state_dict

    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"model_state_dict": {"inc.0.weight": _Payload(marker)}}, path)
    with pytest.raises(Exception, match="(?i)weights.only"):
        read_state_dict(path)
    assert not marker.exists()


def test_unet_shape_mismatch_names_the_keys():
    from segmentation.models.unet import PRESETS, UNet, load_state_dict

    sd = UNet(PRESETS["small"]).state_dict()
    sd["outc.weight"] = torch.zeros(2, 8, 1, 1)
    with pytest.raises(RuntimeError, match="outc.weight"):
        load_state_dict(sd)


def test_unet_rejects_other_architectures():
    from segmentation.models.unet import widths_from_state_dict

    with pytest.raises(ValueError, match="not a UNet checkpoint"):
        widths_from_state_dict({"conv1.weight": torch.zeros(1)})


# --- DilatedNet ----------------------------------------------------------------------------------------------


def test_dilatednet_front_end_and_context_module():
    from segmentation.models.dilatednet import CONTEXT_DILATIONS, build_model

    m = build_model("small")
    assert m.input_shape == (None, 256, 256, 3) and m.output_shape == (None, 256, 256, 8)
    by_name = {layer.name: layer for layer in m.layers}
    assert by_name["conv5_1"].dilation_rate == (2, 2) and by_name["fc6"].dilation_rate == (4, 4)
    assert [by_name[f"ctx_conv{i + 1}"].dilation_rate[0] for i in range(7)] == list(CONTEXT_DILATIONS)
    assert "pool4" not in by_name and "pool5" not in by_name  # features stay at 1/8
    # identity-initialised context: with the front-end's scores in, the same scores come out (where positive)
    k, _ = by_name["ctx_conv3"].get_weights()
    assert np.array_equal(k[1, 1], np.eye(8)) and not k[0].any()


def test_dilatednet_full_is_vgg16_sized():
    from segmentation.models.dilatednet import build_model

    assert 130e6 < build_model("full").count_params() < 140e6


def test_dilatednet_keras_file_compiled_with_custom_losses_loads(tmp_path):
    import keras
    import tensorflow as tf

    from segmentation.models.dilatednet import DilatedNetPredictor, build_model, load_keras

    def dice_coef(y_true, y_pred):
        return tf.reduce_mean(y_pred)

    def dice_ce_loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred) - dice_coef(y_true, y_pred)

    m = build_model("small")
    m.compile(optimizer="adam", loss=dice_ce_loss, metrics=[dice_coef])
    path = tmp_path / "dilatednet.keras"
    m.save(path)
    with pytest.raises(Exception, match="dice"):  # what users hit with a plain load_model
        keras.models.load_model(path)
    p = DilatedNetPredictor(load_keras(path))
    assert np.array_equal(p.predict(SCENES[:1]).labels[0], DilatedNetPredictor(m).predict(SCENES[:1]).labels[0])
    assert_batch_invariant(p)


def test_dilatednet_lean_load_gives_the_same_weights_and_labels(tmp_path):
    from segmentation.models.dilatednet import DilatedNetPredictor, build_model, load_keras

    path = tmp_path / "dilatednet.keras"
    build_model("small", seed=3).save(path)
    full, lean = load_keras(path), load_keras(path, lean=True)
    assert all(np.array_equal(a, b) for a, b in zip(full.get_weights(), lean.get_weights()))
    assert np.array_equal(
        DilatedNetPredictor(full).predict(SCENES[:1]).labels[0], DilatedNetPredictor(lean).predict(SCENES[:1]).labels[0]
    )


def test_dilatednet_rejects_a_model_of_the_wrong_shape(tmp_path):
    import keras

    from segmentation.models.dilatednet import load_keras

    inp = keras.Input((64, 64, 3))
    m = keras.Model(inp, keras.layers.Conv2D(8, 2, strides=2)(inp))  # scores at half the input size
    path = tmp_path / "other.keras"
    m.save(path)
    with pytest.raises(ValueError, match="must output"):
        load_keras(path)


# --- Mask2Former ---------------------------------------------------------------------------------------------


def test_mask2former_configs():
    from segmentation.classes import CLASS_NAMES
    from segmentation.models.mask2former import build_config

    full, small = build_config("full"), build_config("small")
    assert full.backbone_config.model_type == "swin" and full.backbone_config.depths == [2, 2, 18, 2]
    assert full.backbone_config.embed_dim == 96 and full.num_queries == 100
    assert full.id2label == dict(enumerate(CLASS_NAMES)) and small.id2label == full.id2label
    with pytest.raises(ValueError, match="expected one of"):
        build_config("huge")


def test_mask2former_round_trips_through_save_pretrained(tmp_path):
    from segmentation.models.mask2former import Mask2FormerPredictor, build_model, build_processor, load_pretrained

    model, proc = build_model("small"), build_processor((128, 128))
    model.save_pretrained(tmp_path, safe_serialization=True)
    proc.save_pretrained(tmp_path)
    before = Mask2FormerPredictor(model, proc)
    after = Mask2FormerPredictor(*load_pretrained(tmp_path))
    assert after.input_size == (128, 128)
    for a, b in zip(before.predict(SCENES).labels, after.predict(SCENES).labels):
        assert np.array_equal(a, b)
    assert_batch_invariant(after)


def _mask2former_outputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(2, 16, 9), torch.randn(2, 16, 32, 32) * 4  # class logits, mask logits


def _transformers_semantic_maps(class_logits, mask_logits, sizes) -> list[np.ndarray]:
    from types import SimpleNamespace

    from segmentation.models.mask2former import build_processor

    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    return [
        m.numpy() for m in build_processor((128, 128)).post_process_semantic_segmentation(outputs, target_sizes=sizes)
    ]


def _spy_on_the_shortcut(monkeypatch) -> list:
    """The labels upsampled_argmax gives semantic_maps (None where it declined)."""
    from segmentation.models import mask2former

    answers, real = [], mask2former.upsampled_argmax
    monkeypatch.setattr(mask2former, "upsampled_argmax", lambda *a: answers.append(real(*a)) or answers[-1])
    return answers


def test_mask2former_postprocess_gives_transformers_labels_exactly(monkeypatch):
    from segmentation.models.mask2former import semantic_maps

    shortcut = _spy_on_the_shortcut(monkeypatch)
    class_logits, mask_logits = _mask2former_outputs()
    sizes = [(300, 700), (97, 131)]
    ours = semantic_maps(class_logits, mask_logits, sizes)
    assert len(shortcut) == 2 and all(labels is not None for labels in shortcut)
    for a, b, size in zip(ours, _transformers_semantic_maps(class_logits, mask_logits, sizes), sizes):
        assert a.shape == size and a.dtype == np.uint8
        assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 2])
def test_mask2former_postprocess_on_a_photo_differs_from_transformers_only_at_exact_ties(seed, monkeypatch):
    """At 2048x1024, a pixel or two per image has two classes within a float32 rounding step of each other (the
    scores' last bit decides, and differs between PyTorch's own channels-last and planar kernels too). Every
    other pixel gets transformers' label."""
    from torch.nn import functional as F

    from segmentation.models.mask2former import REFERENCE_MASK_SIZE, semantic_maps

    shortcut = _spy_on_the_shortcut(monkeypatch)
    class_logits, mask_logits = _mask2former_outputs(seed)
    sizes = [(1024, 2048)] * 2
    ours = semantic_maps(class_logits, mask_logits, sizes)
    assert len(shortcut) == 2 and all(labels is not None for labels in shortcut)
    theirs = _transformers_semantic_maps(class_logits, mask_logits, sizes)
    # transformers' own full-size class scores, to find the near-ties
    masks = F.interpolate(mask_logits, size=REFERENCE_MASK_SIZE, mode="bilinear", align_corners=False).sigmoid()
    scores = torch.einsum("bqc, bqhw -> bchw", class_logits.softmax(dim=-1)[..., :-1], masks)
    best_two = F.interpolate(scores, size=sizes[0], mode="bilinear", align_corners=False).topk(2, dim=1).values
    clear = (best_two[:, 0] - best_two[:, 1] > 1e-6).numpy()
    for a, b, c in zip(ours, theirs, clear):
        assert (~c).sum() < 100  # the comparison covers all but a handful of pixels
        assert np.array_equal(a[c], b[c])


def test_mask2former_steps_run_by_the_gateway_give_the_processors_pixels_and_transformers_labels():
    """A processor that resizes to a fixed size with Pillow's bilinear filter: the gateway's resize then the
    processor give the processor's own pixel values (a photo-sized image is resized in bands), and the class scores
    the model process sends back (summarised) give transformers' labels once the gateway finishes them."""
    from segmentation.models.mask2former import Mask2FormerPredictor, build_processor, processor_pipeline, semantic_maps
    from segmentation.preprocessing import Pipeline, compact_scores, labels_at, resize_rgb

    processor = build_processor((128, 128))
    pipeline = processor_pipeline(processor)
    assert pipeline == Pipeline("bilinear", "scores-bilinear")
    photo = np.random.default_rng(1).integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    for image in (photo, SCENES[0]):
        resized = resize_rgb(image, (128, 128), pipeline.resize)
        assert torch.equal(processor(images=[resized], return_tensors="pt")["pixel_values"],
                           processor(images=[image], return_tensors="pt")["pixel_values"])
    class_logits, mask_logits = _mask2former_outputs()
    sizes = [(300, 700), (97, 131)]
    scores = Mask2FormerPredictor(None, processor).outputs((class_logits, mask_logits))
    for answer, expected, size in zip(scores, semantic_maps(class_logits, mask_logits, sizes), sizes):
        assert np.array_equal(labels_at(compact_scores(answer), size), expected)


@pytest.mark.parametrize("settings", [
    {"size": {"shortest_edge": 384, "longest_edge": 768}},  # the size follows each photo's aspect
    {"size": {"height": 100, "width": 100}, "size_divisor": 32},  # rounded up to 128
    {"resample": 3},  # bicubic
    {"do_resize": False},
])
def test_mask2former_processors_the_gateway_cannot_match_keep_their_steps_in_the_model(settings):
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from segmentation.models.mask2former import processor_pipeline

    processor = Mask2FormerImageProcessorPil(**{"size": {"height": 128, "width": 128}, **settings})
    assert processor_pipeline(processor) is None


def test_mask2former_postprocess_keeps_one_mask_buffer_and_every_answer_its_own():
    """The resized masks go into a buffer kept between calls (grown when a call needs more, used in part when it
    needs less, inside inference mode or not): the labels of every call are still transformers' and stay as they
    were after later calls."""
    from segmentation.models.mask2former import semantic_maps

    torch.manual_seed(3)
    calls = [
        (torch.randn(1, 16, 9), torch.randn(1, 16, 32, 32) * 4),
        (torch.randn(2, 24, 9), torch.randn(2, 24, 40, 40) * 4),
        (torch.randn(1, 8, 9), torch.randn(1, 8, 24, 24) * 4),
    ]
    answers = []
    for k, (class_logits, mask_logits) in enumerate(calls):
        sizes = [(97, 131)] * len(class_logits)
        with torch.inference_mode(k == 1):
            answers.append(
                (
                    [a.copy() for a in semantic_maps(class_logits, mask_logits, sizes)],
                    semantic_maps(class_logits, mask_logits, sizes),
                )
            )
    for (before, after), (class_logits, mask_logits) in zip(answers, calls):
        theirs = _transformers_semantic_maps(class_logits, mask_logits, [(97, 131)] * len(class_logits))
        for a, b, t in zip(before, after, theirs):
            assert np.array_equal(a, t) and np.array_equal(b, t)


# --- bf16 paths (need a CPU with native bfloat16) --------------------------------------------------------


def _bf16_cpu():
    from segmentation.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bfloat16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_unet_lanes_split_a_batch_over_single_threaded_forwards_with_the_same_numbers(precision, monkeypatch):
    if precision == "bf16":
        _bf16_cpu()
    import threading

    from segmentation.models.unet import PRESETS, UNet, UNetPredictor

    torch.manual_seed(0)
    p = UNetPredictor(UNet(PRESETS["small"]), precision=precision)
    batch = p.preprocess(SCENES)  # 3 images: shares of 2 and 1
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one_forward = p.forward(batch)
        p.use_lanes(2)
        seen, run = [], p._forward  # (thread, images, torch threads) per forward call

        def recorded(b):
            seen.append((threading.current_thread().name, len(b), torch.get_num_threads()))
            return run(b)

        monkeypatch.setattr(p, "_forward", recorded)
        in_lanes = p.forward(batch)
        assert sorted(n for _, n, _ in seen) == [1, 2] and len({name for name, _, _ in seen}) == 2
        assert all(name.startswith("unet-lane") and t == 1 for name, _, t in seen)
        assert torch.get_num_threads() == 2  # given back after the batch
        # bf16 (as served): the same numbers; fp32: within float rounding (as between a batch and a lone image)
        assert (
            np.array_equal(in_lanes, one_forward)
            if precision == "bf16"
            else np.allclose(in_lanes, one_forward, atol=1e-6)
        )
        labels = p.predict(SCENES).labels
        p.use_lanes(1)
        assert all(np.array_equal(a, b) for a, b in zip(labels, p.predict(SCENES).labels))
        p.use_lanes(2)
        seen.clear()
        assert np.allclose(p.forward(batch[:1]), one_forward[:1], atol=1e-6)
        assert len(seen) == 1 and seen[0][2] == 2  # a lone image: one forward with every thread
    finally:
        torch.set_num_threads(threads)


def test_unet_bf16_predicts_the_same_shapes_batch_invariantly():
    _bf16_cpu()
    from segmentation.models.unet import PRESETS, UNet, UNetPredictor

    torch.manual_seed(0)
    p = UNetPredictor(UNet(PRESETS["small"]), precision="bf16")
    assert_batch_invariant(p)


def test_dilatednet_bf16_runs_the_features_in_bfloat16_and_the_scores_in_float32():
    _bf16_cpu()
    from segmentation.models.dilatednet import DilatedNetPredictor, build_model

    model = build_model("small")
    weights = [id(w) for w in model.weights]
    p = DilatedNetPredictor(model, precision="bf16")
    policies = {layer.name: layer.dtype_policy.name for layer in p.model.layers}
    assert policies["conv1_1"] == "mixed_bfloat16" and policies["fc6"] == "mixed_bfloat16"
    assert policies["final"] == policies["ctx_final"] == policies["softmax"] == "float32"
    assert [id(w) for w in p.model.weights] == weights and p.model.weights[0].dtype == "float32"  # no copy
    assert_batch_invariant(p)


def test_dilatednet_copied_model_leaves_the_original_in_fp32():
    _bf16_cpu()
    from segmentation.models.dilatednet import DilatedNetPredictor, build_model, copied

    model = build_model("small")
    fp32, bf16 = DilatedNetPredictor(model), DilatedNetPredictor(copied(model), precision="bf16")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), bf16.model.get_weights()))
    assert fp32.model is model and bf16.model is not model


def test_unknown_precision_is_refused():
    from segmentation.models.unet import PRESETS, UNet, UNetPredictor

    with pytest.raises(ValueError, match="precision must be one of"):
        UNetPredictor(UNet(PRESETS["small"]), precision="int8")
