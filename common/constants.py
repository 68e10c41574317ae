"""The model's fixed rates and limits, in one place (every module imports them from here)."""

FPS = 25  # WhisperX-VAE latent, LIA-X motion and output video frame rate
PATCH_SIZE = 4  # frames per backbone token (160 ms)
CODEC_SAMPLE_RATE = 24000  # WhisperX-VAE waveform rate (the output audio)
WHISPER_SAMPLE_RATE = 16000  # Whisper log-mel and WavLM input rate
SAMPLES_PER_FRAME = CODEC_SAMPLE_RATE // FPS  # 960 output samples per latent frame
SAMPLES_PER_FRAME_16K = WHISPER_SAMPLE_RATE // FPS  # 640
MAX_SECONDS = 30  # one generation window / one Whisper pass
MAX_FRAMES = FPS * MAX_SECONDS  # 750: the reference's FIXED_MOTION_LEN
MIN_SECONDS = 0.1  # shorter clips give fewer than a few latent frames

MOTION_DIM = 40  # LIA-X motion channels

# The released inference loop (infer.py: ar_generate_motion_continuation)
RELEASED_CAP_MARGIN_PATCHES = 15  # patches allowed past the reference clip's length (15 x 160 ms = 2.4 s)
RELEASED_CAP_MARGIN_SECONDS = RELEASED_CAP_MARGIN_PATCHES * PATCH_SIZE / FPS  # 2.4
STOP_MIN_PATCHES = 7  # the stop head is not read before this many patches
STOP_PATIENCE = 3  # consecutive patches with p_stop >= threshold end generation
STOP_THRESHOLD = 0.5
