"""Test-only stand-ins that let TRELLIS's own model code run on this CPU (tests/test_trellis_backend.py).

TRELLIS's model classes run unchanged; four things around them are missing on a CPU-only machine,
and are supplied here, in test code only (the backend in src/ never installs any of them):

1. sparse attention accepts only xformers or flash_attn: a small ``xformers.ops.memory_efficient_attention``
   (with ``fmha.BlockDiagonalMask``) over torch's scaled_dot_product_attention, one sequence at a time;
   dense attention uses TRELLIS's own ``ATTN_BACKEND=sdpa``;
2. FlexiCubes imports ``kaolin.utils.testing.check_tensor`` (a shape assertion): a no-op;
3. ``SparseFeatures2Mesh`` builds FlexiCubes and its grid with ``device='cuda'`` by default: its
   default becomes the CPU;
4. the Gaussian representation imports TRELLIS's ``utils3d`` (git, not PyPI's package of that name)
   for its PLY methods only, which the mesh path never calls: an empty module;
5. spconv's CPU build fuses a convolution's bias only on CUDA ("cpu don't support act and bias"), and
   fuses it whenever the module is in eval mode: on CPU tensors its convolutions take the training
   path, which adds the bias after the convolution (the same numbers). Its CPU convolution is also
   not repeatable with several torch threads (two identical calls differ by up to ~1 in a feature):
   on CPU tensors it runs with one thread;
6. spconv 2.3.8's sparse-convolution backward asks torch for the current CUDA stream before it
   branches to its CPU path (which never uses it), so training through the SLat flow's convolutions
   fails without CUDA: with no CUDA, the stream it gets is 0.

Where to find TRELLIS: ``$JUDGE3D_TRELLIS_SRC``, else ``<repo>/../shared/third_party/TRELLIS``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRELLIS_SRC = REPO.parent / "shared" / "third_party" / "TRELLIS"
ENABLE_HINT = ("TRELLIS backend tests need TRELLIS's source and spconv: set JUDGE3D_TRELLIS_SRC to a clone of "
               "github.com/microsoft/TRELLIS (with its FlexiCubes submodule) or place one at "
               f"{DEFAULT_TRELLIS_SRC}, and `pip install -e '.[trellis-cpu]'`")


def trellis_test_source() -> Path | None:
    env = os.environ.get("JUDGE3D_TRELLIS_SRC")
    root = Path(env) if env else DEFAULT_TRELLIS_SRC
    return root if (root / "trellis" / "__init__.py").is_file() else None


def missing_requirement() -> str | None:
    """Why the TRELLIS tests cannot run here, or None."""
    if trellis_test_source() is None:
        return "no TRELLIS source"
    for module in ("spconv", "easydict", "plyfile"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


# -- 1. sparse attention ---------------------------------------------------------------------------
class BlockDiagonalMask:
    """xformers' block-diagonal mask, reduced to what TRELLIS uses: per-sequence lengths."""

    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)


def memory_efficient_attention(q, k, v, attn_bias=None):
    """xformers layout (B, N, heads, C); with a block-diagonal mask, B = 1 and each block attends to itself."""
    def sdpa(q_, k_, v_):
        return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2)
    if attn_bias is None:
        return sdpa(q, k, v)
    out, qs, ks = [], 0, 0
    for nq, nk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
        out.append(sdpa(q[:, qs:qs + nq], k[:, ks:ks + nk], v[:, ks:ks + nk]))
        qs, ks = qs + nq, ks + nk
    return torch.cat(out, dim=1)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install() -> None:
    """Install the stand-ins (each only where the real package is absent) and set TRELLIS's attention
    backends; call before the first TRELLIS import. Calling it again is harmless (sys.modules is read
    first: ``find_spec`` raises on a stand-in, which has no module spec)."""
    os.environ["ATTN_BACKEND"] = "sdpa"
    os.environ["SPARSE_ATTN_BACKEND"] = "xformers"
    os.environ.setdefault("JUDGE3D_TRELLIS_SRC", str(trellis_test_source() or DEFAULT_TRELLIS_SRC))
    if "xformers" not in sys.modules and importlib.util.find_spec("xformers") is None:
        fmha = _module("xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask)
        ops = _module("xformers.ops", memory_efficient_attention=memory_efficient_attention, fmha=fmha)
        _module("xformers", ops=ops)
    if "kaolin" not in sys.modules and importlib.util.find_spec("kaolin") is None:
        testing = _module("kaolin.utils.testing", check_tensor=lambda *args, **kwargs: True)
        _module("kaolin", utils=_module("kaolin.utils", testing=testing))
    if "utils3d" not in sys.modules and importlib.util.find_spec("utils3d") is None:
        _module("utils3d")


def spconv_bias_on_cpu() -> None:
    """5. spconv on CPU tensors: add the bias after the convolution (its training path), one thread."""
    from spconv.pytorch.conv import SparseConvolution

    if getattr(SparseConvolution._conv_forward, "judge3d_cpu_bias", False):
        return
    original = SparseConvolution._conv_forward

    def conv_forward(self, training, input, *args, **kwargs):
        if input.features.is_cuda:
            return original(self, training, input, *args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return original(self, True, input, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    conv_forward.judge3d_cpu_bias = True
    SparseConvolution._conv_forward = conv_forward


def mesh_extractor_on_cpu(trellis) -> None:
    """3. Build FlexiCubes and its grid on the CPU (TRELLIS defaults to device='cuda')."""
    cls = trellis.representations.mesh.SparseFeatures2Mesh
    device, res, use_color = cls.__init__.__defaults__
    cls.__init__.__defaults__ = ("cpu", res, use_color)


def spconv_backward_on_cpu() -> None:
    """6. Without CUDA, spconv's backward gets stream 0 instead of asking torch for a CUDA stream."""
    import spconv.pytorch.ops as spconv_ops

    if not torch.cuda.is_available():
        spconv_ops.get_current_stream = lambda: 0


def cpu_trellis():
    """TRELLIS's modules ready for the tests on a CPU: every stand-in above installed, the tiny models'
    ops on one thread (each takes milliseconds; a second thread only waits on a busy core). A
    generator: the thread count is restored when it closes (a module-scoped pytest fixture)."""
    install()
    from judge3d.generators.trellis_import import import_trellis

    modules = import_trellis()
    mesh_extractor_on_cpu(modules)
    spconv_bias_on_cpu()
    spconv_backward_on_cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield modules
    finally:
        torch.set_num_threads(threads)
