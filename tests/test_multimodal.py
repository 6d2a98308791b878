"""Multimodal models with RAPID: the encoder runs with the prefill, and its outputs live in the prefill lane's runner
until vLLM's encoder cache evicts them, freed only while that lane is idle.

The engine-free tests drive RapidScheduler with the tiny Idefics3's configuration and play the prefill runner's
encoder cache as RapidWorker keeps it (``PrefillEncoderCache``), checking on every prefill batch that each item it
reads is there, as vLLM's runner requires. The engine tests run the tiny Idefics3 on real vLLM (CPU build) against
vLLM's default scheduler.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from vllm import SamplingParams
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

from vllm_rapid.protocol import RapidSchedulerOutput
from vllm_rapid.testing.scheduler import LaneDriver, SchedulerSetup, make_requests, make_scheduler, prompts_of_lengths
from vllm_rapid.worker.encoder_cache import PrefillEncoderCache

IMAGE_TOKENS = 16  # the tiny Idefics3's <image> tokens per image


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    from vllm_rapid.testing.tiny_vlm import make_tiny_idefics3

    return str(make_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3")))


# ---- engine-free: the scheduler and the prefill runner's encoder cache ------------------------------------------


def image_at(mm_hash: str, offset: int) -> MultiModalFeatureSpec:
    """An image item as the engine core hands it to the scheduler (no pixels: the scheduler needs none)."""
    return MultiModalFeatureSpec(data=None, modality="image", identifier=mm_hash,
                                 mm_position=PlaceholderRange(offset=offset, length=IMAGE_TOKENS))


class EncoderLaneDriver(LaneDriver):
    """LaneDriver with the prefill runner's encoder cache, kept as RapidWorker keeps it.

    Each prefill batch applies its own frees, then computes its scheduled encoder inputs (unless the test says the
    batch fails before its encoder ran) and reads every item its tokens cover: a missing one is vLLM's "Encoder
    cache miss". Frees riding with the decode batch wait until no prefill batch is in flight.
    """

    def __init__(self, scheduler, **kwargs) -> None:
        super().__init__(scheduler, **kwargs)
        self.runner = SimpleNamespace(encoder_cache={})
        self.encoder_cache = PrefillEncoderCache(self.runner)
        self.encoder_fails = False  # the next prefill batch raises before its encoder runs
        self.handed_on = 0  # frees that rode with a decode batch
        schedule = scheduler.schedule

        def schedule_and_run_encoder(*args, **kw):
            step = schedule(*args, **kw)
            self._run_encoder(step)
            return step

        scheduler.schedule = schedule_and_run_encoder

    def _run_encoder(self, step: RapidSchedulerOutput) -> None:
        self.handed_on += len(step.free_encoder_mm_hashes)
        self.encoder_cache.defer(step.free_encoder_mm_hashes)
        if self.lane is None:
            self.encoder_cache.release()
        if step.prefill is None:
            return
        batch, cache = step.prefill.scheduler_output, self.runner.encoder_cache
        for mm_hash in batch.free_encoder_mm_hashes:
            cache.pop(mm_hash, None)
        if self.encoder_fails:
            self.encoder_fails = False
            return
        requests = self.scheduler.requests
        for req_id, input_ids in batch.scheduled_encoder_inputs.items():
            cache.update({requests[req_id].mm_features[i].identifier: "output" for i in input_ids})
        for req_id, num_tokens in batch.num_scheduled_tokens.items():
            end = requests[req_id].num_computed_tokens  # already counts this batch
            for item in requests[req_id].mm_features:
                pos = item.mm_position
                if pos.offset < end and end - num_tokens < pos.offset + pos.length:
                    assert item.identifier in cache, f"encoder cache miss for {item.identifier} ({req_id})"

    def assert_cache_matches_the_manager(self) -> None:
        """Once idle, the runner holds exactly the entries vLLM's encoder cache manager still counts."""
        self.encoder_cache.release()
        assert sorted(self.runner.encoder_cache) == sorted(self.scheduler.encoder_cache_manager.cached)


def vlm_setup(model: str, **changes) -> SchedulerSetup:
    # The encoder cache holds max_num_batched_tokens embeddings: 4 images.
    defaults = dict(model=model, max_num_batched_tokens=4 * IMAGE_TOKENS, max_model_len=512,
                    rapid={"debug_invariants": True})
    return SchedulerSetup(**(defaults | changes))


def image_requests(hashes: list[str], ids: list[str], text: int = 8, max_tokens: int = 4):
    prompts = prompts_of_lengths([2 + IMAGE_TOKENS + text] * len(hashes), seed=len(ids[0]))
    return make_requests(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), ids=ids,
                         mm_features=[[image_at(h, 2)] for h in hashes])


def test_evictions_by_a_prefill_pass_that_launched_nothing_reach_the_prefill_runner(tiny_vlm):
    """With the encoder cache full, a request's encoder input evicts an entry and then its KV does not fit: the pass
    schedules nothing and launches no batch. The eviction rides with the decode batch and is applied in the idle
    prefill runner, which would otherwise keep an entry vLLM no longer counts."""
    scheduler = make_scheduler(vlm_setup(tiny_vlm, num_blocks=21))
    driver = EncoderLaneDriver(scheduler)
    driver.run_until_idle({0: image_requests(["img0", "img1", "img2", "img3"], ["a0", "a1", "a2", "a3"])})
    assert len(scheduler.encoder_cache_manager.cached) == 4  # full, nobody refers to them
    keep = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    driver.add(*make_requests(prompts_of_lengths([96, 96], seed=5), keep, ids=["t0", "t1"]))
    pool = scheduler.kv_cache_manager.block_pool
    for _ in range(200):
        driver.step()
        if pool.get_num_free_blocks() < 2 and not any(map(scheduler.in_prefill_lane, scheduler.running)):
            break
    assert driver.handed_on == 0
    driver.add(*image_requests(["img4"], ["late"]))
    driver.run_until_idle()
    assert len(driver.tokens["late"]) == 4
    driver.assert_cache_matches_the_manager()
    assert driver.handed_on == 1, "the new image's KV fitted at once: the test meant nothing"


def test_a_failed_prefill_batch_leaves_no_encoder_output_counted_as_cached(tiny_vlm):
    """A prefill batch that raised before its encoder ran: a later request with the same image must run the encoder
    again rather than read an entry the prefill runner never computed."""
    scheduler = make_scheduler(vlm_setup(tiny_vlm))
    driver = EncoderLaneDriver(scheduler, prefill_steps=None)
    driver.encoder_fails = True
    driver.add(*image_requests(["img0", "img1"], ["f0", "f1"]))
    driver.step()
    driver.complete_prefill(error="the encoder raised")
    driver.step()
    assert driver.finish_reasons.keys() == {"f0", "f1"}
    driver.run_until_idle({0: image_requests(["img0"], ["again"])})
    assert len(driver.tokens["again"]) == 4
    driver.assert_cache_matches_the_manager()


def test_a_prompt_sharing_a_cached_image_reads_it_from_the_prefill_runner(tiny_vlm):
    """A second request with the same image, prefilled in a later batch: no encoder run, the entry is read from the
    prefill runner's cache; then every entry is evicted in turn by new images without a miss or a leak."""
    scheduler = make_scheduler(vlm_setup(tiny_vlm))
    driver = EncoderLaneDriver(scheduler)
    driver.run_until_idle({0: image_requests(["img0"], ["first"]), 1: image_requests(["img0"], ["second"], text=20)})
    assert sum(len(r.prefill_launch.scheduler_output.scheduled_encoder_inputs)
               for r in driver.records if r.prefill_launch) == 1
    hashes = [f"new{i}" for i in range(6)]
    driver.run_until_idle({0: image_requests(hashes, [f"n{i}" for i in range(6)])})
    assert "img0" not in scheduler.encoder_cache_manager.cached
    driver.assert_cache_matches_the_manager()


def test_an_image_is_never_split_when_vllm_must_not_chunk_it(tiny_vlm):
    """With --disable-chunked-mm-input (vLLM forces it on GPUs for models attending bidirectionally within an
    image), a prefill chunk smaller than the image would split it across two batches: RAPID chunks at vLLM's budget."""
    scheduler = make_scheduler(vlm_setup(tiny_vlm, disable_chunked_mm_input=True, rapid={"prefill_chunk_tokens": 8}))
    assert scheduler.prefill_token_budget == scheduler.scheduler_config.max_num_batched_tokens
    driver = EncoderLaneDriver(scheduler)
    prompt = prompts_of_lengths([40], seed=3)
    (request,) = make_requests(prompt, SamplingParams(temperature=0.0, max_tokens=2), ids=["img"],
                               mm_features=[[image_at("img0", 3)]])
    driver.run_until_idle({0: [request]})
    computed = [0]
    for record in driver.records:
        if record.prefill_launch is not None:
            computed.append(computed[-1] + record.prefill_launch.scheduler_output.num_scheduled_tokens["img"])
    assert not any(3 < boundary < 3 + IMAGE_TOKENS for boundary in computed), computed


# ---- real vLLM: the tiny Idefics3 against vLLM's default scheduler ----------------------------------------------

ENGINE = dict(max_model_len=2048, engine_kwargs={"max_num_batched_tokens": 512, "limit_mm_per_prompt": {"image": 2}})


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (56 + 8 * (i % 3), 56, 3), dtype=np.uint8)) for i in range(n)]


def image_prompt(text: str, *pictures: Image.Image, words: int = 0, seed: int = 0) -> dict:
    """A prompt with an ``<image>`` per picture after ``text``, then ``words`` random words."""
    rng = random.Random(seed)
    filler = " ".join(rng.choice(["fox", "dog", "GPU", "cache", "token", "lane"]) for _ in range(words))
    prompt = f"User:{text}" + "<image>" * len(pictures) + f"{filler}<end_of_utterance>\nAssistant:"
    return {"prompt": prompt, "multi_modal_data": {"image": list(pictures)}} if pictures else {"prompt": prompt}


@pytest.fixture(scope="module")
def default_vlm(tiny_vlm):
    from test_rapid_engine import make_llm

    return make_llm(tiny_vlm, "default", **ENGINE)


@pytest.fixture(scope="module")
def rapid_vlm(tiny_vlm):
    from failing_logits import failing_logits_processor
    from test_rapid_engine import make_llm

    engine = ENGINE | {"engine_kwargs": ENGINE["engine_kwargs"] | {"logits_processors": [failing_logits_processor()]}}
    return make_llm(tiny_vlm, "rapid", idle_wait_ms=0.01, **engine)


def assert_encoder_cache_clean(llm) -> None:
    """Idle: the prefill runner holds exactly what vLLM's encoder cache manager counts, no request refers to any
    entry, and the decode runner never held one."""
    from test_rapid_engine import assert_idle_and_clean, scheduler_of

    assert_idle_and_clean(llm)
    manager = scheduler_of(llm).encoder_cache_manager
    assert all(not refs for refs in manager.cached.values()) and not manager.request_cached_ids
    (entries,) = llm.collective_rpc("rapid_encoder_cache_entries")
    assert entries == {"decode": [], "prefill": sorted(manager.cached)}


@pytest.mark.slow
def test_image_prompts_match_default_while_text_decodes(default_vlm, rapid_vlm):
    """Image prompts (one or two images, a shared image, an image past a 512-token chunk boundary) prefilled on the
    prefill lane while text requests decode, then the same prompts again (prefix-cache and encoder-cache hits)."""
    from test_rapid_engine import decode_while_prefilling

    pics = images(4)
    text = [image_prompt("Hello world!", words=40, seed=1), image_prompt("How are you?", words=90, seed=2)]
    with_images = [
        image_prompt("Describe:", pics[0]),
        image_prompt("Compare", pics[1], pics[2], words=12, seed=3),
        image_prompt("Again:", pics[0], words=5, seed=4),
        image_prompt("The quick brown fox " * 100, pics[3], seed=5),  # the image straddles the first chunk's end
    ]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for _ in range(2):
        expected = decode_while_prefilling(default_vlm, text, with_images, params)
        got = decode_while_prefilling(rapid_vlm, text, with_images, params)
        assert {k: list(v.outputs[0].token_ids) for k, v in got.items()} == {
            k: list(v.outputs[0].token_ids) for k, v in expected.items()}
        assert_encoder_cache_clean(rapid_vlm)
    image_token = rapid_vlm.get_tokenizer().convert_tokens_to_ids("<image>")
    at = [i for i, t in enumerate(got["b3"].prompt_token_ids) if t == image_token]
    assert at[0] < ENGINE["engine_kwargs"]["max_num_batched_tokens"] <= at[-1], "the image is not split by a chunk"


@pytest.mark.slow
def test_more_images_than_the_encoder_cache_holds_match_default(default_vlm, rapid_vlm):
    """48 distinct images through a 32-image encoder cache: entries are evicted as new ones arrive, none leaks in
    the prefill runner and none is missing when read."""
    from test_rapid_engine import scheduler_of, token_ids

    prompts = [image_prompt(f"Image {i}:", pic, words=i % 7, seed=i) for i, pic in enumerate(images(48, seed=7))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = token_ids(default_vlm.generate(prompts, params, use_tqdm=False))
    assert token_ids(rapid_vlm.generate(prompts, params, use_tqdm=False)) == expected
    assert len(scheduler_of(rapid_vlm).encoder_cache_manager.cached) <= 32
    assert_encoder_cache_clean(rapid_vlm)


@pytest.mark.slow
def test_aborts_of_image_requests_at_every_stage_free_everything(rapid_vlm):
    """Abort an image request queued behind a busy prefill lane, one in the prefill batch in flight and one
    decoding, in one step: the others finish whole, every block, runner state and encoder-cache reference comes
    back, and vLLM's encoder-cache reset empties the prefill runner's cache."""
    from test_rapid_engine import _step_until, run_until_idle, scheduler_of

    llm, pics = rapid_vlm, images(5, seed=11)
    engine, sched = llm.llm_engine, scheduler_of(llm)
    keep = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine.add_request("decoding", image_prompt("Look:", pics[0]), keep)
    engine.add_request("decoding-kept", image_prompt("See:", pics[1], words=3), keep)
    _step_until(llm, lambda: sched.running and not any(map(sched.in_prefill_lane, sched.running)))
    engine.add_request("in-flight", image_prompt("Read:", pics[2], words=900, seed=9), keep)
    _step_until(llm, lambda: sched.inflight_prefill is not None)
    engine.add_request("queued", image_prompt("Next:", pics[3]), keep)
    engine.add_request("queued-kept", image_prompt("Last:", pics[4], words=2), keep)
    assert {r.request_id.rsplit("-", 1)[0] for r in sched.waiting} == {"queued", "queued-kept"}
    engine.abort_request(["queued", "in-flight", "decoding"])
    finished = run_until_idle(llm)
    assert {rid for rid in finished if finished[rid].outputs[0].finish_reason == "length"} == {
        "decoding-kept", "queued-kept"}
    assert_encoder_cache_clean(llm)
    engine.reset_encoder_cache()
    assert llm.collective_rpc("rapid_encoder_cache_entries") == [{"decode": [], "prefill": []}]


@pytest.mark.slow
def test_a_failed_prefill_batch_with_an_image_fails_only_its_requests(default_vlm, rapid_vlm):
    """A prefill batch with images raises: its requests fail, nothing of its encoder outputs stays counted, and
    the same image served afterwards matches the default scheduler."""
    from test_rapid_engine import run_until_idle, token_ids

    pic = images(1, seed=21)[0]
    engine = rapid_vlm.llm_engine
    fail = SamplingParams(temperature=0.0, max_tokens=8, extra_args={"fail_after_tokens": 0})
    engine.add_request("poison", image_prompt("Fail:", pic), fail)
    finished = run_until_idle(rapid_vlm)
    assert finished["poison"].outputs[0].finish_reason == "error"
    assert_encoder_cache_clean(rapid_vlm)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [image_prompt("Fail:", pic), image_prompt("Then:", pic, words=4)]
    expected = token_ids(default_vlm.generate(prompts, params, use_tqdm=False))
    assert token_ids(rapid_vlm.generate(prompts, params, use_tqdm=False)) == expected
    assert_encoder_cache_clean(rapid_vlm)


def test_what_rapid_still_refuses_of_multimodal_serving(tiny_vlm):
    """A decoder-only VLM starts; encoder-cache transfer and custom encoder cache managers are refused with why."""
    from vllm.config import ECTransferConfig

    from vllm_rapid.policy import check_rapid_config

    config = vlm_setup(tiny_vlm).vllm_config()
    check_rapid_config(config)
    config.ec_manager_config.encoder_cache_manager_cls = "my_plugin.Manager"
    with pytest.raises(ValueError, match=r"custom encoder cache managers: RAPID frees and forgets"):
        check_rapid_config(config)
    config.ec_manager_config.encoder_cache_manager_cls = None
    config.ec_transfer_config = ECTransferConfig(ec_connector="ECExampleConnector", ec_role="ec_consumer")
    with pytest.raises(ValueError, match=r"encoder-cache transfer connectors \(--ec-transfer-config\): a connector"):
        check_rapid_config(config)
