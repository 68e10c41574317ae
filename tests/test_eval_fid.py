"""evaluation.fid / frechet / fvd against the pytorch-fid, common_metrics and StyleGAN-V fixtures
(../shared/fixtures/eval, README_fid_fvd.md)."""
import contextlib
import json
import math
import warnings

import numpy as np
import pytest
import scipy
import scipy.linalg
import torch

from conftest import FIXTURES, load_fixture, shared, synth
from evaluation import frechet, fvd
from evaluation.fid import FIDInception, load_fid_inception, pool3_features
from evaluation.frechet import feature_stats, frechet_distance

# Suggested acceptance of README_fid_fvd.md, section Tolerances (max abs diff unless marked relative).
TOL_POOL3 = {"fid_inception": (1e-6, 0.0), "fid_inception_gain": (1e-5, 1e-5)}  # (atol, rtol)
TOL_BLOCKS = {"fid_inception": 1e-5, "fid_inception_gain": 2e-5}
TOL_X_IN = 4e-6  # 1e-6 with a fused-multiply-add source coordinate, 4e-6 without (torch build dependent)
RTOL_FULL_RANK = 1e-9  # fid_full, fvd_full: N > d in both sets
RTOL_RANK_DEFICIENT = 1e-7  # fid_rankdef, fvd_small (and the exactly singular rank-1 case)
RTOL_ANALYTIC_RANK1 = 1e-5
TOL_STATS = 1e-12  # float64 statistics (the references' own numpy calls), relative to the largest entry
TOL_DETECTOR_INPUT = 5e-7  # float detector inputs; uint8 ones must match exactly
TOL_SUM64 = 224 * 224 * TOL_DETECTOR_INPUT  # the per-frame float64 sums of such inputs

INTERMEDIATE_MODULES = {"block0_maxpool1": "maxpool1", "block1_maxpool2": "maxpool2"}  # wrapper blocks 0, 1
SCIPY_NEW_SQRTM = tuple(int(p) for p in scipy.__version__.split(".")[:2]) >= (1, 16)


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- FID Inception

class _Inception:
    """One real-size FIDInception for the module; the gain variant scales every conv weight in place."""

    def __init__(self):
        self.model, self.variant, self.results = None, None, {}

    def get(self, name):
        if self.model is None:
            with torch.device("meta"):  # every tensor comes from synth
                self.model = FIDInception().eval().requires_grad_(False)
            self.synth_state = synth().synth_state_dict(self.model)
        if self.variant != name:
            state = dict(self.synth_state)
            if name == "fid_inception_gain":  # every nn.Conv2d weight times float32(sqrt(2)), BN untouched
                gain = torch.tensor(math.sqrt(2.0), dtype=torch.float32)
                state.update({f"{n}.weight": state[f"{n}.weight"] * gain
                              for n, m in self.model.named_modules() if isinstance(m, torch.nn.Conv2d)})
            self.model.load_state_dict(state, strict=True, assign=True)
            self.variant = name
        return self.model

    def run(self, name):
        """{case key: (pool3 (B, 2048), x_in item 0 channel 0, {intermediate: map of item 0})}."""
        if name in self.results:
            return self.results[name]
        tensors, meta = load_fixture("eval", name)
        model = self.get(name)
        caught = {}
        hooks = [getattr(model, INTERMEDIATE_MODULES.get(n, n)).register_forward_hook(
            lambda _m, _i, out, n=n: caught.__setitem__(n, out[:1])) for n in meta["intermediates"]]
        out = {}
        try:
            for case in meta["cases"]:
                images = tensors[f"input.img.{case['key']}"].to(torch.float32) / 255
                caught.clear()
                with torch.no_grad():
                    pool3 = model(images)
                x_in = model.preprocess(images[:1, :1])
                out[case["key"]] = (pool3, x_in, dict(caught))
        finally:
            for hook in hooks:
                hook.remove()
        self.results[name] = (tensors, meta, out)
        return self.results[name]


@pytest.fixture(scope="module")
def inception():
    return _Inception()


def test_state_dict_matches_manifest():
    manifest = json.loads(shared(FIXTURES / "eval" / "fid_inception_manifest.json").read_text())
    model = FIDInception()
    state = model.state_dict()
    params = dict(model.named_parameters())
    assert len(state) == manifest["n_entries"] == len(manifest["entries"])
    assert list(state) == [e["key"] for e in manifest["entries"]]
    for entry in manifest["entries"]:
        tensor = state[entry["key"]]
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert str(tensor.dtype).removeprefix("torch.") == entry["dtype"], entry["key"]
        assert (entry["key"] in params) == (entry["kind"] == "param"), entry["key"]
    assert sum(p.numel() for p in params.values()) == manifest["n_params"]
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", ["fid_inception", "fid_inception_gain"])
def test_fid_inception(inception, name):
    tensors, meta, out = inception.run(name)
    atol, rtol = TOL_POOL3[name]
    for case in meta["cases"]:
        key = case["key"]
        pool3, x_in, caught = out[key]
        expected = tensors[f"output.pool3.{key}"]
        assert pool3.shape == (case["B"], 2048)
        torch.testing.assert_close(pool3, expected.flatten(1), atol=atol, rtol=rtol, msg=f"{name} {key} pool3")
        if f"inter.{key}.x_in_item0_ch0" in tensors:
            torch.testing.assert_close(x_in, tensors[f"inter.{key}.x_in_item0_ch0"], atol=TOL_X_IN, rtol=0)
        elif case["H"] == case["W"] == 299:
            images = tensors[f"input.img.{key}"][:1, :1].to(torch.float32) / 255
            assert torch.equal(x_in, 2 * images - 1)  # no resize: an exact copy
        if case["intermediates"]:
            for inter, spec in meta["intermediates"].items():
                got = caught[inter][:, ::spec["channel_stride"]]
                torch.testing.assert_close(got, tensors[f"inter.{key}.{inter}"], atol=TOL_BLOCKS[name], rtol=0,
                                           msg=f"{name} {key} {inter}")


def test_pool3_features_and_loader(inception, tmp_path):
    tensors, meta, out = inception.run("fid_inception")
    model = inception.get("fid_inception")
    path = tmp_path / "pt_inception.pth"
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)  # a plain state dict, as released (BN counters possibly absent)
    loaded = load_fid_inception(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    case = meta["cases"][0]
    images_u8 = tensors[f"input.img.{case['key']}"]
    feats = pool3_features(model, images_u8[:1], batch_size=1)  # uint8 in: divided by 255 like ToTensor
    assert feats.dtype == np.float64 and feats.shape == (1, 2048)
    np.testing.assert_allclose(feats, out[case["key"]][0][:1].double().numpy(),
                               atol=TOL_POOL3["fid_inception"][0], rtol=0)

    with pytest.raises(FileNotFoundError):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(1008)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth") as err:
        load_fid_inception(tmp_path / "bad.pth")
    message = str(err.value)
    assert "\n" not in message and "missing" in message and "Conv2d_1a_3x3.conv.weight (3, 3)" in message
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_fid_inception(tmp_path / "garbage.pth")


# ----------------------------------------------------------------------------- Fréchet distance

@pytest.fixture(scope="module")
def frechet_fixture():
    tensors, meta = load_fixture("eval", "frechet")
    return {k: v.numpy() for k, v in tensors.items()}, meta


def _case_rtol(spec):
    full_rank = spec["kind"] == "gauss" and min(spec["n1"], spec["n2"]) > spec["d"]
    return RTOL_FULL_RANK if full_rank else RTOL_RANK_DEFICIENT


def _sgv_batch_sizes(info):
    sizes = {call["which"]: call["batch_size"] for call in info["stylegan_v"]["calls"]}
    return sizes["gen"], sizes["real"]


def _distances(t, meta, case):
    """{implementation: our value} for every implementation the fixture ran on `case`."""
    feats1, feats2 = t[f"input.{case}.feats1"], t[f"input.{case}.feats2"]
    values = {}
    if f"output.{case}.pytorch_fid" in t:
        values["pytorch_fid"] = frechet_distance(*feature_stats(feats1), *feature_stats(feats2))
    if f"output.{case}.common_metrics" in t:
        values["common_metrics"] = fvd.fvd_from_features(feats1, feats2, "common_metrics")
    if f"output.{case}.stylegan_v" in t:
        batch_gen, batch_real = _sgv_batch_sizes(meta["cases"][case])
        if batch_gen == batch_real:
            values["stylegan_v"] = fvd.fvd_from_features(feats1, feats2, "stylegan_v", batch_size=batch_gen)
        else:
            mu1, sigma1 = feature_stats(feats1, ddof=0, batch_size=batch_gen)
            mu2, sigma2 = feature_stats(feats2, ddof=0, batch_size=batch_real)
            values["stylegan_v"] = frechet_distance(mu1, sigma1, mu2, sigma2, variant="stylegan_v")
    return values


def _assert_stats(got, expected):
    scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL_STATS * scale, equal_nan=True)


def test_frechet_stats(frechet_fixture):
    t, meta = frechet_fixture
    for case, info in meta["cases"].items():
        feats1, feats2 = t[f"input.{case}.feats1"], t[f"input.{case}.feats2"]
        if f"inter.{case}.pfid.mu1" in t:
            for i, feats in ((1, feats1), (2, feats2)):
                mu, sigma = feature_stats(feats)
                assert mu.dtype == sigma.dtype == np.float64
                _assert_stats(mu, t[f"inter.{case}.pfid.mu{i}"])
                _assert_stats(sigma, t[f"inter.{case}.pfid.sigma{i}"])
            if info["spec"]["kind"] == "gauss" or SCIPY_NEW_SQRTM:  # SciPy <= 1.15: NaN for the singular case
                product = t[f"inter.{case}.pfid.sigma1"] @ t[f"inter.{case}.pfid.sigma2"]
                with quiet():
                    covmean = scipy.linalg.sqrtm(product).real
                expected = t[f"inter.{case}.pfid.covmean_real"]
                np.testing.assert_allclose(covmean, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        batch_gen, batch_real = _sgv_batch_sizes(info)
        for prefix, ddof, sizes in (("cm", 1, (None, None)), ("sgv", 0, (batch_gen, batch_real))):
            if f"inter.{case}.{prefix}.mu_fake" not in t:
                continue
            for role, feats, size in (("fake", feats1, sizes[0]), ("real", feats2, sizes[1])):
                with quiet():  # np.cov of a single row warns (and gives NaN), as in the reference
                    mu, sigma = feature_stats(feats, ddof=ddof, batch_size=size)
                _assert_stats(mu, t[f"inter.{case}.{prefix}.mu_{role}"])
                _assert_stats(np.diagonal(sigma), t[f"inter.{case}.{prefix}.sigma_{role}_diag"])


def test_frechet_distances(frechet_fixture):
    t, meta = frechet_fixture
    crosscheck = meta.get("scipy_1_15_3_crosscheck", {})
    checked = 0
    for case, info in meta["cases"].items():
        with quiet():  # SciPy: deprecated disp / singular matrix
            values = _distances(t, meta, case)
        for impl, value in values.items():
            expected = float(t[f"output.{case}.{impl}"][0])
            rtol = _case_rtol(info["spec"])
            if info["spec"]["kind"] != "gauss" and not SCIPY_NEW_SQRTM:
                # SciPy <= 1.15: the exactly singular product has no sqrtm (NaN), pytorch-fid takes its eps path
                old = crosscheck[case][impl]
                expected = old["value"] if isinstance(old, dict) else old
            np.testing.assert_allclose(value, expected, rtol=rtol, atol=0, equal_nan=True, err_msg=f"{case} {impl}")
            checked += 1
        if "analytic_exact_value_ddof1" in info and SCIPY_NEW_SQRTM:
            np.testing.assert_allclose(values["common_metrics"], info["analytic_exact_value_ddof1"],
                                       rtol=RTOL_ANALYTIC_RANK1)
            np.testing.assert_allclose(values["stylegan_v"], info["analytic_exact_value_ddof0"],
                                       rtol=RTOL_ANALYTIC_RANK1)
    assert checked == sum(1 for k in t if k.startswith("output."))


def test_pytorch_fid_eps_path(frechet_fixture, monkeypatch):
    """A non-finite first sqrtm (SciPy <= 1.15 on singular products) is retried with eps on the diagonals."""
    t, meta = frechet_fixture
    real_sqrtm = scipy.linalg.sqrtm
    for case, info in meta["cases"].items():
        expected = info["pytorch_fid"].get("eps_branch_value_if_taken")
        if expected is None:
            continue
        calls = []

        def first_fails(a, calls=calls):
            calls.append(a)
            return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

        monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", first_fails)
        stats = [*feature_stats(t[f"input.{case}.feats1"]), *feature_stats(t[f"input.{case}.feats2"])]
        with pytest.warns(UserWarning, match="singular product"):
            value = frechet_distance(*stats)
        monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", real_sqrtm)
        assert len(calls) == 2
        np.testing.assert_allclose(value, expected, rtol=_case_rtol(info["spec"]), err_msg=case)


# ----------------------------------------------------------------------------- FVD preprocessing

@pytest.fixture(scope="module")
def fvd_fixture():
    return load_fixture("eval", "fvd_preprocess")


# stored prefix -> (input tensor, geometry entry of the JSON)
FVD_CASES = {"cm": ("input.videos_u8", "geometry_main"), "cm_gray": ("input.gray_u8", "geometry_gray"),
             "cm_square": ("input.square_u8", "geometry_square")}


def _assert_stored(name, got, expected):
    if expected.dtype == torch.float64:  # per-frame checksums
        torch.testing.assert_close(got.double(), expected, atol=TOL_SUM64, rtol=0, msg=name)
    else:
        torch.testing.assert_close(got, expected, atol=TOL_DETECTOR_INPUT, rtol=0, msg=name)


def test_fvd_preprocess_common_metrics(fvd_fixture):
    tensors, meta = fvd_fixture
    cm = meta["common_metrics"]
    assert fvd.DETECTOR_KWARGS["common_metrics"] == cm["detector_kwargs"]
    checked = 0
    for prefix, (input_key, geometry_key) in FVD_CASES.items():
        videos_u8 = tensors[input_key]
        b, t, c, h, w = videos_u8.shape
        geometry = cm[geometry_key]
        new_hw = fvd.resize_target_hw(h, w)
        assert list(new_hw) == geometry["resize_to_hw"]
        assert [(new_hw[0] - 224) // 2, (new_hw[1] - 224) // 2] == geometry["crop_start_hw"]

        x = fvd.preprocess(videos_u8.to(torch.float32) / 255, "common_metrics")
        assert x.shape == (b, 3, t, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
        if c == 1:
            assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
        for key, expected in tensors.items():
            if not key.startswith(f"output.{prefix}.detector_input."):
                continue
            what = key.rsplit(".", 1)[1]
            if what == "v0_f0":
                got = x[0, :, 0]
            elif what == "v1_flast":
                got = x[1, :, t - 1]
            elif what == "c0_f0":
                got = x[0, 0, 0]
            elif what in ("strided", "c0_strided"):
                stride = 224 // expected.shape[-1]
                got = x[:, :expected.shape[1], :, ::stride, ::stride]
            elif what == "sum64":
                got = x.double().sum(dim=(3, 4))
            else:
                raise AssertionError(f"unknown stored tensor {key}")
            assert got.shape == expected.shape, key
            _assert_stored(key, got, expected)
            checked += 1
    assert checked == sum(1 for k in tensors if k.startswith("output.cm"))


class _Projector(torch.nn.Module):
    """Stands in for the I3D TorchScript (same call signature): fixed projections of a pooled video, `dim`
    features (the real detector gives 400; fewer keep the test's matrix square roots cheap)."""

    def __init__(self, dim=400):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(192, dim, generator=torch.Generator().manual_seed(123)))

    def forward(self, x, rescale: bool, resize: bool, return_features: bool):
        pooled = torch.nn.functional.adaptive_avg_pool3d(x.float(), (4, 4, 4)).flatten(1)
        return torch.tanh(pooled @ self.proj / 64)


class _Recorder(_Projector):
    """_Projector that also records what it is handed."""

    def __init__(self, dim=400):
        super().__init__(dim)
        self.calls = []

    def forward(self, x, rescale: bool, resize: bool, return_features: bool):
        self.calls.append({"kwargs": {"rescale": rescale, "resize": resize, "return_features": return_features},
                           "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
                           "contiguous": x.is_contiguous()})
        return super().forward(x, rescale, resize, return_features)


def test_fvd_detector_calls(fvd_fixture):
    """Kwargs, shapes and number of detector calls of each common_metrics call in the fixture's log."""
    tensors, meta = fvd_fixture
    log = meta["common_metrics"]["calls_log"]
    inputs = {"common_metrics_only_final_true": ("input.videos_u8", True),
              "common_metrics_only_final_false": ("input.videos_u8", False),
              "common_metrics_gray_only_final_true": ("input.gray_u8", True),
              "common_metrics_square_only_final_true": ("input.square_u8", True)}
    for name, expected_calls in log.items():
        input_key, only_final = inputs[name]
        videos = tensors[input_key].to(torch.float32) / 255
        detector = _Recorder(dim=8)
        with quiet():  # singular covariances of two videos
            result = fvd.fvd(videos, videos, detector, "common_metrics", only_final=only_final)
        got = [{k: call[k] for k in ("kwargs", "shape", "dtype", "contiguous")} for call in detector.calls]
        want = [{k: call[k] for k in ("kwargs", "shape", "dtype", "contiguous")} for call in expected_calls]
        assert got == want, name
        if only_final:
            assert result == pytest.approx(0.0, abs=1e-4)  # identical sets (rank-deficient sqrtm)
        else:
            assert len(result) == videos.shape[1] - 9


def test_fvd_preprocess_stylegan_v(fvd_fixture):
    tensors, meta = fvd_fixture
    sgv = meta["stylegan_v"]
    assert fvd.DETECTOR_KWARGS["stylegan_v"] == sgv["detector_kwargs"]
    real = tensors["input.videos_u8"]
    assert fvd.stylegan_v_batch_size(real.shape[1]) == sgv["batch_size"]

    x = fvd.preprocess(real, "stylegan_v")
    recorded = sgv["real_path"]["detector_input"]
    assert list(x.shape) == recorded["shape"] and x.dtype == torch.uint8 and x.is_contiguous()
    assert torch.equal(x, real.permute(0, 2, 1, 3, 4))

    generated = fvd.preprocess(tensors["input.sgv_gen.frames_float"], "stylegan_v")
    assert torch.equal(generated, tensors["output.sgv_gen.detector_input_u8"])

    detector = _Recorder()
    features = fvd.i3d_features(detector, real, variant="stylegan_v")
    assert features.dtype == np.float64 and features.shape == (real.shape[0], 400)
    assert detector.calls[0]["kwargs"] == recorded["kwargs"] and detector.calls[0]["shape"] == recorded["shape"]


# ----------------------------------------------------------------------------- fixture-free properties

def test_frechet_properties():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 16))
    mu, sigma = feature_stats(feats)
    shift = rng.standard_normal(16)
    for variant in frechet.VARIANTS:
        assert abs(frechet_distance(mu, sigma, mu, sigma, variant=variant)) < 1e-9
        np.testing.assert_allclose(frechet_distance(mu + shift, sigma, mu, sigma, variant=variant),
                                   shift @ shift, rtol=1e-8)
    # ddof=0 from raw moments (batch by batch) equals the centred biased covariance
    feats32 = feats.astype(np.float32)  # FeatureStats casts every batch to float32 first
    mu0, sigma0 = feature_stats(feats32, ddof=0, batch_size=7)
    np.testing.assert_allclose(sigma0, np.cov(feats32, rowvar=False, ddof=0), atol=1e-12)
    np.testing.assert_allclose(mu0, feats32.astype(np.float64).mean(axis=0), atol=1e-15)
    # two diagonal Gaussians: d = |dmu|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    np.testing.assert_allclose(frechet_distance(mu, np.diag(v1), mu, np.diag(v2)),
                               np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2), rtol=1e-10)


def test_pytorch_fid_rejects_imaginary_root(monkeypatch):
    complex_root = np.eye(4) * (1 + 0.5j)
    monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda a: complex_root)
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(4))
    # the FVD formula takes the real part instead
    assert frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), np.eye(4), variant="common_metrics") == 0.0


def test_resize_geometry():
    # README: the float64 ceil adds a pixel for these square sizes, not for the powers of two
    for side in (25, 41, 43, 50, 51, 100, 200, 400):
        assert fvd.resize_target_hw(side, side) == (225, 224), side
    for side in (64, 128, 256, 512):
        assert fvd.resize_target_hw(side, side) == (224, 224), side
    assert fvd.resize_target_hw(64, 80) == (224, 280) and fvd.resize_target_hw(80, 64) == (280, 224)
    video = torch.rand(1, 10, 1, 30, 40)
    x = fvd.preprocess(video)
    assert x.shape == (1, 3, 10, 224, 224) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError):
        fvd.preprocess(torch.rand(1, 10, 2, 30, 40))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 6 videos, 16 features: singular covariances
def test_load_i3d_and_fvd(tmp_path):
    """A scripted stand-in detector through load_i3d; FVD from videos equals FVD from their features."""
    path = tmp_path / "i3d_torchscript.pt"
    with quiet():  # torch.jit.script is deprecated in recent torch; the released detector is TorchScript
        torch.jit.save(torch.jit.script(_Projector(dim=16)), str(path))
    detector = fvd.load_i3d(path)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(6, 10, 3, 32, 40, generator=gen)
    fake = (real + 0.2 * torch.rand(real.shape, generator=gen)).clamp(0, 1)
    value = fvd.fvd(real, fake, detector, batch_size=4)
    expected = fvd.fvd_from_features(fvd.i3d_features(detector, fake, 4), fvd.i3d_features(detector, real, 4))
    assert value == pytest.approx(expected, rel=1e-12) and value > 0
    other_batches = fvd.fvd_from_features(fvd.i3d_features(detector, fake, 5), fvd.i3d_features(detector, real, 3))
    assert other_batches == pytest.approx(value, rel=1e-6)  # batching only changes float32 GEMM rounding
    assert fvd.fvd(real, real, detector) == pytest.approx(0.0, abs=1e-9)
    sgv = fvd.fvd((real * 255).to(torch.uint8), fake * 2 - 1, detector, variant="stylegan_v", batch_size=4)
    assert np.isfinite(sgv) and sgv > 0
    with pytest.raises(ValueError, match="at least 10"):
        fvd.fvd(real[:, :9], fake[:, :9], detector)
    with pytest.raises(FileNotFoundError):
        fvd.load_i3d(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        fvd.load_i3d(tmp_path / "junk.pt")
