"""evaluation.asr: the Whisper and Qwen3-ASR wrappers on tiny randomly initialised models saved offline."""
import numpy as np
import pytest
import torch

from evaluation import asr

SPECIAL_WHISPER = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
                   "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
# A minimal Qwen3-ASR-style chat template (the released one also renders system prompts and tools).
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}")


def _byte_vocab():
    from tokenizers import pre_tokenizers

    return {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def _save_tiny_whisper(folder):
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    tokenizer = WhisperTokenizer(vocab=_byte_vocab(), merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_WHISPER[1:]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_WHISPER}
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1,
                           decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_ffn_dim=32, max_target_positions=32,
                           decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
                           pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    generation = GenerationConfig.from_model_config(config)
    generation._from_model_config = False
    generation.begin_suppress_tokens = None
    generation.lang_to_id = {"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]}
    generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.is_multilingual = True
    generation.max_length = 8
    model.generation_config = generation
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        folder)


def _save_tiny_qwen3_asr(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen3ASRConfig, Qwen3ASRFeatureExtractor,
                              Qwen3ASRForConditionalGeneration, Qwen3ASRProcessor)

    backend = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE,
        extra_special_tokens={"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                              "audio_eos_token": "<|audio_end|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|audio_start|>",
                                                                "<|audio_end|>", "<|audio_pad|>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.add_tokens(["<asr_text>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|audio_pad|>")}
    config = Qwen3ASRConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=32, downsample_hidden_size=4),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024),
        audio_token_id=ids["<|audio_pad|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]])
    torch.manual_seed(0)
    Qwen3ASRForConditionalGeneration(config).save_pretrained(folder)
    Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=tokenizer,
                      chat_template=QWEN_TEMPLATE).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    _save_tiny_whisper(root / "whisper")
    _save_tiny_qwen3_asr(root / "qwen3")
    return {"whisper-large-v3": root / "whisper", "qwen3-asr": root / "qwen3"}


def _clips():
    g = np.random.default_rng(24)
    return [(0.1 * g.standard_normal(n)).astype(np.float32) for n in (9000, 4000, 6400)]


@pytest.mark.parametrize("name", ["whisper-large-v3", "qwen3-asr"])
def test_one_transcript_per_clip_batched_as_single(name, tiny_folders, one_thread):
    model = asr.load_asr(name, tiny_folders[name], batch_size=2, max_new_tokens=3)
    assert isinstance(model, asr.WhisperASR if name == "whisper-large-v3" else asr.Qwen3ASR)
    clips = _clips()
    texts = model.transcribe(clips, "en")
    assert len(texts) == len(clips) and all(isinstance(t, str) for t in texts)
    model.batch_size = 1
    assert model.transcribe([torch.from_numpy(c) for c in clips], ["en"] * 3) == texts
    assert model.transcribe([], "en") == []
    with pytest.raises(ValueError):
        model.transcribe([np.zeros((2, 100), np.float32)], "en")
    with pytest.raises(ValueError):
        model.transcribe(clips, ["en"])


def test_whisper_forces_language_and_task(tiny_folders, monkeypatch):
    model = asr.load_asr("whisper-large-v3", tiny_folders["whisper-large-v3"], max_new_tokens=2)
    seen = {}
    generate = model.model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model.model, "generate", spy)
    assert len(model.transcribe(_clips()[:2], "zh")) == 2
    assert seen["language"] == "zh" and seen["task"] == "transcribe"


def test_qwen3_prompt_forces_language(tiny_folders):
    model = asr.load_asr("qwen3-asr", tiny_folders["qwen3-asr"])
    inputs = model.build_inputs(_clips()[:2], ["zh", "en"])
    prompts = model.processor.tokenizer.batch_decode(inputs["input_ids"])
    assert prompts[0].endswith("language Chinese<asr_text>") and prompts[1].endswith("language English<asr_text>")
    assert inputs["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last position


def test_loading_errors(tiny_folders, tmp_path):
    with pytest.raises(ValueError, match="qwen3_asr"):
        asr.load_asr("qwen3-asr", tiny_folders["whisper-large-v3"])
    with pytest.raises(FileNotFoundError, match="not found locally"):
        asr.load_asr("whisper-large-v3", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown ASR backend"):
        asr.load_asr("paraformer-zh", tmp_path)


def test_fft_resample_16k():
    t = np.arange(24000) / 24000
    resampled = asr.fft_resample_16k(np.sin(2 * np.pi * 440 * t), 24000)
    assert resampled.dtype == np.float32 and resampled.shape == (16000,)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(resampled - expected).max() < 1e-4  # a periodic tone survives FFT resampling exactly
    same = np.linspace(-1, 1, 100)
    np.testing.assert_array_equal(asr.fft_resample_16k(same, 16000), same.astype(np.float32))
