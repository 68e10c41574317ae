"""init_model(): the WavLM-Large ECAPA-TDNN speaker encoder loaded from the released files.

Nothing is fetched from the network: where the reference pulls WavLM-Large through
torch.hub, the fine-tuned checkpoint is expected to carry the WavLM weights
(`feature_extract.model.*`); if it does not, pass a WavLM-Large fairseq/s3prl
checkpoint ({"cfg": ..., "model": ...}) as `wavlm_checkpoint`.
"""

import warnings

import torch

from common.safe_load import key_report, safe_torch_load

from .ecapa_tdnn import ECAPA_TDNN, ECAPA_TDNN_SMALL
from .wavlm import WavLMArgs, parse_conv_feature_layers

MODEL_LIST = ["wavlm_large"]
WAVLM_PREFIX = "feature_extract.model."


def _torch_load(path) -> dict:
    """A dict checkpoint read with weights_only=True. No extra globals are allow-listed: a plain
    {"model": state_dict, ...} of tensors, OrderedDict and Python values needs none."""
    obj = safe_torch_load(path, "torch checkpoint")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _state_dict_of(path, obj: dict) -> dict:
    state = obj.get("model")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no 'model' state dict in checkpoint (top-level keys: {sorted(map(str, obj))[:8]})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: 'model' is not a state dict of tensors (e.g. entry {bad[0]!r})")
    return state


def _check_wavlm_cfg(path, cfg, expected: WavLMArgs) -> None:
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: 'cfg' is a {type(cfg).__name__}, expected a dict")
    try:
        given = WavLMArgs.from_cfg(cfg)
        same_conv = parse_conv_feature_layers(given.conv_feature_layers) == parse_conv_feature_layers(
            expected.conv_feature_layers)
    except (TypeError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable WavLM cfg: {e}") from None
    diffs = [f"{k}={getattr(given, k)!r} (expected {getattr(expected, k)!r})"
             for k in expected.__dataclass_fields__
             if k in cfg and k != "conv_feature_layers" and getattr(given, k) != getattr(expected, k)]
    if not same_conv:
        diffs.append(f"conv_feature_layers={given.conv_feature_layers!r} (expected {expected.conv_feature_layers!r})")
    if diffs:
        raise ValueError(f"{path}: WavLM cfg does not match the speaker encoder: " + "; ".join(diffs))


def load_speaker_encoder(model: ECAPA_TDNN, checkpoint, wavlm_checkpoint=None) -> ECAPA_TDNN:
    """Load a fine-tuned speaker checkpoint ({"model": state_dict}) into `model`.

    `model` may live on the meta device: tensors are assigned, not copied (float tensors are
    cast to float32 first). WavLM weights missing from `checkpoint` are taken from
    `wavlm_checkpoint`; BatchNorm `num_batches_tracked` counters missing from an old-format
    file are set to 0 (they do not affect inference). Every key of the model must be there with
    its shape; entries the model does not have (a training head) are ignored with a warning.
    `wavlm_checkpoint` is read only when `checkpoint` lacks WavLM entries.
    """
    state = dict(_state_dict_of(checkpoint, _torch_load(checkpoint)))
    expected = model.state_dict(keep_vars=True)
    wavlm_keys = [k for k in expected if k.startswith(WAVLM_PREFIX)]
    missing_wavlm = [k for k in wavlm_keys if k not in state]
    if missing_wavlm:
        if wavlm_checkpoint is None:
            raise ValueError(
                f"{checkpoint}: the speaker checkpoint does not contain the WavLM weights "
                f"({len(missing_wavlm)} of {len(wavlm_keys)} '{WAVLM_PREFIX}*' entries missing); pass a "
                "WavLM-Large fairseq/s3prl checkpoint (WavLM-Large.pt) with wavlm_checkpoint=PATH")
        wavlm_obj = _torch_load(wavlm_checkpoint)
        _check_wavlm_cfg(wavlm_checkpoint, wavlm_obj.get("cfg"), model.feature_extract.args)
        wavlm_state = _state_dict_of(wavlm_checkpoint, wavlm_obj)
        for key, value in wavlm_state.items():
            state.setdefault(WAVLM_PREFIX + key, value)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != torch.float32:
            state[key] = value.float()
    report = key_report({k: tuple(v.shape) for k, v in expected.items()},
                        {k: tuple(v.shape) for k, v in state.items()})
    if report.unexpected:
        # The released file is ~6.5 MB larger than the 323.9 M parameters of the encoder: it most
        # likely carries its training classifier head, which the reference skips (strict=False).
        warnings.warn(f"{checkpoint}: ignoring {len(report.unexpected)} entries the speaker encoder does not use "
                      f"(e.g. {report.unexpected[:3]})", stacklevel=2)
        for key in report.unexpected:
            del state[key]
    if not report.ok(allow_unexpected=True):
        source = checkpoint if wavlm_checkpoint is None else f"{checkpoint} (+ {wavlm_checkpoint})"
        raise ValueError(f"{source}: {report.message('speaker encoder', allow_unexpected=True)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def init_model(model_name: str, checkpoint=None, wavlm_checkpoint=None) -> ECAPA_TDNN:
    """The speaker encoder (eval mode): `model(wav_16k (B, T)) -> (B, 256)`.

    With `checkpoint=None` the weights are randomly initialised (as the reference does).
    """
    if model_name not in MODEL_LIST:
        raise ValueError(f"Unsupported model_name {model_name!r}; expected one of {MODEL_LIST}")
    if checkpoint is None:
        return ECAPA_TDNN_SMALL(feat_dim=1024, feat_type="wavlm_large").eval()
    with torch.device("meta"):  # weights come from the files: build without allocating them
        model = ECAPA_TDNN_SMALL(feat_dim=1024, feat_type="wavlm_large")
    return load_speaker_encoder(model, checkpoint, wavlm_checkpoint).eval()
