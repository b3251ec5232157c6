"""DINOv3 backbones: equal to the official code (facebookresearch/dinov3 at 6876159, vendored), loaded from the three
published checkpoint layouts, refused in one sentence where the file does not fit, tiled, and through the command line.

The official models are built by their own hub functions with random weights and fewer blocks (2; the 7B 1), every
other setting theirs (widths, heads, RoPE, storage tokens, LayerScale, SwiGLU, the key-bias mask): once per module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import run_cli
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.engine.deep import PATCH16_PRESETS, DeepExtractor, input_normalisation
from dinofeat_server.engine.dinov3 import (
    DINOV3_BACKBONES,
    SATELLITE_MEAN,
    SATELLITE_STD,
    Dinov3Config,
    Dinov3VisionTransformer,
)
from dinofeat_server.engine.space import input_range
from dinofeat_server.engine.tiles import tile_plan
from dinofeat_server.engine.weights import check_backbone, file_sha256, load_backbone, resolve_weights
from safetensors.torch import save_file
from tiny_vit import save_official, tiny_model

reference = pytest.importorskip("reference_code")

IMAGE_SIZES = [(64, 64, None), (48, 80, None), (70, 37, None), (40, 56, 4)]
"""(height, width, patch-embedding stride): square, wide, tall with sides not multiples of 16, and HR-Dv2's stride 4."""


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def official():
    """name -> the official model with random weights (built on first use, kept for the module)."""
    built: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in built:
            built[name] = reference.official_dinov3(name, depth=1 if name == "dinov3_vit7b16" else 2)
        return built[name]

    return get


@pytest.fixture(scope="module")
def official_file(official, tmp_path_factory):
    """name -> the official model's state dict saved as an official checkpoint file."""
    folder = tmp_path_factory.mktemp("dinov3")

    def get(name: str) -> Path:
        path = folder / f"{name}_pretrain_lvd1689m-random.pth"
        if not path.exists():
            torch.save(official(name).state_dict(), path)
        return path

    return get


@pytest.mark.parametrize("name", DINOV3_BACKBONES)
def test_patch_tokens_equal_the_official_forward_features(official, name):
    model = load_backbone_from_state(official(name).state_dict(), name)
    for height, width, stride in IMAGE_SIZES:
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        expected = reference.official_dinov3_tokens(official(name), images, stride)
        with torch.no_grad():
            tokens = model(images, stride=stride).patch_tokens
        assert tokens.shape == expected.shape
        assert rel_l2(tokens, expected) <= 1e-5, (name, height, width, stride)


def load_backbone_from_state(state: dict[str, torch.Tensor], name: str) -> Dinov3VisionTransformer:
    from dinofeat_server.engine.dinov3_weights import load_dinov3

    return load_dinov3(Path(f"{name}.pth"), state, name)


def test_cls_attention_is_the_softmax_of_the_official_last_blocks_cls_query_after_rope(official):
    original = official("dinov3_vits16plus")
    model = load_backbone_from_state(original.state_dict(), "dinov3_vits16plus")
    images = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    captured = {}
    attention = original.blocks[-1].attn
    handle = attention.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=args[0], rope=kwargs["rope"]),
                                                 with_kwargs=True)
    with torch.no_grad():
        original.forward_features(images)
        handle.remove()
        b, n, c = captured["x"].shape
        q, k, _ = attention.qkv(captured["x"]).reshape(b, n, 3, attention.num_heads, -1).unbind(2)
        q, k = attention.apply_rope(q.transpose(1, 2), k.transpose(1, 2), captured["rope"])
        expected = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attention.scale, dim=-1)[:, :, 0, 5:].reshape(1, -1, 3, 5)
        maps = model(images, cls_attention=True).cls_attention
    assert maps.shape == (1, 6, 3, 5)
    assert rel_l2(maps, expected) <= 1e-5


def transformers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official state dict under transformers' DINOv3ViTModel names (convert_dinov3_vit_to_hf.py and
    modeling_dinov3_vit.py: q/k/v/o_proj without a key bias, layer_scale*.lambda1, gate/up/down_proj, no RoPE buffer)."""
    swiglu = any(k.endswith("mlp.w1.weight") for k in state)
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if swiglu else {"fc1": "up_proj", "fc2": "down_proj"}
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.mask_token": state["mask_token"][None],
           "embeddings.register_tokens": state["storage_tokens"], "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"],
           "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"]}
    for key, value in state.items():
        match = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if not match:
            continue
        layer, rest = f"layer.{match.group(1)}", match.group(2)
        if rest == "attn.qkv.weight":
            for part, chunk in zip("qkv", value.chunk(3)):
                out[f"{layer}.attention.{part}_proj.weight"] = chunk.clone()
        elif rest == "attn.qkv.bias":
            q, _, v = value.chunk(3)
            out[f"{layer}.attention.q_proj.bias"], out[f"{layer}.attention.v_proj.bias"] = q.clone(), v.clone()
        elif rest.startswith("attn.proj."):
            out[f"{layer}.attention.o_proj.{rest.rsplit('.', 1)[1]}"] = value
        elif rest.startswith(("ls1.", "ls2.")):
            out[f"{layer}.layer_scale{rest[2]}.lambda1"] = value
        elif rest.startswith("mlp."):
            _, name, kind = rest.split(".")
            out[f"{layer}.mlp.{mlp[name]}.{kind}"] = value
        elif rest.startswith(("norm1.", "norm2.")):
            out[f"{layer}.{rest}"] = value
    return out


def timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official state dict under timm's Eva names, as timm's eva.checkpoint_filter_fn makes them for the _qkvb models
    (reg_token, gamma_1/2, q_bias/v_bias, fc1_g/fc1_x/fc2; periods, bias_mask and mask_token dropped)."""
    out = {}
    for key, value in state.items():
        if key.endswith((".periods", ".bias_mask")) or key == "mask_token":
            continue
        if key.endswith("qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
            continue
        key = key.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2").replace("storage_tokens", "reg_token")
        out[key.replace("mlp.w1", "mlp.fc1_g").replace("mlp.w2", "mlp.fc1_x").replace("mlp.w3", "mlp.fc2")] = value
    return out


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus"])
def test_the_official_transformers_and_timm_layouts_give_identical_features(official, official_file, tmp_path, name):
    state = official(name).state_dict()
    hf = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in transformers_layout(state).items()}, str(hf))
    timm = tmp_path / "timm_dinov3.pth"
    torch.save(timm_layout(state), timm)
    images = torch.randn(1, 3, 56, 72, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outputs = [load_backbone(path, name)(images, stride=8) for path in (official_file(name), hf, timm)]
    assert all(torch.equal(out.patch_tokens, outputs[0].patch_tokens) for out in outputs[1:])
    assert rel_l2(outputs[0].patch_tokens, reference.official_dinov3_tokens(official(name), images, 8)) <= 1e-5


def test_a_checkpoint_of_another_size_is_refused_naming_what_was_expected(official_file):
    with pytest.raises(DinofeatError, match=r"^the weights in .* are dinov3_vitb16 \(768 wide, 12 heads, MLP 3072\), but --backbone "
                                            r"names dinov3_vits16 \(384 wide, 6 heads, MLP 1536\); give the dinov3_vits16 checkpoint"):
        load_backbone(official_file("dinov3_vitb16"), "dinov3_vits16")


def test_an_unknown_layout_or_the_other_family_is_refused_in_one_sentence(official_file, tmp_path):
    unknown = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, unknown)
    with pytest.raises(DinofeatError, match=r"is no DINOv3 ViT checkpoint in a known layout \(official, transformers or timm\), "
                                            r"but --backbone names dinov3_vits16 \(384 wide.*\); give that model's file from https://"):
        load_backbone(unknown, "dinov3_vits16")
    dinov2 = save_official(tiny_model(), tmp_path / "dinov2.pth")
    with pytest.raises(DinofeatError, match=r"^.*dinov2\.pth is no DINOv3 ViT checkpoint"):
        load_backbone(dinov2, "dinov3_vits16plus")
    with pytest.raises(DinofeatError, match=r"holds DINOv3 weights, but --backbone names the DINOv2 model dinov2_vits14; "):
        load_backbone(official_file("dinov3_vits16"), "dinov2_vits14")


def test_without_weights_the_refusal_names_the_download_page_and_the_licence(monkeypatch):
    monkeypatch.delenv("DINOFEAT_WEIGHTS", raising=False)
    with pytest.raises(DinofeatError, match=r"^dinov3_vitl16 needs its weights file: DINOv3 weights come under the DINOv3 License, "
                                            r"which each user accepts at https://ai\.meta\.com/resources/models-and-libraries/"
                                            r"dinov3-downloads/ \(or on Hugging Face, facebook/dinov3-vitl16-pretrain-lvd1689m\); "
                                            r"pass the downloaded file with --weights PATH\.$"):
        resolve_weights("dinov3_vitl16")


def test_an_unknown_backbone_lists_the_dinov3_ones_too():
    with pytest.raises(DinofeatError, match=r"unknown backbone 'dinov3_vitx16'; choose one of dinov2_vits14, .*, dinov3_vits16, "
                                            r"dinov3_vits16plus, dinov3_vitb16, dinov3_vitl16, dinov3_vith16plus, dinov3_vit7b16\.$"):
        check_backbone("dinov3_vitx16")


def test_satellite_weights_are_normalised_with_their_own_mean_and_std(official, tmp_path):
    state = official("dinov3_vitl16").state_dict()
    state["local_cls_norm.weight"], state["local_cls_norm.bias"] = torch.ones(1024), torch.zeros(1024)  # as the SAT ViT-L file
    satellite = tmp_path / "vitl.pth"
    torch.save(state, satellite)
    named = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(official("dinov3_vitl16").state_dict(), named)
    lvd = tmp_path / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    torch.save(official("dinov3_vitl16").state_dict(), lvd)
    assert input_normalisation(load_backbone(satellite, "dinov3_vitl16")) == (SATELLITE_MEAN, SATELLITE_STD)
    assert input_normalisation(load_backbone(named, "dinov3_vitl16")) == (SATELLITE_MEAN, SATELLITE_STD)
    assert input_normalisation(load_backbone(lvd, "dinov3_vitl16")) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_the_7b_backbone_is_refused_on_a_cpu_in_one_sentence():
    shallow_7b = Dinov3VisionTransformer(Dinov3Config(dim=4096, depth=0, heads=32, mlp_hidden=8192, swiglu=True))
    with pytest.raises(DinofeatError, match=r"^the DINOv3 7B backbone runs on GPU servers only .*; start it with --device cuda"):
        DeepExtractor(shallow_7b, torch.device("cpu"))


def test_tiles_take_their_window_of_the_whole_images_rope_positions_and_agree_with_untiled(official):
    model = load_backbone_from_state(official("dinov3_vits16").state_dict(), "dinov3_vits16")
    image = np.random.default_rng(0).random((300, 330)).astype(np.float32)
    spec = PATCH16_PRESETS["fast"]
    whole = DeepExtractor(model, torch.device("cpu")).features(image, spec)
    small = DeepExtractor(model, torch.device("cpu"), budget_bytes=120 << 20)
    edge, _ = small.plan(300, 330, spec, 384)
    assert len(tile_plan(300, 330, edge, align=spec.stride)) >= 4
    cosine = F.cosine_similarity(small.features(image, spec), whole, dim=0)
    assert cosine.mean() > 0.99 and cosine.min() > 0.9  # the DINOv2 tiles' thresholds (test_dinov2_engine)


def test_features_command_with_a_dinov3_backbone_equals_the_engine(official_file, tmp_path):
    weights = official_file("dinov3_vits16")
    image = (np.random.default_rng(7).random((90, 110)) * 255).astype(np.uint8)  # sides not multiples of 16
    tifffile.imwrite(tmp_path / "cells.tif", image)
    result = run_cli("features", str(tmp_path / "cells.tif"), "-o", str(tmp_path / "f.h5"), "--set", "dinov2",
                     "--backbone", "dinov3_vits16", "--weights", str(weights), "--preset", "fast")
    assert result.returncode == 0, result.stderr
    low, high = input_range([image])
    scaled = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    expected = DeepExtractor(load_backbone(weights, "dinov3_vits16"), torch.device("cpu")).features(scaled, PATCH16_PRESETS["fast"])
    with h5py.File(tmp_path / "f.h5", "r") as f:
        ds = f["features"]
        assert ds.shape == (384, 90, 110) and ds.attrs["backbone"] == "dinov3_vits16"
        assert ds.attrs["weights_sha256"] == file_sha256(weights)
        spec = json.loads(ds.attrs["feature_set"])
        assert spec["stride"] == 16 and spec["upsampler"] == "joint_bilateral"
        np.testing.assert_allclose(ds[()], expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def vits16plus_server(official_file):
    """An in-process server whose dinov3_vits16plus holds the official model's random weights."""
    from conftest import in_process

    yield from in_process(weights={"dinov3_vits16plus": str(official_file("dinov3_vits16plus"))})


def test_paper_preset_with_dinov3_through_the_client_equals_hr_dv2s_dinov3_path(official_file, vits16plus_server, tmp_path):
    """17 views at stride 4 (paper_flips' 68 agree as closely: 1.9e-7 measured, left out for time)."""
    preset = "paper"
    net = reference.hr_dv2_dinov3_featuriser(official_file("dinov3_vits16plus"), depth=2)
    grey = (np.random.default_rng(11).random((48, 64)) * 200 + 30).astype(np.uint8)
    expected = reference.hr_dv2_features(net, grey)
    with vits16plus_server.client() as client:
        client.fetch_features(grey, tmp_path / "paper.h5", "dinov2", backbone="dinov3_vits16plus", preset=preset)
    with h5py.File(tmp_path / "paper.h5", "r") as f:
        ours = torch.from_numpy(f["features"][()])[None]
        assert json.loads(f["features"].attrs["feature_set"])["stride"] == 4
    assert rel_l2(ours, expected) <= 1e-5


def test_attention_set_with_dinov3_has_one_channel_per_head_through_the_client(vits16plus_server, tmp_path):
    grey = (np.random.default_rng(12).random((50, 70)) * 255).astype(np.uint8)
    with vits16plus_server.client() as client:
        client.fetch_features(grey, tmp_path / "attention.h5", "attention", backbone="dinov3_vits16plus", preset="fast")
    with h5py.File(tmp_path / "attention.h5", "r") as f:
        assert list(f["features"].attrs["channel_names"]) == [f"attn_h{h}" for h in range(6)]
        maps = f["features"][()]
    assert maps.shape == (6, 50, 70) and (maps >= 0).all() and (maps <= 1).all()


def test_a_dinov2_space_is_refused_on_dinov3_features_through_its_identity(official_file, tiny_weights, tmp_path):
    """A model or feature file of DINOv2 features (--like) cannot express DINOv3 features: the server's check of the
    space's identity names the backbone each was computed with."""
    from conftest import InProcessServer
    from dinofeat_client.spaces import read_space

    grey = (np.random.default_rng(13).random((40, 48)) * 255).astype(np.uint8)
    server = InProcessServer(weights={"dinov2_vits14": str(tiny_weights), "dinov3_vits16": str(official_file("dinov3_vits16"))})
    try:
        with server.client() as client:
            client.fetch_features(grey, tmp_path / "v2.h5", "dinov2", backbone="dinov2_vits14", preset="fast", pca=4)
            with pytest.raises(DinofeatError, match=r"--backbone dinov2_vits14, not dinov3_vits16"):
                client.fetch_features(grey, tmp_path / "v3.h5", "dinov2", backbone="dinov3_vits16", preset="fast", pca=4,
                                      like=read_space(tmp_path / "v2.h5"))
    finally:
        server.stop()
    assert not (tmp_path / "v3.h5").exists()
