"""WavLM-Large ECAPA-TDNN speaker encoder (UniSpeech speaker verification, wavlm_large).

    model = init_model("wavlm_large", "wavlm_large_finetune.pth")
    emb = model(wav_16k)   # (B, T) float32 16 kHz -> (B, 256)
"""
from .ecapa_tdnn import ECAPA_TDNN, ECAPA_TDNN_SMALL, EcapaDims, tiny_speaker_encoder
from .verification import MODEL_LIST, init_model, load_speaker_encoder
from .wavlm import (
    WavLMArgs,
    WavLMUpstream,
    fairseq_to_hf_wavlm_key,
    hf_to_fairseq_wavlm_key,
    tiny_wavlm_args,
    wavlm_large_args,
)

__all__ = [
    "ECAPA_TDNN",
    "ECAPA_TDNN_SMALL",
    "EcapaDims",
    "MODEL_LIST",
    "WavLMArgs",
    "WavLMUpstream",
    "fairseq_to_hf_wavlm_key",
    "hf_to_fairseq_wavlm_key",
    "init_model",
    "load_speaker_encoder",
    "tiny_speaker_encoder",
    "tiny_wavlm_args",
    "wavlm_large_args",
]
