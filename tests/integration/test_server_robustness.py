"""The server with our pack under repeated and interrupted work: /interrupt stops sampling within one step,
and ten runs in a row do not grow the server's resident memory by more than 5%."""

from __future__ import annotations

import time
import uuid

import pytest
from comfy_harness import ComfyError
from test_native_model import FOLDERS, text_to_video_prompt

from tests.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_v51(comfy_server):
    root = comfy_server.base_dir / "models" / "EasyAnimate"
    name = FOLDERS["V5.1"]
    if not (root / name).is_dir():
        write_tiny_checkpoint(root / name, "InP", version="V5.1")
    return name


def test_interrupt_stops_sampling_within_one_step(comfy_server, tiny_v51):
    steps = 400
    prompt = text_to_video_prompt(tiny_v51, "V5.1", frames=25, prefix="easyanimate_interrupt")
    prompt["5"]["inputs"].update(width=384, height=384)  # ~0.1 s per step on 2 CPU cores
    prompt["6"]["inputs"].update(steps=steps, seed=int(time.time()))  # a new seed: never served from the cache
    client_id = uuid.uuid4().hex
    events = comfy_server.events(client_id)
    try:
        prompt_id = comfy_server.queue_prompt(prompt, client_id=client_id)
        sampler_progress, step_at_interrupt, after, step_times = [], None, [], []
        while True:
            event = events.next_event()
            kind, data = event["type"], event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "progress" and data.get("node") == "6":
                step_times.append(time.monotonic())
                if step_at_interrupt is None:
                    sampler_progress.append(data["value"])
                    if data["value"] >= 3:
                        step_at_interrupt = data["value"]
                        status, _ = comfy_server.request("/interrupt", {})
                        assert status == 200
                else:
                    after.append(data["value"])
            elif kind == "execution_interrupted":
                break
            elif kind in ("execution_error", "execution_success"):
                pytest.fail(f"the prompt ended with {kind} instead of being interrupted: {data}")
    finally:
        events.close()
    step_seconds = (step_times[-1] - step_times[0]) / max(1, len(step_times) - 1)
    # The step running when /interrupt arrives completes and ComfyUI raises at its progress report, before
    # sending it. One more event is tolerated: one already on the wire while this test was posting /interrupt.
    assert step_at_interrupt is not None and len(after) <= 1, (step_at_interrupt, after, step_seconds)
    print(f"interrupted at step {step_at_interrupt} of {steps}; {step_seconds * 1000:.0f} ms per step")
    assert max(sampler_progress) < steps
    entry = comfy_server.wait_for_history(prompt_id, timeout=60)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    # The server stays usable: the same graph runs to the end right after.
    prompt["6"]["inputs"].update(steps=2, seed=int(time.time()) + 1)
    prompt["5"]["inputs"].update(width=64, height=32, frames=5)
    comfy_server.run_prompt(prompt, timeout=300)


def test_ten_runs_in_a_row_grow_server_memory_by_at_most_five_percent(comfy_server, tiny_v51):
    def run(seed: int) -> None:
        prompt = text_to_video_prompt(tiny_v51, "V5.1", frames=9, prefix="easyanimate_rss")
        prompt["6"]["inputs"]["seed"] = seed  # new sampling and decode each run; loaders stay cached as in real use
        comfy_server.run_prompt(prompt, timeout=300)

    run(1000)  # warm-up: models loaded, allocator pools and caches filled
    baseline = comfy_server.rss_bytes()
    for seed in range(1001, 1011):
        run(seed)
    final = comfy_server.rss_bytes()
    print(f"server RSS after warm-up {baseline / 2**20:.1f} MiB, after 10 more runs {final / 2**20:.1f} MiB")
    assert final <= baseline * 1.05, f"RSS grew from {baseline / 2**20:.1f} MiB to {final / 2**20:.1f} MiB"


def test_a_corrupt_checkpoint_fails_its_prompt_and_the_server_keeps_serving(comfy_server, tiny_v51):
    broken = comfy_server.base_dir / "models" / "EasyAnimate" / "broken-v51"
    (broken / "transformer").mkdir(parents=True, exist_ok=True)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    prompt = text_to_video_prompt(tiny_v51, "V5.1", frames=5, prefix="easyanimate_broken")
    prompt["1"]["inputs"]["model_folder"] = "broken-v51"  # only the transformer is corrupt
    prompt["6"]["inputs"]["seed"] = 4242
    with pytest.raises(ComfyError, match="diffusion_pytorch_model.safetensors"):
        comfy_server.run_prompt(prompt, timeout=120)
    assert comfy_server.process.poll() is None
    good = text_to_video_prompt(tiny_v51, "V5.1", frames=5, prefix="easyanimate_after_broken")
    good["6"]["inputs"]["seed"] = 4243
    assert len(comfy_server.output_files(comfy_server.run_prompt(good, timeout=300))) == 5
