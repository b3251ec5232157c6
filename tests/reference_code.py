"""The paper's reference code (HR-Dv2) and the official DINOv2 code it wraps, run for real.

Both come as tarballs in ../shared/vendor/reference; they are unpacked once into a cache outside the
checkout ($XDG_CACHE_HOME or ~/.cache, under dinofeat/reference) and imported from there. Offline
and on CPU: the official models are built with `pretrained=False` (official initialisation, seeded),
HR-Dv2's `torch.hub.load("facebookresearch/dinov2", ...)` is pointed at the unpacked hub folder.
Used by tests/test_reference_fidelity.py and bench/bench_reference.py.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT.parent / "shared" / "vendor" / "reference"
HR_DV2_TARBALL = "HR-Dv2-107a1ad.tar.gz"
DINOV2_TARBALL = "dinov2-b8931f7.tar.gz"


class ReferenceUnavailable(Exception):
    """The reference code cannot be unpacked or imported here; the message says why."""


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dinofeat" / "reference"


def unpacked(tarball: str, folder: str) -> Path:
    """The tarball's top folder `folder`, unpacked once into the cache (atomically: a half-unpacked
    copy is never used)."""
    target = cache_root() / tarball.removesuffix(".tar.gz")
    if (target / folder).is_dir():
        return target / folder
    source = VENDOR / tarball
    if not source.is_file():
        raise ReferenceUnavailable(f"the reference tarball {source} is absent.")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
    try:
        with tarfile.open(source) as archive:
            archive.extractall(scratch, filter="data")
        if not (scratch / folder).is_dir():
            raise ReferenceUnavailable(f"{source} holds no {folder}/ folder.")
        with contextlib.suppress(FileExistsError, OSError):
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target / folder


def dinov2_hub() -> Path:
    """The official hub folder (hubconf.py and the dinov2 package)."""
    return unpacked(DINOV2_TARBALL, "dinov2")


def import_torchvision_transforms() -> None:
    """Make `torchvision.transforms` importable beside CPU torch.

    The registry's torchvision wheel is built for CUDA torch: its package import fails beside the CPU
    wheel ("operator torchvision::nms does not exist"), while its pure-Python `transforms` subpackage,
    which is all HR-Dv2 and timm use here, works once the package's __init__ is not run."""
    try:
        import torchvision.transforms  # noqa: F401
        return
    except ImportError as error:
        raise ReferenceUnavailable(f"torchvision is not installed ({error}); install the dev extra.") from None
    except RuntimeError:
        pass
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = [str(Path(spec.origin).parent)]
    package.__spec__ = spec
    sys.modules["torchvision"] = package
    importlib.import_module("torchvision.transforms")


def hr_dv2() -> types.ModuleType:
    """The imported `hr_dv2` package of the reference."""
    folder = unpacked(HR_DV2_TARBALL, "HR-Dv2")
    import_torchvision_transforms()
    try:
        import timm  # noqa: F401  (high_res.py imports timm.create_model at import time)
    except ImportError as error:
        raise ReferenceUnavailable(f"timm is not installed ({error}); install the dev extra.") from None
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("hr_dv2")


@contextlib.contextmanager
def local_hub():
    """Within: `torch.hub.load("facebookresearch/dinov2", name)` builds the model from the unpacked
    official code, untrained (no network)."""
    hub, original = dinov2_hub(), torch.hub.load

    def load(repo, name, *args, **kwargs):
        if repo.startswith("facebookresearch/dinov2"):
            return original(str(hub), name, source="local", pretrained=False)
        return original(repo, name, *args, **kwargs)

    torch.hub.load = load
    try:
        yield
    finally:
        torch.hub.load = original


def official_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The official `name` (e.g. "dinov2_vits14", "dinov2_vits14_reg") with seeded official initialisation."""
    torch.manual_seed(seed)
    with local_hub():
        return torch.hub.load("facebookresearch/dinov2", name).eval()


def hr_dv2_featuriser(name: str, state: dict[str, torch.Tensor], flips: bool):
    """HR-Dv2 configured as the paper's weakly supervised featuriser (`hr_dv2/wss/featurisers.py`,
    DeepFeaturesModel): stride 4, shifts of 1 and 2 px in the 8 Moore directions, optionally combined
    with the reference's flips, float32, holding the weights `state` (official layout)."""
    reference = hr_dv2()
    with local_hub():
        net = reference.HighResDV2(name, 4, pca_dim=-1, dtype=torch.float32)
    net.dinov2.load_state_dict(state)
    return with_paper_views(net, flips).eval()


def with_paper_views(net, flips: bool):
    """`net` (a HighResDV2) set to the paper featuriser's views: the 17 shifts, or with `flips` the 68
    views `combine_transforms` makes of them and the reference's flips. Returns `net`."""
    reference = hr_dv2()
    transforms, inverses = reference.tr.get_shift_transforms([1, 2], "Moore")
    if flips:
        flip, unflip = reference.tr.get_flip_transforms()
        transforms, inverses = reference.tr.combine_transforms(transforms, flip, inverses, unflip)
    net.set_transforms(transforms, inverses)
    return net


def hr_dv2_features(net, grey: np.ndarray) -> torch.Tensor:
    """The paper featuriser's `img_to_features` on a uint8 greyscale image, on the CPU: (1, C, H, W)."""
    from PIL import Image

    reference = hr_dv2()
    tensor = reference.tr.to_norm_tensor(Image.fromarray(grey).convert("RGB"))
    with torch.no_grad():
        features = net.forward_sequential(tensor)
        return torch.nn.functional.interpolate(features, grey.shape)


DINOV3_TARBALL = "dinov3-6876159.tar.gz"


def dinov3_code() -> Path:
    """The unpacked official DINOv3 code (hubconf.py and the dinov3 package), importable as `dinov3`."""
    folder = unpacked(DINOV3_TARBALL, "dinov3-6876159")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def official_dinov3(name: str, depth: int | None = None, seed: int = 0) -> torch.nn.Module:
    """The official DINOv3 backbone `name` (e.g. "dinov3_vits16plus") as its hub function builds it, untrained, with
    `depth` blocks instead of its own where given (every other setting the hub's: widths, heads, RoPE, storage
    tokens, LayerScale, SwiGLU, the key-bias mask), and random weights drawn with `seed`: the official
    initialisation, then LayerScale, norms and biases drawn too, so every part of every block counts."""
    dinov3_code()
    backbones = importlib.import_module("dinov3.hub.backbones")
    vision_transformer = importlib.import_module("dinov3.models.vision_transformer")
    real = vision_transformer.DinoVisionTransformer
    vision_transformer.DinoVisionTransformer = lambda **kwargs: real(**{**kwargs, "depth": depth or kwargs["depth"]})
    try:
        model = getattr(backbones, name)(pretrained=False)
    finally:
        vision_transformer.DinoVisionTransformer = real
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if key.endswith("gamma") or key.endswith("norm.weight") or ".norm" in key and key.endswith("weight"):
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif key.endswith("bias") or key in ("storage_tokens", "cls_token"):
                value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    return model.eval()


def official_dinov3_tokens(model: torch.nn.Module, images: torch.Tensor, stride: int | None = None) -> torch.Tensor:
    """Normalised patch tokens (B, C, rows, cols) of the official model's own `forward_features`, with the patch
    embedding's stride set to `stride` as HR-Dv2's DINOv3 path does."""
    proj = model.patch_embed.proj
    original = proj.stride
    proj.stride = (stride, stride) if stride else original
    try:
        with torch.no_grad():
            x = model.patch_embed.proj(images)
            rows, cols = x.shape[-2:]
            tokens = model.forward_features(images)["x_norm_patchtokens"]
    finally:
        proj.stride = original
    return tokens.transpose(1, 2).reshape(images.shape[0], -1, rows, cols)


def hr_dv2_dinov3_featuriser(checkpoint: Path, depth: int, flips: bool = False):
    """HR-Dv2's own DINOv3 path (`HighResDV2` with a dinov3 name: `torch.hub.load(lib_path, "dinov3_vits16plus",
    source="local", weights=chk_path)`, stride 4 set on the patch embedding, the model's own `forward_features`) as
    the paper's featuriser (`with_paper_views`), float32. The hub call, whose hubconf needs packages not installed
    here, builds the official ViT-S+/16 with `depth` blocks and loads `checkpoint` into it."""
    reference = hr_dv2()
    folder, original = dinov3_code(), torch.hub.load

    def load(repo, name, *args, **kwargs):
        if str(repo) == str(folder):
            model = official_dinov3(name, depth=depth)
            model.load_state_dict(torch.load(kwargs["weights"], map_location="cpu", weights_only=True))
            return model.eval()
        return original(repo, name, *args, **kwargs)

    torch.hub.load = load
    try:  # "dinov3_vits16": the name's second part gives HR-Dv2 the width and patch; the class loads dinov3_vits16plus
        net = reference.HighResDV2("dinov3_vits16", 4, pca_dim=-1, dtype=torch.float32, lib_path=str(folder), chk_path=str(checkpoint))
    finally:
        torch.hub.load = original
    return with_paper_views(net, flips).eval()
