"""The DINOv2 engine on a tiny random-weight model of the real architecture (no network, no GPU)."""

from __future__ import annotations

import http.server
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.engine import weights as weights_module
from dinofeat_server.engine.backbone import imagenet_normalised, token_grid
from dinofeat_server.engine.deep import (
    PRESETS,
    DeepExtractor,
    estimated_bytes,
    tile_plan,
)
from dinofeat_server.engine.postprocess import fit_pca, l2_per_pixel
from dinofeat_server.engine.upsample import (
    TokenPlacement,
    bilinear,
    joint_bilateral,
    nearest,
)
from dinofeat_server.engine.views import (
    ViewSpec,
    aligned_views,
    view_ensemble,
    view_placement,
)
from dinofeat_server.engine.weights import load_backbone, official_url, resolve_weights
from tiny_vit import save_hugging_face, save_official, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
@pytest.mark.parametrize("layout", ["official.pth", "hf.safetensors", "hf.bin"])
def test_weights_load_through_both_layouts_to_identical_outputs(tmp_path, registers, swiglu, layout):
    original = tiny_model(registers, swiglu)
    path = tmp_path / layout
    (save_official if layout.startswith("official") else save_hugging_face)(original, path)
    loaded = load_backbone(path)
    assert loaded.config == original.config
    x = torch.randn(1, 3, 56, 70)
    torch.testing.assert_close(loaded(x, stride=7).patch_tokens, original(x, stride=7).patch_tokens, rtol=0, atol=0)


def reference_forward(model, images: torch.Tensor) -> torch.Tensor:
    """Patchify by unfold, explicit softmax attention, no interpolation (518 px = the 37x37 grid)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    b = images.shape[0]
    patches = F.unfold(images.double(), 14, stride=14).transpose(1, 2)  # (B, 1369, 3*14*14)
    x = patches @ sd["patch_embed.proj.weight"].reshape(model.config.dim, -1).T + sd["patch_embed.proj.bias"]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    heads = model.config.heads
    for i in range(model.config.depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (x.shape[-1],), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, -1, x.shape[-1]) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + a * sd[p + "ls1.gamma"]
        h = F.layer_norm(x, (x.shape[-1],), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + h * sd[p + "ls2.gamma"]
    x = F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 1:].transpose(1, 2).reshape(b, -1, 37, 37)


def test_stride_14_single_view_equals_a_straightforward_reference_forward(model):
    images = torch.randn(1, 3, 518, 518)
    ours = model(images).patch_tokens
    torch.testing.assert_close(ours.double(), reference_forward(model, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [14, 7, 4, 2])
def test_reduced_stride_gives_one_plus_size_minus_14_over_stride_tokens(model, stride):
    out = model(torch.randn(1, 3, 60, 45), stride=stride).patch_tokens
    assert out.shape[-2:] == (1 + (60 - 14) // stride, 1 + (45 - 14) // stride)
    assert token_grid(60, 14, stride) == out.shape[-2]


def official_interpolation(pos_embed: torch.Tensor, h0: int, w0: int, registers: bool) -> torch.Tensor:
    """The official interpolate_pos_encoding for a square image, written out from its definition."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if h0 * w0 == n and h0 == w0:
        return pos_embed.float()
    patch = pos_embed.float()[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if registers:  # interpolate_offset = 0, interpolate_antialias = True
        patch = F.interpolate(patch, mode="bicubic", antialias=True, size=(h0, w0))
    else:  # offset 0.1, scale factor, no antialias
        patch = F.interpolate(patch, mode="bicubic", antialias=False, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m))
    return torch.cat([pos_embed[:, :1].float(), patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("grid", [(37, 37), (20, 31), (129, 70)])
def test_position_embedding_interpolation_follows_the_official_formula(registers, grid):
    model = tiny_model(registers)
    expected = official_interpolation(model.pos_embed.detach(), *grid, registers=bool(registers))
    torch.testing.assert_close(model.interpolated_pos_embed(*grid).detach(), expected, rtol=0, atol=0)


def paper_reference(model, image: torch.Tensor, stride: int, flips: bool) -> torch.Tensor:
    """Loop-based reading of the paper's view ensemble, one view at a time: views flip(roll(x)), undone
    as flip(roll(y)) in the reference's order (the real reference is compared in test_reference_fidelity)."""
    shifts = [(0, 0)]
    for d in (1, 2):
        for uy, ux in [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]:
            shifts.append((d * uy, d * ux))
    flip_set = [[], [-1], [], [-2]] if flips else [[]]
    h, w = image.shape[-2:]
    mean, n = torch.zeros(1), 0
    for dims in flip_set:
        for dy, dx in shifts:
            view = torch.roll(image, (dy, dx), (-2, -1))
            view = torch.flip(view, dims) if dims else view
            feats = model(view, stride=stride).patch_tokens
            feats = F.interpolate(feats, size=(h, w), mode="nearest-exact")
            feats = torch.roll(feats, (-dy, -dx), (-2, -1))
            feats = torch.flip(feats, dims) if dims else feats
            n += 1
            mean = feats if n == 1 else mean + (feats - mean) / n
    return mean


@pytest.mark.parametrize("flips", [False, True])
def test_paper_mode_equals_a_loop_based_reference(model, flips):
    image = imagenet_normalised(torch.rand(1, 3, 42, 50))
    spec = PRESETS["paper_flips" if flips else "paper"]
    assert spec.view_count() == (68 if flips else 17)
    with torch.inference_mode():
        ours = view_ensemble(model, image, image[:, :1], spec, "tokens", batch=5)
        reference = paper_reference(model, image, 4, flips)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_bilinear_places_each_token_at_its_pixel_centre():
    stride, offset = 4, 6.5  # patch 14: the centre of token 0 is pixel 6.5
    rows = torch.arange(10, dtype=torch.float32) * stride + offset  # each token holds its centre's row
    tokens = rows.view(1, 1, 10, 1).expand(1, 1, 10, 3).contiguous()
    out = bilinear(tokens, TokenPlacement(stride, offset, offset), (50, 5))
    inside = torch.arange(7, 43)  # between the first and last centres
    torch.testing.assert_close(out[0, 0, inside, 0], inside.float())
    assert out[0, 0, 0, 0] == offset and out[0, 0, 49, 0] == rows[-1]


def test_nearest_takes_the_closest_token_centre():
    tokens = torch.arange(5, dtype=torch.float32).view(1, 1, 1, 5)
    out = nearest(tokens, TokenPlacement(14, 6.5, 6.5), (1, 70))
    assert out[0, 0, 0, :14].eq(0).all() and out[0, 0, 0, 14:28].eq(1).all()


def test_joint_bilateral_keeps_a_sharp_step_edge_of_the_guide_that_bilinear_blurs():
    width, stride = 140, 14
    guide = torch.zeros(1, 1, 20, width)
    guide[..., 66:] = 1.0  # the edge falls inside token 4 (pixels 56..69)
    placement = TokenPlacement(stride, 6.5, 6.5)
    centres = 6.5 + stride * torch.arange(10)
    tokens = (centres >= 66).float().view(1, 1, 1, 10).expand(1, 1, 2, 10).contiguous()
    placement = TokenPlacement(stride, 6.5, 6.5)
    ideal = guide[0, 0, 0]
    jbu = joint_bilateral(tokens, TokenPlacement(stride, 6.5, 6.5), (20, width), guide)[0, 0, 10]
    lin = bilinear(tokens, placement, (20, width))[0, 0, 10]
    assert (jbu - ideal).abs().mean() < 0.25 * (lin - ideal).abs().mean()
    assert (jbu[:60] < 0.1).all() and (jbu[72:] > 0.9).all()


def test_aligned_placement_puts_every_views_tokens_on_their_true_centres():
    height, width, stride, patch = 60, 75, 7, 14
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    coordinates = torch.stack([ys, xs])[None]  # each pixel holds its own (y, x)
    spec = ViewSpec(stride=stride, distances=(3,), directions=8, flips=True)
    for view, flip, dy, dx in aligned_views(coordinates, spec):
        if max(abs(dy), abs(dx)) and (flip[0] or flip[1]):
            assert not torch.equal(view, coordinates)
        # the true centre of each view patch, read off the coordinates it shows (mean of the 2x2 middle pixels)
        centres = F.avg_pool2d(view[..., 6:, 6:], 2, stride=stride)[..., : token_grid(height, patch, stride), : token_grid(width, patch, stride)]
        placement = view_placement(flip, dy, dx, centres.shape[-2:], (height, width), stride, patch)
        unflipped = torch.flip(centres, [d for d, on in zip((-2, -1), flip) if on]) if any(flip) else centres
        rows, cols = unflipped.shape[-2:]
        expected_y = placement.offset_y + stride * torch.arange(rows).float()
        expected_x = placement.offset_x + stride * torch.arange(cols).float()
        inner = slice(1, -1)  # away from the reflected border, where a shifted view repeats pixels
        torch.testing.assert_close(unflipped[0, 0, inner, inner], expected_y[:, None].expand(rows, cols)[inner, inner])
        torch.testing.assert_close(unflipped[0, 1, inner, inner], expected_x[None, :].expand(rows, cols)[inner, inner])


def test_attention_maps_are_the_softmax_of_the_last_blocks_cls_query(model):
    images = torch.randn(1, 3, 70, 84)
    out = model(images, cls_attention=True)
    assert out.cls_attention.shape == (1, model.config.heads, 5, 6)
    captured = {}
    handle = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.update(x=o))
    model(images)
    handle.remove()
    q, k, _ = model.blocks[-1].attn.qkv(captured["x"]).view(1, 31, 3, model.config.heads, 64).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / 8.0, dim=-1)[:, :, 0, 1:].reshape(1, -1, 5, 6)
    torch.testing.assert_close(out.cls_attention, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.cls_attention.sum(dim=(-2, -1)), torch.ones(1, model.config.heads) - torch.softmax(
        q[:, :, :1] @ k.transpose(-1, -2) / 8.0, dim=-1)[:, :, 0, 0], atol=1e-5)


@pytest.mark.parametrize("preset_name", ["fast", "default"])
def test_tiled_features_agree_with_untiled_and_respect_the_budget(model, preset_name):
    image = np.random.default_rng(0).random((300, 330)).astype(np.float32)
    spec = PRESETS[preset_name]
    whole = DeepExtractor(model, torch.device("cpu")).features(image, spec)
    budget = 120 << 20  # the untiled image needs about 200 MB
    small = DeepExtractor(model, torch.device("cpu"), budget_bytes=budget)
    edge, batch = small.plan(300, 330, spec, 128)
    tiles = tile_plan(300, 330, edge, align=spec.stride)
    assert len(tiles) >= 4
    assert all(estimated_bytes(t.height, t.width, 128, model, spec, batch) <= budget for t in tiles)
    cosine = F.cosine_similarity(small.features(image, spec), whole, dim=0)
    assert cosine.mean() > 0.99 and cosine.min() > 0.9


def test_tiles_cover_the_image_with_the_overlap():
    tiles = tile_plan(1000, 700, 400, overlap=56, align=7)
    assert {t.y0 for t in tiles} == {0, 294, 602} and {t.x0 for t in tiles} == {0, 301}
    assert all(t.height <= 400 and t.width <= 400 for t in tiles)
    assert all(t.y0 % 7 == 0 and t.x0 % 7 == 0 for t in tiles)
    assert max(t.y0 + t.height for t in tiles) == 1000 and max(t.x0 + t.width for t in tiles) == 700
    ys = sorted({(t.y0, t.y0 + t.height) for t in tiles})
    assert all(a_end - b_start >= 56 for (_, a_end), (b_start, _) in zip(ys, ys[1:]))


def test_pca_components_are_sorted_by_variance_and_sign_fixed():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 40 * 50)) * np.array([[5.0], [2.0], [0.5]])
    mixing = np.linalg.qr(rng.normal(size=(8, 8)))[0][:, :3]
    features = torch.from_numpy((mixing @ base).reshape(8, 40, 50)).float()
    basis = fit_pca(features, 3)
    assert (basis.explained_variance[:-1] >= basis.explained_variance[1:]).all()
    assert basis.explained_variance[0] == pytest.approx(25, rel=0.1)
    assert (basis.components.gather(1, basis.components.abs().argmax(1, keepdim=True)) > 0).all()
    again = fit_pca(-features * 1, 3)
    torch.testing.assert_close(basis.components, again.components, rtol=1e-4, atol=1e-4)
    assert basis.apply(features).shape == (3, 40, 50)


def test_l2_per_pixel_gives_unit_vectors():
    f = torch.randn(4, 10, 12) * 3 + 1
    torch.testing.assert_close(l2_per_pixel(f).norm(dim=0), torch.ones(10, 12))


def test_official_urls_follow_the_hub_names():
    assert official_url("dinov2_vits14") == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert official_url("dinov2_vitg14_reg") == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"


def test_offline_download_fails_with_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFEAT_CACHE", str(tmp_path))
    monkeypatch.delenv("DINOFEAT_WEIGHTS", raising=False)
    with socket_closed_port() as port:
        monkeypatch.setenv("DINOFEAT_WEIGHTS_URL", f"http://127.0.0.1:{port}/mirror/")
        with pytest.raises(DinofeatError, match=r"^cannot download http://127.0.0.1:\d+/mirror/dinov2_vits14/dinov2_vits14_pretrain\.pth "
                                                r"\(.*\); the deep sets need DINOv2 weights: pass --weights PATH .*"
                                                r"`dinofeat weights random .* \(--set multiscale\)\.$"):
            resolve_weights("dinov2_vits14")
    assert list(tmp_path.iterdir()) == []


def test_download_goes_to_the_cache_once_with_its_checksum(tmp_path, monkeypatch, model):
    served = tmp_path / "served"
    served.mkdir()
    (served / "dinov2_vits14").mkdir()
    save_official(model, served / "dinov2_vits14" / "dinov2_vits14_pretrain.pth")
    monkeypatch.setenv("DINOFEAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DINOFEAT_WEIGHTS", raising=False)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("DINOFEAT_WEIGHTS_URL", f"http://127.0.0.1:{server.server_port}")
        path = resolve_weights("dinov2_vits14")
        assert path == tmp_path / "cache" / "dinov2_vits14_pretrain.pth"
        assert Path(f"{path}.sha256").read_text().strip() == weights_module.file_sha256(path)
    finally:
        server.shutdown()
    assert resolve_weights("dinov2_vits14") == path  # the server is gone: served from the cache
    path.write_bytes(b"tampered")
    with pytest.raises(DinofeatError, match="cannot download"):
        resolve_weights("dinov2_vits14")  # a file that fails its checksum is not used


def test_unknown_backbone_and_missing_weights_file_are_one_sentence(tmp_path):
    with pytest.raises(DinofeatError, match="unknown backbone 'vit_huge'; choose one of dinov2_vits14, dinov2_vits14_reg"):
        resolve_weights("vit_huge")
    with pytest.raises(DinofeatError, match="does not exist"):
        resolve_weights("dinov2_vits14", tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DinofeatError, match="cannot read weights from"):
        load_backbone(tmp_path / "junk.pth")


class socket_closed_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


def test_joint_bilateral_equals_a_per_pixel_loop():
    torch.manual_seed(0)
    tokens = torch.randn(1, 3, 4, 5)
    guide = torch.rand(1, 1, 30, 38)
    placement = TokenPlacement(7, 6.5, 6.5)
    ours = joint_bilateral(tokens, placement, (30, 38), guide, sigma_spatial=0.8, sigma_range=0.2)
    g = guide  # the guide is used as given: the image in its space's input range
    expected = torch.zeros_like(ours)
    for y in range(30):
        for x in range(38):
            ty, tx = (y - 6.5) / 7, (x - 6.5) / 7
            ny, nx = min(max(round(ty), 0), 3), min(max(round(tx), 0), 4)
            total, norm = torch.zeros(3), 0.0
            for iy in range(ny - 1, ny + 2):
                for ix in range(nx - 1, nx + 2):
                    if 0 <= iy < 4 and 0 <= ix < 5:
                        cy, cx = min(round(6.5 + 7 * iy), 29), min(round(6.5 + 7 * ix), 37)
                        wgt = math.exp(-((ty - iy) ** 2 + (tx - ix) ** 2) / (2 * 0.8**2)) * math.exp(
                            -float(g[0, 0, y, x] - g[0, 0, cy, cx]) ** 2 / (2 * 0.2**2))
                        total += wgt * tokens[0, :, iy, ix]
                        norm += wgt
            expected[0, :, y, x] = total / norm
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
