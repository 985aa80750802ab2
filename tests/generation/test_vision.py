"""Vision-language models answer image requests exactly as transformers' own processor and `generate` do, batched.

Tiny random checkpoints of every family tests/tiny_vlms.py can build here (Qwen 2.5-VL, Qwen 3-VL and Qwen 3.5
with their multimodal RoPE, Qwen 3.5 with linear attention too, Gemma 3 whose image tokens see each other both
ways, Idefics 3 with split images, LLaVA, Gemma 4; with torchvision, Mistral 3 and Llama 4), started by the real
startup: the batch engine serves each (Llama 4: serial, see SERIAL), and an image request answers as
transformers' processor ->
generate answers the same chat; two image requests in one prefill (whose token ids are alike, the images not) and
an image request beside a text one each answer as alone; streamed text equals the whole; the serial engine answers
images the same way.
"""

import asyncio
import base64
import io
import queue

import pytest
from PIL import Image
from tiny_vlms import FAMILIES, image_message, load, make_tiny_vlm, reference, sample_images

from worker_transformers.config import Settings
from worker_transformers.generation.events import Done, Failed
from worker_transformers.serving.handlers import make_handler
from worker_transformers.serving.schema import parse_request
from worker_transformers.worker import setup

QUESTION = "What is in the picture?"
QUESTIONS = (QUESTION, "Describe it.", "Color?")
NEW_TOKENS = 8


def data_url(image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_chat(image, text: str = QUESTION) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_new_tokens": NEW_TOKENS}


def text_chat(text: str = QUESTION) -> dict:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    """(family, frontend, settings, transformers' own (processor, model)) for one family, started by the real
    startup."""
    folder = make_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param))
    settings = Settings.from_env({"MODEL_NAME": str(folder), "MAX_CONCURRENCY": "4", "MAX_NEW_TOKENS": "64"})
    frontend = setup(settings)
    yield request.param, frontend, settings, folder, load(folder)
    frontend.close()


def answers(frontend, bodies: list[dict]) -> list[list[int]]:
    """The generated ids of each request (end of sequence included), all submitted in one turn of the engine: one
    prefill, where the engine batches."""
    events: queue.Queue = queue.Queue()
    ready = [(request, frontend.prepare(request)) for request in (parse_request(body, 64) for body in bodies)]
    with frontend.generation.engine.one_turn():
        sequences = [frontend.submit(request, prepared, events.put) for request, prepared in ready]
    for _ in sequences:
        event = events.get(timeout=60)
        while not isinstance(event, Done | Failed):
            event = events.get(timeout=60)
        assert isinstance(event, Done), event.error
    return [s.generated for s in sequences]


def own(loaded, folder, image=None, text: str = QUESTION) -> list[int]:
    messages = image_message(image, text) if image is not None else [{"role": "user", "content": text}]
    return reference(folder, messages, NEW_TOKENS, loaded=loaded)


# Families whose image tokens see each other both ways in the prefill: the startup check must find it (the causal
# masks tried first differ from the model's own logits), and must not for the others.
BOTH_WAYS = {"gemma3"}


# Served one request at a time: Llama 4's layers without rotary embeddings scale their queries by a temperature
# read from the cache's length, the batch's column rather than each row's position, and the startup check's long
# prompt (past its 8192-token attention chunk) crosses the temperature's first step, 8192 (README, Concurrency).
SERIAL = {"llama4"}


def test_the_engine_serves_it_checked_with_an_image(served):
    family, frontend, *_ = served
    assert frontend.generation.vision is not None
    assert frontend.generation.engine_kind == ("serial" if family in SERIAL else "batch")
    if family not in SERIAL:
        assert frontend.generation.engine.layout.image_blocks == (family in BOTH_WAYS)


def test_an_image_request_answers_as_the_processor_and_generate(served):
    _, frontend, _, folder, loaded = served
    images = sample_images()
    got = [answers(frontend, [image_chat(image)])[0] for image in images]
    assert got == [own(loaded, folder, image) for image in images]


def test_two_image_requests_in_one_prefill_each_answer_as_alone(served):
    """Their prompts' ids may be alike (image tokens are, whatever the image): they must not share a prefill."""
    _, frontend, _, folder, loaded = served
    first, second = sample_images()[:2]
    # a question whose answers tell these images apart (random weights: not every question's do)
    text = next(q for q in QUESTIONS if own(loaded, folder, first, q) != own(loaded, folder, second, q))
    together = answers(frontend, [image_chat(first, text), image_chat(second, text)])
    assert together == [own(loaded, folder, first, text), own(loaded, folder, second, text)]


def test_an_image_request_beside_a_text_request_each_answer_as_alone(served):
    _, frontend, _, folder, loaded = served
    image = sample_images()[0]
    together = answers(frontend, [text_chat(), image_chat(image), text_chat("Hello there")])
    assert together == [own(loaded, folder), own(loaded, folder, image), own(loaded, folder, text="Hello there")]


def test_a_streamed_image_answer_equals_the_whole_one(served):
    _, frontend, settings, *_ = served
    handler = make_handler(frontend, settings)
    body = image_chat(sample_images()[2])

    async def run(job_input):
        return [item async for item in handler({"id": "t", "input": job_input})]

    [whole] = asyncio.run(run(body))
    streamed = asyncio.run(run({**body, "stream": True}))
    assert "error" not in whole, whole
    assert "".join(chunk["text"] for chunk in streamed) == whole["text"]
    assert streamed[-1]["usage"] == whole["usage"]
    assert whole["usage"]["prompt_tokens"] > 12  # the image's tokens count: the text alone is fewer


def test_the_serial_engine_answers_images_as_generate(tmp_path):
    folder = make_tiny_vlm("qwen2_5_vl", tmp_path / "qwen")
    frontend = setup(Settings.from_env({"MODEL_NAME": str(folder), "ENGINE": "serial"}))
    try:
        assert frontend.generation.engine_kind == "serial"
        image = sample_images()[1]
        loaded = load(folder)
        assert answers(frontend, [image_chat(image)]) == [own(loaded, folder, image)]
    finally:
        frontend.close()


def test_the_openai_client_sends_images_over_http_as_a_data_url_and_a_link(tmp_path):
    """The real `openai` client against the local server (real HTTP, the real handler); the linked image is served
    by a real HTTP server on loopback, which ALLOW_PRIVATE_IMAGE_URLS lets the worker fetch."""
    import http.server
    import socket
    import threading
    import time

    import openai
    import uvicorn

    from worker_transformers.serving.openai.server import make_app

    folder = make_tiny_vlm("gemma3", tmp_path / "gemma3")
    settings = Settings.from_env({"MODEL_NAME": str(folder), "ALLOW_PRIVATE_IMAGE_URLS": "true"})
    frontend = setup(settings)
    image = sample_images()[1]
    png = io.BytesIO()
    image.save(png, format="PNG")

    class Picture(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png.getvalue())))
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    pictures = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Picture)
    threading.Thread(target=pictures.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(make_app(make_handler(frontend, settings)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0)
        tokenizer = frontend.tokenizer
        expected = tokenizer.decode(own(load(folder), folder, image), skip_special_tokens=True)
        for url in (data_url(image), f"http://127.0.0.1:{pictures.server_port}/picture.png"):
            content = [{"type": "text", "text": QUESTION}]
            content.insert(0, {"type": "image_url", "image_url": {"url": url, "detail": "low"}})
            completion = client.chat.completions.create(
                model=str(folder),
                messages=[{"role": "user", "content": content}],
                temperature=0,
                max_tokens=NEW_TOKENS,
            )
            assert completion.choices[0].message.content.strip() == expected.strip()
            assert completion.usage.prompt_tokens > 16  # Gemma 3's image is 16 tokens of the prompt
        with pytest.raises(openai.BadRequestError, match=r"messages\.0\.content\.0"):
            client.chat.completions.create(
                model=str(folder),
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,hello"}}]}],
                max_tokens=NEW_TOKENS,
            )
    finally:
        server.should_exit = True
        thread.join()
        pictures.shutdown()
        frontend.close()


def handler_jobs(frontend, settings, inputs: list[dict]) -> list[list[dict]]:
    """Each job's outputs, the jobs run together through the real handler."""
    handler = make_handler(frontend, settings)

    async def one(job_input):
        return [item async for item in handler({"id": "t", "input": job_input})]

    async def together():
        return await asyncio.gather(*(one(job_input) for job_input in inputs))

    return asyncio.run(together())


def test_bad_images_are_refused_by_name_and_the_rest_of_the_batch_is_answered(tmp_path):
    """The refusals are the request's, whatever the family: checked on one."""
    folder = make_tiny_vlm("gemma3", tmp_path / "gemma3")
    settings = Settings.from_env({"MODEL_NAME": str(folder)})
    frontend = setup(settings)
    try:
        refusals_leave_the_batch_alone(frontend, settings, folder, load(folder))
    finally:
        frontend.close()


def refusals_leave_the_batch_alone(frontend, settings, folder, loaded) -> None:
    image = sample_images()[0]
    good = image_chat(image)
    many = image_chat(image)
    many["messages"][0]["content"] = [good["messages"][0]["content"][0]] * 9 + [{"type": "text", "text": "Hi"}]
    video = image_chat(image)
    video["messages"][0]["content"].append({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}})
    not_an_image = image_chat(image)
    not_an_image["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(
        b"this is text, not a picture"
    ).decode()
    truncated = image_chat(image)
    whole = base64.b64decode(data_url(image).split(",", 1)[1])
    truncated["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(
        whole[: len(whole) // 2]
    ).decode()
    outputs = handler_jobs(frontend, settings, [many, good, video, not_an_image, truncated])
    errors = [output[0].get("error", "") for output in outputs]
    assert "MAX_IMAGES_PER_REQUEST" in errors[0] and errors[0].startswith("messages")
    assert errors[2].startswith("messages.0.content.2"), errors[2]
    assert errors[3].startswith("messages.0.content.0"), errors[3]
    assert errors[4].startswith("messages.0.content.0"), errors[4]
    assert "error" not in outputs[1][0]
    assert frontend.tokenizer.decode(own(loaded, folder, image), skip_special_tokens=True) == outputs[1][0]["text"]


def test_a_text_only_model_refuses_an_image_naming_the_part(tiny_model_dir):
    settings = Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "MAX_NEW_TOKENS": "16"})
    frontend = setup(settings)
    try:
        asked = {**image_chat(sample_images()[0]), "max_new_tokens": 4}
        [[refused], [answered]] = handler_jobs(frontend, settings, [asked, {**text_chat(), "max_new_tokens": 4}])
        assert refused == {"error": f"messages.0.content.0: {tiny_model_dir} takes no images; send text only"}
        assert answered["usage"]["completion_tokens"] >= 1
    finally:
        frontend.close()


def test_a_request_with_two_images_answers_as_the_processor_and_generate(served):
    _, frontend, _, folder, loaded = served
    first, second = sample_images()[:2]
    body = image_chat(first)
    body["messages"][0]["content"].insert(1, {"type": "image_url", "image_url": {"url": data_url(second, "JPEG")}})
    second_as_sent = Image.open(io.BytesIO(base64.b64decode(data_url(second, "JPEG").split(",", 1)[1]))).convert("RGB")
    messages = image_message(first)
    messages[0]["content"].insert(1, {"type": "image", "image": second_as_sent})
    assert answers(frontend, [body]) == [reference(folder, messages, NEW_TOKENS, loaded=loaded)]


def test_n_choices_of_an_image_request_share_its_prefill_and_each_answer_as_alone(served):
    """One request's choices share its processed images, so its prefill is computed once and copied."""
    _, frontend, _, folder, loaded = served
    image = sample_images()[2]
    request = parse_request(image_chat(image), 64)
    prepared = frontend.prepare(request)
    events: queue.Queue = queue.Queue()
    with frontend.generation.engine.one_turn():
        choices = [frontend.submit(request, prepared, events.put) for _ in range(3)]
    finished = 0
    while finished < len(choices):
        event = events.get(timeout=60)
        assert not isinstance(event, Failed), event.error
        finished += isinstance(event, Done)
    assert [c.generated for c in choices] == [own(loaded, folder, image)] * 3
