"""The streaming hand-off in-process (node.chains.handoff on a real engine and the embedded model): the next step's
prompt grows in the KV cache while the current step still generates, and the chain's text is the same with the
hand-off as without it."""

import textwrap
from collections import deque
from collections.abc import Iterator

import pytest
import trio

from marketplace.chain import parse_chain
from node.adapters.cache import AdapterRef
from node.adapters.check import base_dims_of_file
from node.chains.handoff import ChainSteps
from node.chains.resolve import RunnableChain, RunnableStep
from node.chains.run import ChainStep, run_chain
from node.inference.engine import EngineEvent, GenerationRequest, InferenceEngine, Job, Warmup
from node.inference.llama_backend import SamplingParams
from node.inference.models import BaseModel, embedded_model_path
from node.inference.steps import StepDone, Text
from tests.conftest import extra_buffers_for_tests
from tests.engine_harness import settings
from tests.lora_files import strong_adapters

CHAIN = textwrap.dedent(
    """
    name: handoff
    version: 1.0.0
    steps:
      - personality: one
        prompt: "Write about {input}."
      - personality: two
        prompt: "Rewrite this: {previous} Keep it short."
      - personality: one
        prompt: "Summarise: {previous}"
    """
)


@pytest.fixture(scope="module")
def model() -> Iterator[BaseModel]:
    served = BaseModel("m", embedded_model_path(), extra_buffers=extra_buffers_for_tests())
    yield served
    served.close()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> RunnableChain:
    folder = tmp_path_factory.mktemp("adapters")
    files = strong_adapters(folder, base_dims_of_file(embedded_model_path()), ["one", "two"])
    refs = {name: (AdapterRef(f"{name}@v1", path),) for name, path in files.items()}
    parsed = parse_chain(CHAIN, "handoff.yaml")
    steps = [RunnableStep(s, str(s.personality), refs[str(s.personality)]) for s in parsed.steps]
    return RunnableChain(parsed, tuple(steps))


def run(
    model: BaseModel, chain: RunnableChain, handoff: bool, record: deque[EngineEvent] | None = None
) -> tuple[str, list[ChainStep]]:
    """The chain's final text and its reported steps, greedy, 48 tokens a step, on a fresh two-slot engine (the
    hand-off in chunks of 32 characters)."""

    async def main() -> tuple[str, list[ChainStep]]:
        engine = InferenceEngine(model.llama, settings(2))
        engine.record = record

        async def start(tokens: list[int], adapters: tuple[AdapterRef, ...], warm: Warmup | None) -> Job:
            request = GenerationRequest(tokens, SamplingParams(temperature=0), 48, ignore_eos=True, adapters=adapters)
            return await (warm.start(request) if warm is not None else engine.submit(request, 60))

        steps = ChainSteps(model, engine, start, trio.CapacityLimiter(1), handoff, chunk_chars=32)
        text, reported = "", []
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            async for ev in run_chain(chain, "the sea", steps):
                if isinstance(ev, Text):
                    text += ev.text
                elif isinstance(ev, ChainStep):
                    reported.append(ev)
                elif isinstance(ev, StepDone) and ev.final:
                    assert ev.job.error is None
            nursery.cancel_scope.cancel()
        return text, reported

    return trio.run(main)


def test_the_next_steps_context_grows_while_the_current_step_generates(model: BaseModel, chain: RunnableChain) -> None:
    # Arrange
    record: deque[EngineEvent] = deque()
    # Act
    run(model, chain, handoff=True, record=record)
    # Assert: events of step 1 (the first job started) and of the first warm-up (step 2's sequence)
    events = list(record)
    step1 = next(i for kind, i, _ in events if kind == "start")
    warm = next(i for kind, i, _ in events if kind == "warm")
    tokens_of_step1 = [n for n, (kind, i, _) in enumerate(events) if kind == "token" and i == step1]
    first, last = tokens_of_step1[0], tokens_of_step1[-1]
    sizes = [size for kind, i, size in events[first:last] if kind == "warm" and i == warm]
    head = sizes[0]  # step 2's template and prompt up to {previous}
    assert head > 10 and len(sizes) >= 3 and sizes == sorted(set(sizes))  # then ever longer, chunk by chunk
    assert sizes[-1] > head + 10  # grown by step 1's text while step 1 was still generating
    # Assert: step 2 then started on that sequence, everything it held reused
    starts = [reused for kind, _, reused in events if kind == "start"]
    assert starts[1] >= sizes[-1]


def test_the_hand_off_changes_timing_never_text(model: BaseModel, chain: RunnableChain) -> None:
    # Arrange / Act
    sequential_text, sequential_steps = run(model, chain, handoff=False)
    handoff_text, handoff_steps = run(model, chain, handoff=True)
    # Assert: the same steps and final text; the later steps found their prompts evaluated
    assert [s.text for s in handoff_steps] == [s.text for s in sequential_steps]
    assert handoff_text == sequential_text and len(handoff_text) > 40
    assert handoff_steps[1].reused_tokens > sequential_steps[1].reused_tokens + 40
    assert handoff_steps[1].prompt_tokens == sequential_steps[1].prompt_tokens


def test_without_a_free_slot_the_chain_runs_one_step_after_the_other(model: BaseModel) -> None:
    # Arrange: one slot, held by the running step
    async def main() -> int | None:
        engine = InferenceEngine(model.llama, settings(1))
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            request = GenerationRequest([1, 2, 3], SamplingParams(temperature=0), 4)
            job = await engine.submit(request, 5)
            # Act
            warm = engine.warm((), [1, 2])
            await job.done.wait()
            nursery.cancel_scope.cancel()
        return None if warm is None else warm.id

    # Assert
    assert trio.run(main) is None
