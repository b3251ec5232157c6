"""DINOv2 weights: official checkpoints and Hugging Face files, from a path or the official URL.

Official files (`dinov2_vits14_pretrain.pth`, ...) use the layout of `DinoVisionTransformer`.
Hugging Face `facebook/dinov2-*` and `facebook/dinov2-with-registers-*` files (safetensors or bin)
are converted key by key (q/k/v fused into qkv, layer_scale -> ls, ...). Nothing is unpickled:
.pth/.bin files load with `torch.load(weights_only=True)`.

DINOv3 backbones (`dinov3.py`) load from `--weights` only: their licence (the DINOv3 License) is accepted by
each user on Meta's download page, so nothing here downloads them; `dinov3_weights.py` reads their layouts.

Downloads go once into a cache (`$DINOFEAT_CACHE`, else `$XDG_CACHE_HOME/dinofeat`, else
`~/.cache/dinofeat`), through a temporary file, with a progress bar; the file's sha256 is recorded
beside it and checked on every later load, so a truncated or altered file is never used. They come
from the official address, or from a mirror named by `$DINOFEAT_WEIGHTS_URL` (same file paths).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch
from dinofeat.contract.errors import DinofeatError

from .backbone import OFFICIAL_CONFIGS, DinoVisionTransformer, VitConfig
from .dinov3 import DINOV3_BACKBONES, DINOV3_CONFIGS, Dinov3Config, Dinov3VisionTransformer
from .dinov3_weights import described, layout, load_dinov3, without_prefix

DINOV2_BACKBONES = tuple(f"dinov2_vit{size}14{suffix}" for size in "sblg" for suffix in ("", "_reg"))
BACKBONES = DINOV2_BACKBONES + DINOV3_BACKBONES
DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
"""Where users accept the DINOv3 License and get the official files (also on Hugging Face, facebook/dinov3-*)."""
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
OFFICIAL_PATH = "dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth"
BASE_URL_VARIABLE = "DINOFEAT_WEIGHTS_URL"
"""Environment variable naming a mirror of the official files (same paths below it), e.g. a lab's own
http server; the standard http_proxy/https_proxy variables apply to either."""
DOWNLOAD_TIMEOUT_S = 30
"""Longest wait for the download's connection or its next bytes before it is given up."""


def official_url(backbone: str) -> str:
    """Download address of an official backbone, e.g. dinov2_vits14_reg -> .../dinov2_vits14_reg4_pretrain.pth,
    below $DINOFEAT_WEIGHTS_URL when set."""
    check_backbone(backbone)
    if backbone in DINOV3_BACKBONES:
        raise no_dinov3_download(backbone)
    size = backbone[len("dinov2_vit")]
    base = os.environ.get(BASE_URL_VARIABLE) or OFFICIAL_BASE_URL
    return f"{base.rstrip('/')}/" + OFFICIAL_PATH.format(size=size, reg="_reg4" if backbone.endswith("_reg") else "")


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise DinofeatError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}.")


def no_dinov3_download(backbone: str) -> DinofeatError:
    """The one sentence for a DINOv3 backbone without a weights file."""
    return DinofeatError(f"{backbone} needs its weights file: DINOv3 weights come under the DINOv3 License, which each user "
                         f"accepts at {DINOV3_DOWNLOADS} (or on Hugging Face, facebook/{backbone.replace('_', '-')}-pretrain-lvd1689m); "
                         "pass the downloaded file with --weights PATH.")


def cache_dir() -> Path:
    if os.environ.get("DINOFEAT_CACHE"):
        return Path(os.environ["DINOFEAT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinofeat"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, progress: bool = True) -> Path:
    """Fetch `url` into `target` through a temporary file; record its sha256 in TARGET.sha256."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".download")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if total and partial.stat().st_size != total:
            raise DinofeatError(f"the download of {url} stopped early; run the command again.")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        raise DinofeatError(f"cannot download {url} ({reason}); the deep sets need DINOv2 weights: pass --weights PATH "
                            "(offline, `dinofeat weights random BACKBONE -o FILE.pth` writes a random checkpoint that tries "
                            "the commands but whose features mean nothing) or set DINOFEAT_WEIGHTS, or choose a filter bank "
                            "(--set multiscale).") from None
    Path(str(target) + ".sha256").write_text(file_sha256(partial) + "\n")
    os.replace(partial, target)
    return target


def cached_weights(backbone: str) -> Path:
    """The official checkpoint of `backbone` from the cache, downloading it the first time."""
    url = official_url(backbone)
    target = cache_dir() / url.rsplit("/", 1)[1]
    recorded = Path(str(target) + ".sha256")
    if target.exists() and recorded.exists():
        if file_sha256(target) == recorded.read_text().strip():
            return target
        target.unlink()
    return download(url, target)


def resolve_weights(backbone: str, weights: str | os.PathLike | None = None) -> Path:
    """A local weights file: `weights`, else $DINOFEAT_WEIGHTS, else the cached official download."""
    check_backbone(backbone)
    chosen = weights or os.environ.get("DINOFEAT_WEIGHTS")
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise DinofeatError(f"the weights file {path} does not exist; give the path of a .pth, .bin or .safetensors file.")
        return path
    return cached_weights(backbone)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .pth or .bin file, without executing anything in it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a weights file
        raise DinofeatError(f"cannot read weights from {path}: {type(error).__name__}; give a DINOv2 file (official or Hugging Face) or a DINOv3 file (official, Hugging Face or timm).") from None
    for wrapper in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DinofeatError(f"{path} does not hold a state dict of tensors; give a DINOv2 or DINOv3 weights file.")
    return state


HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"^layernorm\.", "norm."),
]


def from_hugging_face(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face Dinov2Model state dict to the official layout."""
    state = {re.sub(r"^dinov2\.", "", k): v for k, v in state.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", key)
        if match:
            if match.group(2) == "query":
                layer, kind = match.group(1), match.group(3)
                prefix = f"encoder.layer.{layer}.attention.attention"
                converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
                    [state[f"{prefix}.{p}.{kind}"] for p in ("query", "key", "value")])
            continue
        for pattern, replacement in HF_RENAMES:
            if re.search(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
    return converted


def config_from_state_dict(state: dict[str, torch.Tensor]) -> VitConfig:
    """Read the architecture off an official-layout state dict."""
    try:
        dim = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        swiglu = "blocks.0.mlp.w12.weight" in state
        hidden = state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    except (KeyError, ValueError, IndexError):
        raise DinofeatError("the weights file is not a DINOv2 vision transformer (missing cls_token, blocks or pos_embed).") from None
    return VitConfig(dim=dim, depth=depth, mlp_hidden=hidden, registers=registers, swiglu=swiglu, patch=patch, pos_grid=grid)


def load_backbone(path: Path, backbone: str | None = None) -> DinoVisionTransformer | Dinov3VisionTransformer:
    """Build the model a weights file describes and load it: DINOv2 (official or Hugging Face layout) or DINOv3
    (official, transformers or timm layout, told by the keys). With `backbone`, a file of the other family, or a
    DINOv3 file of another size, is refused in one sentence."""
    state = read_state_dict(path)
    if layout(without_prefix(state)) is not None:
        if backbone is not None and backbone not in DINOV3_BACKBONES:
            raise DinofeatError(f"{path} holds DINOv3 weights, but --backbone names the DINOv2 model {backbone}; "
                                "name the DINOv3 backbone the file holds (e.g. --backbone dinov3_vits16).")
        return load_dinov3(path, state, backbone)
    if backbone in DINOV3_BACKBONES:
        raise DinofeatError(f"{path} is no DINOv3 ViT checkpoint in a known layout (official, transformers or timm), but "
                            f"--backbone names {described(backbone)}; give that model's file from {DINOV3_DOWNLOADS}.")
    if any(k.startswith(("embeddings.", "encoder.", "dinov2.")) for k in state):
        state = from_hugging_face(state)
    model = DinoVisionTransformer(config_from_state_dict(state))
    state.setdefault("mask_token", torch.zeros(1, model.config.dim))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DinofeatError(f"the weights in {path} do not fit a DINOv2 model (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    return model.eval()


def official_config(backbone: str) -> VitConfig | Dinov3Config:
    """The architecture of a named official backbone (for building a model without weights)."""
    check_backbone(backbone)
    if backbone in DINOV3_BACKBONES:
        return DINOV3_CONFIGS[backbone]
    base = OFFICIAL_CONFIGS[backbone[len("dinov2_vit")]]
    return VitConfig(**{**base.__dict__, "registers": 4 if backbone.endswith("_reg") else 0})


def check_device_for(config: VitConfig | Dinov3Config, device: torch.device, backbone: str = "the DINOv3 7B backbone") -> None:
    """Refuse a backbone that runs on GPUs only (the DINOv3 7B) on a CPU: one sentence, before its weights are read
    where the caller knows the name (ModelRegistry) and again where a model reaches a device (DeepExtractor)."""
    if device.type == "cpu" and getattr(config, "gpu_only", False):
        raise DinofeatError(f"{backbone} runs on GPU servers only (27 GB of weights, hours per image on a CPU), and this "
                            "server computes on a CPU; start it with --device cuda, or choose dinov3_vitl16 or a smaller backbone.")


def random_backbone(backbone: str, seed: int = 0) -> DinoVisionTransformer | Dinov3VisionTransformer:
    """The official architecture of `backbone` with seeded random weights: torch's own initialisation of each
    layer, and normal(0, 0.02) position embeddings, CLS and register (DINOv3: storage) tokens, so that tokens differ
    by place; DINOv3's key bias zero, as its checkpoints' mask makes it.
    Its features carry no meaning; it is for trying the deep commands' plumbing without the official download."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if backbone in DINOV3_BACKBONES:
            model = Dinov3VisionTransformer(official_config(backbone))
            tokens_drawn = (model.cls_token, model.storage_tokens)
        else:
            model = DinoVisionTransformer(official_config(backbone))
            tokens_drawn = (model.pos_embed, model.cls_token, model.register_tokens)
        with torch.no_grad():
            for tokens in tokens_drawn:
                if tokens is not None:
                    tokens.normal_(0.0, 0.02)
            for block in model.blocks if backbone in DINOV3_BACKBONES else ():
                block.attn.qkv.bias[model.config.dim : 2 * model.config.dim] = 0.0
    finally:
        torch.random.set_rng_state(generator_state)  # the caller's random stream is left as it was
    return model.eval()


def save_random_checkpoint(backbone: str, path: Path, seed: int = 0) -> int:
    """Write random_backbone(backbone, seed) to `path` as an official-layout state dict (a .pth that --weights and
    `serve --weights` load like the real file); the number of parameters."""
    model = random_backbone(backbone, seed)
    torch.save(model.state_dict(), path)
    return sum(p.numel() for p in model.parameters())
