"""Our core models built from ComfyUI's real ``comfy.ops`` give the numbers of the torch.nn build.

Runs in ComfyUI's Python (COMFYUI_PYTHON) with its checkout on the path; skips when COMFYUI_PATH is
unset. Checks the two namespaces ComfyUI's loaders pick: ``disable_weight_init`` (also forced onto
its weight-casting path, which lowvram streaming uses) and ``manual_cast`` with bf16 storage.
"""

from __future__ import annotations

import pytest
from comfy_harness import run_in_comfy_python

pytestmark = pytest.mark.integration


SCRIPT = r"""
import json, sys, tempfile
sys.argv = [sys.argv[0], "--cpu"]  # comfy.model_management parses ComfyUI's command line on import
sys.path[:0] = [COMFYUI_PATH, REPO]
import comfy.options
comfy.options.enable_args_parsing()  # as ComfyUI's main.py does, so that --cpu is honoured
import torch
import comfy.ops
from safetensors.torch import save_file
from easyanimate_core.loading import load_transformer, load_vae
from easyanimate_core.transformer import EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.vae import MagvitVAE, VAEConfig

torch.manual_seed(0)
results = {}

def rounded(sd, dtype):
    return {k: v.to(dtype).float() for k, v in sd.items()}

def build(cls, cfg, ops, dtype, sd):
    model = cls(cfg, operations=ops, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.eval()

def force_cast(model):
    for m in model.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = True
    return model

def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

t_cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=9, out_channels=4,
                          num_layers=3, mmdit_layers=1, time_embed_dim=8, text_embed_dim=12,
                          add_norm_text_encoder=True)
ref = EasyAnimateTransformer3D(t_cfg).eval()
with torch.no_grad():
    for p in ref.parameters():
        p.add_(torch.randn_like(p) * 0.1)
t_sd = ref.state_dict()
x, t, text, inp = torch.randn(1, 4, 2, 8, 16), torch.tensor([300.0]), torch.randn(1, 5, 12), torch.randn(1, 5, 2, 8, 16)

def t_out(m):
    with torch.no_grad():
        return m(x, t, text, inpaint_latents=inp)

expected = t_out(ref)
plain = comfy.ops.disable_weight_init
results["transformer_disable_weight_init"] = rel(
    t_out(build(EasyAnimateTransformer3D, t_cfg, plain, torch.float32, t_sd)), expected
)
results["transformer_forced_cast"] = rel(
    t_out(force_cast(build(EasyAnimateTransformer3D, t_cfg, plain, torch.float32, t_sd))), expected
)
ref.load_state_dict(rounded(t_sd, torch.bfloat16))
expected_bf16 = t_out(ref)
manual = build(EasyAnimateTransformer3D, t_cfg, comfy.ops.manual_cast, torch.bfloat16, t_sd)
results["transformer_manual_cast_bf16"] = rel(t_out(manual), expected_bf16)
results["transformer_manual_cast_param_dtypes"] = sorted({str(p.dtype) for p in manual.parameters()})
with tempfile.TemporaryDirectory() as tmp:
    save_file({k: v.contiguous() for k, v in t_sd.items()}, tmp + "/t.safetensors")
    loaded = load_transformer(tmp + "/t.safetensors", operations=comfy.ops.manual_cast, dtype=torch.bfloat16)
    results["transformer_loader_manual_cast_bf16"] = rel(t_out(loaded), expected_bf16)
    results["transformer_loader_class"] = type(loaded.proj_out).__qualname__

v_cfg = VAEConfig(latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                  mid_block_attention="spatial")
vref = MagvitVAE(v_cfg).eval()
v_sd = vref.state_dict()
video, z = torch.rand(1, 3, 5, 32, 32) * 2 - 1, torch.randn(1, 4, 3, 4, 4)

def v_out(m):
    with torch.no_grad():
        return torch.cat([m.encode(video)[0].flatten(), m.decode(z).flatten()])

v_expected = v_out(vref)
results["vae_disable_weight_init"] = rel(v_out(build(MagvitVAE, v_cfg, plain, torch.float32, v_sd)), v_expected)
results["vae_forced_cast"] = rel(v_out(force_cast(build(MagvitVAE, v_cfg, plain, torch.float32, v_sd))), v_expected)
vref.load_state_dict(rounded(v_sd, torch.bfloat16))
vae_bf16 = build(MagvitVAE, v_cfg, comfy.ops.manual_cast, torch.bfloat16, v_sd)
vae_bf16.compute_dtype = torch.float32  # bf16 storage, fp32 compute: what a ComfyUI node asks for
results["vae_manual_cast_bf16"] = rel(v_out(vae_bf16), v_out(vref))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def comfy_ops_results():
    return run_in_comfy_python(SCRIPT, "COMFYUI_PATH is not set: no ComfyUI checkout to import comfy.ops from")


@pytest.mark.parametrize("model", ["transformer", "vae"])
def test_comfy_ops_match_torch_nn(comfy_ops_results, model):
    assert comfy_ops_results[f"{model}_disable_weight_init"] == 0.0
    assert comfy_ops_results[f"{model}_forced_cast"] <= 1e-6


@pytest.mark.parametrize("model", ["transformer", "vae"])
def test_manual_cast_bf16_storage_computes_in_float32(comfy_ops_results, model):
    """bf16 weights, fp32 activations: equal to fp32 compute on the bf16-rounded weights."""
    assert comfy_ops_results[f"{model}_manual_cast_bf16"] <= 1e-5


def test_loader_builds_with_comfy_ops(comfy_ops_results):
    assert comfy_ops_results["transformer_manual_cast_param_dtypes"] == ["torch.bfloat16"]
    assert comfy_ops_results["transformer_loader_class"] == "manual_cast.Linear"
    assert comfy_ops_results["transformer_loader_manual_cast_bf16"] <= 1e-5
