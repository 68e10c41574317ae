"""One generation run: requests, the length plan, the patch loop and its step runners, long-form windows,
streaming, batches, and TalkerPipeline (every model of Talker-T2AV behind the four modes)."""
