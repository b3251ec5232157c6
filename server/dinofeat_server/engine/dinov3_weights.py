"""DINOv3 weights in their three published layouts, told apart by their keys and converted to the official one.

- official (`dinov3_vits16_pretrain_lvd1689m-08c60483.pth`, ...): `model.state_dict()` of facebookresearch/dinov3:
  `storage_tokens`, `rope_embed.periods`, `blocks.N.attn.qkv.bias_mask`, `blocks.N.ls1.gamma`;
- Hugging Face transformers (`facebook/dinov3-vits16-pretrain-lvd1689m`, DINOv3ViTModel): `embeddings.register_tokens`,
  `layer.N.attention.{q,k,v,o}_proj` (no key bias), `layer.N.layer_scale1.lambda1`, `mlp.{gate,up,down}_proj`;
- timm (`vit_small_patch16_dinov3.lvd1689m`, Eva): `reg_token`, `blocks.N.attn.qkv` with `q_bias`/`v_bias` (or none),
  `blocks.N.gamma_1`, `mlp.fc1_g`/`fc1_x` for SwiGLU.
Files without RoPE periods (transformers, timm) get the official ones (base 100). The SAT-493M weights are recognised
by their name (`sat493m` in the file or folder name, or the official hashes), by the ViT-L's extra `local_cls_norm`,
or by the image mean of a `preprocessor_config.json` beside a transformers file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from dinofeat.contract.errors import DinofeatError

from .dinov3 import DINOV3_CONFIGS, SATELLITE_MEAN, Dinov3Config, Dinov3VisionTransformer, rope_periods

SATELLITE_HASHES = ("eadcf0ff", "a6675841")
"""The official SAT-493M checkpoints' hash suffixes (ViT-L/16, 7B/16)."""
UNUSED_KEYS = re.compile(r"(^local_cls_norm\.|^cls_norm\.|\.bias_mask$)")
"""Official keys that inference does not use (the 7B's and SAT ViT-L's training-only norm; masks applied on load)."""


def layout(state: dict[str, torch.Tensor]) -> str | None:
    """'official', 'transformers' or 'timm' for a DINOv3 ViT state dict, None for anything else."""
    keys = set(state)
    if "storage_tokens" in keys and "blocks.0.ls1.gamma" in keys:
        return "official"
    if "embeddings.register_tokens" in keys and "layer.0.attention.q_proj.weight" in keys:
        return "transformers"
    if "reg_token" in keys and "blocks.0.gamma_1" in keys and "pos_embed" not in keys:
        return "timm"
    return None


def without_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a transformers task model (`dinov3_vit.` or `model.` before the backbone's) as the backbone's own."""
    for prefix in ("dinov3_vit.", "model.", "backbone."):
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def transformers_renames(gated: bool) -> list[tuple[str, str]]:
    """transformers' names -> the official ones; the feed-forward's depend on its kind (gated: SwiGLU)."""
    up, down = ("w2", "w3") if gated else ("fc1", "fc2")
    return [(r"^embeddings\.register_tokens$", "storage_tokens"), (r"^embeddings\.cls_token$", "cls_token"),
            (r"^embeddings\.mask_token$", "mask_token"), (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
            (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
            (r"^layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
            (r"^layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.w1."), (r"^layer\.(\d+)\.mlp\.up_proj\.", rf"blocks.\1.mlp.{up}."),
            (r"^layer\.(\d+)\.mlp\.down_proj\.", rf"blocks.\1.mlp.{down}."), (r"^layer\.(\d+)\.(norm\d)\.", r"blocks.\1.\2."),
            (r"^norm\.", "norm.")]


def from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers DINOv3ViTModel state dict in the official layout (q, k, v fused; the absent key bias zero)."""
    renames = transformers_renames(gated=any(k.endswith("mlp.gate_proj.weight") for k in state))
    converted = {re.sub(pattern, replacement, key): value for key, value in state.items()
                 for pattern, replacement in renames if re.search(pattern, key)}  # q/k/v_proj match none: fused below
    for layer in sorted({int(m.group(1)) for k in state if (m := re.match(r"^layer\.(\d+)\.attention\.q_proj\.weight$", k))}):
        prefix = f"layer.{layer}.attention"
        converted[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([state[f"{prefix}.{p}_proj.weight"] for p in "qkv"])
        if f"{prefix}.q_proj.bias" in state:
            q_bias = state[f"{prefix}.q_proj.bias"]
            k_bias = state.get(f"{prefix}.k_proj.bias", torch.zeros_like(q_bias))
            converted[f"blocks.{layer}.attn.qkv.bias"] = torch.cat([q_bias, k_bias, state[f"{prefix}.v_proj.bias"]])
    if "mask_token" in converted:
        converted["mask_token"] = converted["mask_token"].reshape(1, -1)
    return converted


TIMM_RENAMES = [
    (r"^reg_token$", "storage_tokens"),
    (r"\.gamma_(\d)$", r".ls\1.gamma"),
    (r"\.mlp\.fc1_g\.", ".mlp.w1."),
    (r"\.mlp\.fc1_x\.", ".mlp.w2."),
]


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm Eva DINOv3 state dict in the official layout (q and v biases fused with a zero key bias)."""
    swiglu = any(k.endswith("mlp.fc1_g.weight") for k in state)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((".q_bias", ".v_bias")) or key.startswith("rope.") or key.endswith(".k_bias"):
            continue
        for pattern, replacement in TIMM_RENAMES:
            key = re.sub(pattern, replacement, key)
        if swiglu:
            key = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key)
        converted[key] = value
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        q_bias, v_bias = state[key], state[key.replace("q_bias", "v_bias")]
        converted[key.replace("q_bias", "qkv.bias")] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return converted


def official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any of the three layouts as the module's state dict: biases masked as the official forward masks them,
    absent biases zero, absent RoPE periods and mask token the official ones; unused keys dropped."""
    state = without_prefix(state)
    found = layout(state)
    state = from_transformers(state) if found == "transformers" else from_timm(state) if found == "timm" else dict(state)
    for key in [k for k in state if k.endswith("attn.qkv.bias_mask")]:
        bias_key = key.removesuffix("_mask")
        if bias_key in state:
            state[bias_key] = state[bias_key] * state[key].to(state[bias_key].dtype)
    dim = state["cls_token"].shape[-1]
    for key in [k for k in state if k.endswith("attn.qkv.weight")]:
        state.setdefault(key.replace("weight", "bias"), torch.zeros(3 * dim, dtype=state[key].dtype))
    state.setdefault("mask_token", torch.zeros(1, dim))
    return {k: v for k, v in state.items() if not UNUSED_KEYS.search(k)}


def head_dim(state: dict[str, torch.Tensor], dim: int) -> int:
    """Each head's width: four times the RoPE periods where the file has them, else 64 (128 for the 7B's 4096)."""
    if "rope_embed.periods" in state:
        return 4 * state["rope_embed.periods"].numel()
    return 128 if dim >= 4096 else 64


def config_from_state(state: dict[str, torch.Tensor], satellite: bool) -> Dinov3Config:
    """The architecture of an official-layout state dict (`official_layout`'s output)."""
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w1.weight" in state
    hidden = state["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    return Dinov3Config(dim=dim, depth=depth, heads=dim // head_dim(state, dim), mlp_hidden=hidden, swiglu=swiglu,
                        satellite=satellite, patch=state["patch_embed.proj.weight"].shape[-1],
                        registers=state["storage_tokens"].shape[1])


def size_name(config: Dinov3Config) -> str | None:
    """The official backbone of this width and feed-forward (depth aside: test models are shallow), or None."""
    return next((name for name, c in DINOV3_CONFIGS.items()
                 if (c.dim, c.heads, c.mlp_hidden, c.swiglu, c.patch) == (config.dim, config.heads, config.mlp_hidden, config.swiglu, config.patch)), None)


def described(name: str) -> str:
    c = DINOV3_CONFIGS[name]
    return f"{name} ({c.dim} wide, {c.heads} heads, {'SwiGLU' if c.swiglu else 'MLP'} {c.mlp_hidden})"


def is_satellite(path: Path, state: dict[str, torch.Tensor], dim: int) -> bool:
    """Whether a file holds the SAT-493M weights (module docstring: by name, keys or the processor's mean)."""
    names = f"{path.parent.name}/{path.name}".lower()
    if "sat493m" in names or any(h in names for h in SATELLITE_HASHES):
        return True
    if dim == DINOV3_CONFIGS["dinov3_vitl16"].dim and any(k.startswith("local_cls_norm.") for k in state):
        return True  # of the official ViT-Ls only the SAT-493M one carries the local-crop norm
    processor = path.parent / "preprocessor_config.json"
    if processor.is_file():
        try:
            mean = json.loads(processor.read_text()).get("image_mean")
        except (OSError, ValueError):
            return False
        return mean is not None and all(abs(a - b) < 1e-3 for a, b in zip(mean, SATELLITE_MEAN))
    return False


def load_dinov3(path: Path, state: dict[str, torch.Tensor], backbone: str | None = None) -> Dinov3VisionTransformer:
    """The model a DINOv3 state dict (any layout) describes, loaded; with `backbone`, refused in one sentence
    unless the file has that backbone's width and feed-forward."""
    satellite = is_satellite(path, state, state.get("cls_token", torch.zeros(1)).shape[-1])
    try:
        converted = official_layout(state)
        config = config_from_state(converted, satellite)
    except (KeyError, ValueError, IndexError):
        raise DinofeatError(f"{path} is not a complete DINOv3 ViT checkpoint (cls_token, storage tokens and blocks expected); "
                            "give an official, transformers or timm DINOv3 ViT file.") from None
    found = size_name(config)
    if backbone is not None and found != backbone:
        holds = described(found) if found else f"a {config.dim}-wide model of no official DINOv3 size"
        raise DinofeatError(f"the weights in {path} are {holds}, but --backbone names {described(backbone)}; "
                            f"give the {backbone} checkpoint, or name the backbone the file holds.")
    model = Dinov3VisionTransformer(config)
    converted.setdefault("rope_embed.periods", rope_periods(config.head_dim))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise DinofeatError(f"the weights in {path} do not fit a DINOv3 ViT (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                            "give an official, transformers or timm DINOv3 ViT file.")
    return model.eval()
