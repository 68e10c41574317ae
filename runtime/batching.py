"""Several requests through the released loop together (a batch file's `--batch-size N`).

    outs = run_batched(model, [BatchItem(prompt, plan, sampling, seed), ...])   # one GenerationOutput each

The backbone runs all live rows in one call over a left-padded KV cache (each row its own positions and
attention mask); the two heads sample all live rows in one CFM call (the CFG pair of every row in one
batch). Every row keeps its own stop rule, length plan and prompt prefix, and draws its noise from its own
generator seeded with its seed, in the order a lone run draws from the global RNG after
torch.manual_seed(seed): the same samples as running each request alone, up to the float rounding of
batched GEMMs. A row that stops leaves the batch (its cache rows are dropped). Rows share the model, the
task and the head settings that are one scalar per CFM call (cfm_steps, cfm_cfg); teacher-forced requests
(a2v, v2a) run alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers.cache_utils import DynamicCache

from runtime.generation import GenerationOutput, LengthPlan, Sampling, stack_frames
from runtime.prompt import Prompt


@dataclass
class BatchItem:
    prompt: Prompt
    plan: LengthPlan
    sampling: Sampling
    seed: int


class _Row:
    """One request's state in the batch."""

    def __init__(self, item: BatchItem, device):
        self.item = item
        self.rng = torch.Generator(device=device).manual_seed(int(item.seed))
        self.speech_hist = list(item.prompt.speech_history)
        self.motion_hist = list(item.prompt.motion_history)
        self.speech, self.motion, self.stop_probs = [], [], []
        self.streak, self.n_patches = 0, 0
        self.stopped_by: Optional[str] = None


def batch_key(item: BatchItem) -> tuple:
    """Requests with equal keys can share a batch."""
    return item.prompt.task, item.sampling.cfm_steps, float(item.sampling.cfm_cfg)


@torch.no_grad()
def run_batched(model, items: List[BatchItem]) -> List[GenerationOutput]:
    if not items:
        return []
    if len({batch_key(it) for it in items}) > 1:
        raise ValueError("a batch needs one task and one cfm_steps / cfm_cfg (see batch_key)")
    dev, task = model.device, items[0].prompt.task
    rows = [_Row(it, dev) for it in items]
    live = list(range(len(rows)))
    model.prepare_loop_kernels()
    cache = DynamicCache(config=model.llm.config)
    h, mask = _prefill(model, [it.prompt.prefill_embeds for it in items], cache)
    step = 0
    while live:
        h, mask, live = _drop_finished(model, rows, live, step, h, mask, cache)
        if not live:
            break
        speech = _sample_rows(model, model.speech_cfm, [rows[i] for i in live], h, "speech")
        motion = None
        if task == "t2av" and step >= model.delay:
            motion = _sample_rows(model, model.motion_cfm, [rows[i] for i in live], h, "motion")
        for k, i in enumerate(live):
            r = rows[i]
            r.speech.append(speech[k])
            r.speech_hist.append(speech[k])
            if motion is not None:
                r.motion.append(motion[k])
                r.motion_hist.append(motion[k])
            r.n_patches = step + 1
        step += 1
        more = [k for k, i in enumerate(live) if step < rows[i].item.plan.max_steps]
        if not more:
            break
        if len(more) < len(live):  # rows at their length cap: the state after their last patch is never used
            h, mask, live = _select(cache, h, mask, live, more)
            speech = speech[more]
            motion = None if motion is None else motion[more]
        token = model.patch_token(speech, motion, motion_pad=(task == "tts"))
        h, mask = _step(model, token, mask, cache)
    for r in rows:
        r.stopped_by = r.stopped_by or "length_cap"
    return [_output(model, r) for r in rows]


def _prefill(model, prefills, cache):
    """Left-padded prefill of (1, L_i, D) embeddings -> (h (B, D), attention mask (B, L))."""
    length = max(p.shape[1] for p in prefills)
    width = prefills[0].shape[-1]
    embeds = prefills[0].new_zeros((len(prefills), length, width))
    mask = torch.zeros((len(prefills), length), dtype=torch.long, device=model.device)
    for b, p in enumerate(prefills):
        embeds[b, length - p.shape[1]:] = p[0]
        mask[b, length - p.shape[1]:] = 1
    return _backbone(model, embeds, mask, cache), mask


def _backbone(model, embeds, mask, cache):
    """Last hidden state (B, D) of the new positions of `embeds` (B, L_new, D) given the full mask."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -embeds.shape[1]:]
    with model.amp():
        out = model.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                              use_cache=True)
    return out.last_hidden_state[:, -1]


def _step(model, token, mask, cache):
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    return _backbone(model, token, mask, cache), mask


def _select(cache, h, mask, live, keep):
    index = torch.tensor(keep, device=h.device)
    cache.batch_select_indices(index)
    return h[index], mask[index], [live[k] for k in keep]


def _drop_finished(model, rows, live, step, h, mask, cache):
    """The stop rule of every live row at the start of `step` (as PatchStream); stopped rows leave."""
    probs = None
    keep = []
    for k, i in enumerate(live):
        r, plan, s = rows[i], rows[i].item.plan, rows[i].item.sampling
        if step >= plan.max_steps:
            r.stopped_by = "length_cap"
            continue
        if plan.use_stop_head and step >= s.stop_min_patches:
            if probs is None:
                with model.amp():
                    probs = torch.sigmoid(model.head_stop(h.float().unsqueeze(1))[:, 0].float())
            p = float(probs[k])
            r.streak = r.streak + 1 if p >= s.stop_threshold else 0
            if r.streak >= s.stop_patience:
                r.stopped_by = "stop_head"
                continue
            r.stop_probs.append(p)
        else:
            r.stop_probs.append(None)
        keep.append(k)
    if len(keep) < len(live):
        if not keep:
            return h, mask, []
        return _select(cache, h, mask, live, keep)
    return h, mask, live


def _sample_rows(model, cfm, rows, h, head: str):
    """One patch per row (B, P, C) from one batched CFM call, each row's noise from its own generator."""
    P, C = model.patch_size, cfm.in_channels
    s = rows[0].item.sampling
    hist = [r.speech_hist if head == "speech" else r.motion_hist for r in rows]
    cond = torch.cat([model.cfm_context(x, C) for x in hist])
    glob = torch.cat([(r.item.prompt.speaker_emb if head == "speech" else r.item.prompt.first_motion_norm).float()
                      for r in rows])
    noise = torch.cat([torch.randn((1, C, P), generator=r.rng, device=model.device) * float(r.item.sampling.cfm_temperature)
                       for r in rows])
    # each row's temperature is in its noise (rows may differ in it), so the sampler's own factor is 1
    return model.sample_patches(cfm, h, cond, glob, s.cfm_steps, 1.0, s.cfm_cfg, noise)


def _output(model, r: _Row) -> GenerationOutput:
    p, a = r.item.prompt, model.model_args
    return GenerationOutput(
        speech_latents=stack_frames(r.speech, a.speech_embedding_dim, model.device),
        motion_norm=stack_frames(r.motion, a.motion_embedding_dim, model.device),
        prefix_speech_latents=p.prefix_speech_latents.float(), prefix_motion_norm=p.prefix_motion_norm.float(),
        n_patches=r.n_patches, stopped_by=r.stopped_by, plan=r.item.plan, stop_probs=r.stop_probs)


# ------------------------------------------------------------------------------------------ requests

def generate_batch(pipe, requests, batch_size: int = 4, progress=False) -> list:
    """TalkerPipeline.generate for each request, with the loops of up to `batch_size` compatible requests
    (t2av / tts with equal batch_key) run together: the pipeline's own steps (prepare -> plan -> prompt,
    loop, finish -> write) with run_batched as the loop. Teacher-forced modes (a2v, v2a) and long-form
    requests (their windows follow one another) run alone. Returns results in request order; a request
    that fails raises (use TalkerPipeline.generate per request for per-line errors)."""
    from runtime import pipeline as P
    from common.motion_stats import normalize_motion
    from runtime.prompt import build_prompt, text_prompt

    jobs = []
    for request in requests:
        req = P.resolve_request(request)
        if req.mode not in ("t2av", "tts"):
            jobs.append((req, None))
            continue
        inputs, plan, windows = pipe._inputs(req, progress)
        if windows is not None:
            jobs.append((req, None))
            continue
        ids, start = text_prompt(pipe.tokenizer, req.text, plan.n_placeholders,
                                 int(pipe.model_args.model_max_length), pipe.patch_size)
        ref_motion = None if inputs.ref_motion_raw is None else normalize_motion(inputs.ref_motion_raw)
        prompt = build_prompt(pipe.llm, ids, start, inputs.ref_latents, inputs.speaker, plan, ref_motion)
        item = BatchItem(prompt, plan, Sampling(req.cfm_steps, req.cfm_temperature, req.cfm_cfg), req.seed)
        jobs.append((req, (inputs, item)))
    outs, groups = {}, {}
    for n, (_, job) in enumerate(jobs):
        if job is not None:
            groups.setdefault(batch_key(job[1]), []).append(n)
    for members in groups.values():
        for lo in range(0, len(members), max(1, batch_size)):
            chunk = members[lo:lo + batch_size]
            for n, out in zip(chunk, run_batched(pipe.llm, [jobs[n][1][1] for n in chunk])):
                outs[n] = out
    results = []
    for n, (req, job) in enumerate(jobs):
        if job is None:
            results.append(pipe.generate(req, progress=progress))
            continue
        inputs, item = job
        paths = None if req.output is None else P.output_paths(req.output, req.mode, req.save_latents)
        results.append(pipe._finish(req, inputs, item.plan, outs[n], [], paths, {}, progress))
    return results
