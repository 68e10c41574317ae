"""packed_linear: oneDNN linears with packed weights give F.linear's numbers (to float rounding), fall back
to F.linear exactly wherever they would not be the same computation, and never touch the state dict."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_err

from common import packed_linear
from speech_llm import SpeechLLM, tiny_model_args_and_config

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="oneDNN is not in this torch build")


def layer(in_f=48, out_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def packed(lin, rows_hint=4):
    packed_linear.install(lin, rows_hint)
    return lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (2, 3, 4, 48), (1, 48)])
@torch.no_grad()
def test_packed_equals_f_linear_float32(shape, bias):
    lin = layer(bias=bias)
    x = torch.randn(*shape)
    want = F.linear(x, lin.weight, lin.bias)
    got = packed(lin)(x)
    assert lin._packed is not None  # the packed kernel ran (not the fallback)
    assert got.shape == want.shape and max_rel_err(got, want) <= 1e-5


@torch.no_grad()
def test_packed_non_contiguous_input():
    lin = packed(layer())
    x = torch.randn(48, 6).t()  # a transposed view
    assert not x.is_contiguous()
    assert max_rel_err(lin(x), F.linear(x, lin.weight, lin.bias)) <= 1e-5


@torch.no_grad()
def test_packed_bfloat16_weights_under_autocast_and_without():
    lin = layer().to(torch.bfloat16)
    x = torch.randn(3, 5, 48)
    want = F.linear(x.bfloat16(), lin.weight, lin.bias).float()
    packed(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin(x)  # float32 input, bf16 autocast: bf16 compute, as F.linear under autocast
    assert got.dtype == torch.bfloat16 and lin._packed is not None
    # both accumulate in float32 and round the result to bf16: at most a couple of bf16 ulps apart
    assert max_rel_err(got.float(), want) <= 2e-2
    assert max_rel_err(lin(x.bfloat16()).float(), want) <= 2e-2


def test_fallbacks_are_f_linear_exactly():
    lin = packed(layer())
    x = torch.randn(4, 48)
    # grad needed: the autograd path, with gradients
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias)) and y.requires_grad and lin._packed is None
    y.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        # float32 weights under a bf16 autocast: autocast's bf16 linear, not a float32 packed one
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        # 1-D input and a float64 input: F.linear (a float64 weight is never packed either)
        v = torch.randn(48)
        assert torch.equal(lin(v), F.linear(v, lin.weight, lin.bias))
        d = layer().double()
        packed(d)
        xd = x.double()
        assert torch.equal(d(xd), F.linear(xd, d.weight, d.bias)) and d._packed is None
    assert lin._packed is None


@torch.no_grad()
def test_repacks_when_the_weight_changes():
    lin = packed(layer(seed=0))
    x = torch.randn(4, 48)
    lin(x)
    first = lin._packed[1]
    lin.load_state_dict(layer(seed=1).state_dict())  # copies in place: same storage, new version
    assert max_rel_err(lin(x), F.linear(x, lin.weight, lin.bias)) <= 1e-5
    assert lin._packed[1] is not first
    lin.weight.mul_(-2.0)
    assert max_rel_err(lin(x), F.linear(x, lin.weight, lin.bias)) <= 1e-5


@torch.no_grad()
def test_state_dict_deepcopy_pickle_and_uninstall():
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 8))
    keys = list(model.state_dict())
    assert packed_linear.install(model, rows_hint=4) == 2
    x = torch.randn(4, 48)
    y = model(x)
    assert packed_linear.packed_bytes(model) == 4 * (48 * 40 + 40 * 8)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)  # the opaque packed tensors are not copied; the twin packs its own
    assert twin[0]._packed is None and max_rel_err(twin(x), y) <= 1e-6
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole-module pickle works too
    packed_linear.uninstall(model)
    assert all(type(m) is nn.Linear and "_packed" not in m.__dict__ for m in (model[0], model[2]))
    assert packed_linear.packed_bytes(model) == 0
    assert torch.equal(model(x), F.linear(F.gelu(F.linear(x, model[0].weight, model[0].bias)),
                                          model[2].weight, model[2].bias))


def test_probe_does_not_move_the_global_rng():
    """The loop's noise comes from the global generator: checking for oneDNN must not draw from it."""
    packed_linear.available.cache_clear()
    torch.manual_seed(123)
    assert packed_linear.available()
    after_probe = torch.randn(4)
    torch.manual_seed(123)
    assert torch.equal(after_probe, torch.randn(4))


def test_resolve_modes():
    assert packed_linear.resolve("auto", torch.device("cpu")) is True
    assert packed_linear.resolve("off", torch.device("cpu")) is False
    assert packed_linear.resolve("auto", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="CPU"):
        packed_linear.resolve("on", torch.device("cuda"))
    with pytest.raises(ValueError, match="expected one of"):
        packed_linear.resolve("yes", torch.device("cpu"))


def test_speech_llm_loop_kernels_and_train_mode():
    args, config = tiny_model_args_and_config()
    torch.manual_seed(0)
    model = SpeechLLM(args, config).eval()
    keys = list(model.state_dict())
    model.packed_linear = "off"
    assert model.prepare_loop_kernels() is False
    assert not any(type(m) is packed_linear.PackedLinear for m in model.modules())
    model.packed_linear = "on"
    assert model.prepare_loop_kernels() is True
    kinds = {n.split(".")[0] for n, m in model.named_modules() if type(m) is packed_linear.PackedLinear}
    assert kinds == {"speech_cfm", "motion_cfm", "speech_patch_encoder", "motion_patch_encoder",
                     "projector_speech", "projector_motion", "head_stop"}
    assert not any(type(m) is packed_linear.PackedLinear for m in model.llm.modules())  # one-row GEMVs: no gain
    assert list(model.state_dict()) == keys
    # auto packs only weights big enough to win back oneDNN's per-call cost: none of the tiny model's
    model.packed_linear = "auto"
    assert model.prepare_loop_kernels() is True
    assert not any(type(m) is packed_linear.PackedLinear for m in model.modules())
    model.packed_linear = "on"
    model.prepare_loop_kernels()
    model.train()
    assert not any(type(m) is packed_linear.PackedLinear for m in model.modules())


def test_install_size_threshold():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    assert packed_linear.install(model, rows_hint=4, min_weight_numel=64 * 32) == 1
    assert type(model[0]) is packed_linear.PackedLinear and type(model[1]) is nn.Linear
    assert packed_linear.install(model, rows_hint=4, min_weight_numel=10**6) == 0  # a raised bar unpacks
    assert type(model[0]) is nn.Linear and "_packed" not in model[0].__dict__
