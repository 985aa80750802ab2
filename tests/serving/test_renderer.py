"""The chat-template renderers: new interpreters, never forks of the worker, that render exactly what the
tokenizer renders in-process; a render past the limit costs its own request and child, never the others'."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import CHATML, TOOL_TEMPLATE

from worker_transformers.serving.renderer import RendererUnavailable, RenderFailed, RenderTimeout, TemplateRenderers

ROOT = Path(__file__).resolve().parents[2]
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
LOOPS_ON_WORD = "{% if 'loop' in messages[-1]['content'] %}" + LOOP + "{% endif %}" + CHATML
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def pool():
    pools = []

    def make(tokenizer, template=None, limit_s=5.0, max_children=2):
        if template is not None:
            tokenizer.chat_template = template
        renderers = TemplateRenderers.start(limit_s, max_children)
        renderers.serve(tokenizer)
        pools.append(renderers)
        return renderers

    yield make
    for renderers in pools:
        renderers.close()


def renderer_children() -> list[int]:
    """This process's children that run the renderer, whichever pool started them."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == os.getpid() and b"worker_transformers.serving.renderer" in command and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("template", [CHATML, TOOL_TEMPLATE])
def test_a_render_is_the_tokenizer_s_own(tokenizer, pool, template):
    renderers = pool(tokenizer, template)
    chats = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "é ü 中文 \U0001f600"}],
    ]
    for messages in chats:
        for tools in (None, [TOOL]):
            expected = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            assert renderers.render(messages, tools) == expected


def test_the_children_are_new_interpreters_not_forks(tokenizer, pool):
    renderers = pool(tokenizer)
    renderers.render([{"role": "user", "content": "Hi"}])
    [child] = renderers.idle_pids()
    command = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
    assert command[:3] == [sys.executable.encode(), b"-m", b"worker_transformers.serving.renderer"], command
    assert child in renderer_children()


def test_a_threaded_process_renders_with_fork_warnings_as_errors(tiny_model_dir):
    """Python 3.12 warns (DeprecationWarning) when a process that runs threads forks; made an error here, a
    renderer forked from the worker fails. Torch's OpenMP team and a Python thread both run while it renders."""
    script = textwrap.dedent(
        f"""
        import threading, torch
        from transformers import AutoTokenizer
        from worker_transformers.serving.renderer import TemplateRenderers
        torch.ones(256, 256) @ torch.ones(256, 256)  # OpenMP's threads
        stop = threading.Event()
        threading.Thread(target=stop.wait).start()
        renderers = TemplateRenderers.start(5.0, 2)
        renderers.serve(AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}))
        print(repr(renderers.render([{{"role": "user", "content": "Hi"}}])))
        renderers.close()
        stop.set()
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == repr("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "DeprecationWarning" not in done.stderr


def test_a_slow_render_is_stopped_while_the_others_go_on(tokenizer, pool):
    renderers = pool(tokenizer, LOOPS_ON_WORD, limit_s=8.0)  # room for a second child to start on a loaded machine
    renderers.render([{"role": "user", "content": "warm"}])
    outcome = {}

    def looping():
        started = time.monotonic()
        try:
            renderers.render([{"role": "user", "content": "please loop"}])
        except RenderTimeout:
            outcome["timeout_after_s"] = time.monotonic() - started

    thread = threading.Thread(target=looping)
    thread.start()
    time.sleep(0.5)
    [busy] = set(renderers.pids()) - set(renderers.idle_pids())
    answers = [renderers.render([{"role": "user", "content": f"Hello {n}"}]) for n in range(3)]
    assert "timeout_after_s" not in outcome  # rendered while the loop still ran
    thread.join(30)
    assert answers == [f"<|im_start|>user\nHello {n}<|im_end|>\n<|im_start|>assistant\n" for n in range(3)]
    assert 8.0 <= outcome["timeout_after_s"] < 20, outcome
    assert not alive(busy)  # the looping child was killed
    assert renderers.render([{"role": "user", "content": "after"}]).endswith("after<|im_end|>\n<|im_start|>assistant\n")
    assert renderers.children <= 2


def test_a_template_s_own_error_keeps_its_child(tokenizer, pool):
    refuses = "{{ raise_exception('System messages are not supported') }}"
    renderers = pool(tokenizer, refuses)
    with pytest.raises(RenderFailed, match="TemplateError: System messages are not supported"):
        renderers.render([{"role": "system", "content": "x"}])
    [child] = renderers.idle_pids()
    with pytest.raises(RenderFailed):
        renderers.render([{"role": "system", "content": "x"}])
    assert renderers.idle_pids() == [child] and alive(child)


def test_a_child_that_dies_while_idle_costs_no_render(tokenizer, pool):
    renderers = pool(tokenizer)
    renderers.render([{"role": "user", "content": "Hi"}])
    [child] = renderers.idle_pids()
    os.kill(child, 9)  # as the kernel's out-of-memory killer would
    time.sleep(0.2)
    assert renderers.render([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
    assert renderers.pids() != [child] and renderers.children == 1


def test_a_child_that_dies_while_rendering_costs_that_render_and_is_replaced(tokenizer, pool):
    renderers = pool(tokenizer, LOOPS_ON_WORD)
    renderers.render([{"role": "user", "content": "Hi"}])
    [child] = renderers.idle_pids()
    threading.Timer(0.5, os.kill, args=(child, 9)).start()
    with pytest.raises(RendererUnavailable, match="died while rendering"):
        renderers.render([{"role": "user", "content": "please loop"}])
    assert renderers.render([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
    assert child not in renderers.pids()


def test_a_tokenizer_the_child_cannot_import_is_a_clear_failure(tokenizer, pool, tmp_path):
    module = tmp_path / "local_tokenizers.py"
    module.write_text(
        "from transformers import PreTrainedTokenizerFast\nclass LocalTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import local_tokenizers

        tokenizer.__class__ = local_tokenizers.LocalTokenizer
        renderers = TemplateRenderers(5.0, 1)
        renderers.serve(tokenizer)  # the child sees the worker's sys.path: it imports the class
        assert renderers.render([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
        renderers.close()
    finally:
        sys.path.remove(str(tmp_path))
    module.unlink()
    sys.path.insert(0, str(tmp_path))  # where the children look, the class now gone
    renderers = TemplateRenderers(5.0, 1)
    try:
        renderers.serve(tokenizer)
        with pytest.raises(RendererUnavailable, match="could not be unpickled.*ModuleNotFoundError.*local_tokenizers"):
            renderers.render([{"role": "user", "content": "Hi"}])
        # A failed start is not the pool's end: once the class is back, the next render's child starts.
        module.write_text(
            "from transformers import PreTrainedTokenizerFast\nclass LocalTokenizer(PreTrainedTokenizerFast):\n"
            "    pass\n"
        )
        assert renderers.render([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
    finally:
        sys.path.remove(str(tmp_path))
        renderers.close()
    sys.modules.pop("local_tokenizers", None)


def test_close_leaves_no_child(tokenizer, pool):
    renderers = pool(tokenizer, max_children=3)
    threads = [threading.Thread(target=renderers.render, args=([{"role": "user", "content": "Hi"}],)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    before = renderers.idle_pids()
    assert 1 <= len(before) <= 3
    renderers.close()
    assert not any(alive(pid) for pid in before)
    with pytest.raises(RendererUnavailable, match="shutting down"):
        renderers.render([{"role": "user", "content": "Hi"}])



def test_kill_all_ends_every_child_of_the_process_even_one_in_a_looping_render(tiny_model_dir, tmp_path):
    """What the worker runs before os._exit, which skips atexit: afterwards no renderer of it is left."""
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import threading, time
        from transformers import AutoTokenizer
        from worker_transformers.serving import renderer
        tokenizer = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})
        tokenizer.chat_template = {LOOPS_ON_WORD!r}
        pools = [renderer.TemplateRenderers(60.0, 1) for _ in range(2)]
        for pool in pools:
            pool.serve(tokenizer)
            pool.render([{{"role": "user", "content": "Hi"}}])
        threading.Thread(target=pools[0].render, args=([{{"role": "user", "content": "loop"}}],), daemon=True).start()
        time.sleep(0.5)
        open({str(pids)!r}, "w").write(" ".join(str(p) for pool in pools for p in pool.pids()))
        renderer.kill_all()
        import os
        os._exit(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    children = [int(pid) for pid in pids.read_text().split()]
    assert len(children) == 2
    time.sleep(0.5)
    assert not any(alive(pid) for pid in children)


def test_close_while_children_start_or_render_fails_nothing_but_those_renders(tokenizer):
    """`close` kills children that another thread is starting or rendering with: that thread alone closes their
    socket (two threads closing one descriptor would close whatever reused its number)."""
    tokenizer.chat_template = LOOPS_ON_WORD
    for _ in range(3):
        starting = TemplateRenderers.start(5.0, 2)
        starting.serve(tokenizer)
        starting.close()  # its child is still importing
    renderers = TemplateRenderers.start(30.0, 2)
    renderers.serve(tokenizer)
    renderers.render([{"role": "user", "content": "Hi"}])
    outcome = {}

    def looping():
        try:
            renderers.render([{"role": "user", "content": "please loop"}])
        except Exception as error:  # noqa: BLE001 (the test reads what it was)
            outcome["error"] = error

    thread = threading.Thread(target=looping)
    thread.start()
    time.sleep(0.5)
    [busy] = renderers.pids()
    renderers.close()
    thread.join(10)
    assert isinstance(outcome["error"], RendererUnavailable) and "shutting down" in str(outcome["error"])
    assert not alive(busy)
