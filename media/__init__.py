"""Files in and out: audio (load, resample, log-mel, wav), video (probe, frames, mp4 writing) and
all-or-nothing output files."""
