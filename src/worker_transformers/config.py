"""Settings: the one place that reads the environment.

Every setting is declared once, as a field of `Settings`, with its environment variable, default,
parser and description in the field's metadata. `Settings.from_env(os.environ)` builds a frozen object;
a bad value stops startup with one line naming the variable, the value and what is allowed.
The README's environment table is generated from these fields (`python -m worker_transformers.config`)
and a test keeps the two identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

MODEL_SOURCES = ("auto", "baked", "cached", "volume", "hub")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
SDK_LOG_LEVELS = ("error", "warn", "info", "debug")
ENGINES = ("auto", "batch", "continuous", "serial")
COMPILE_MODES = ("background", "before_ready", "off")

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ConfigError(ValueError):
    """A setting has a value the worker cannot use. The message is one line."""


class Secret(str):
    """A string that never shows itself in a repr, a log line or an error message."""

    def __repr__(self) -> str:
        return "Secret('***')"


Parser = Callable[[str, str], Any]  # (variable name, raw text) -> value


def _optional_text(name: str, raw: str) -> str | None:
    return raw.strip() or None


def _model_name(name: str, raw: str) -> str:
    value = raw.strip()
    if value.startswith("/") or _HUB_ID.match(value):
        return value
    raise ConfigError(f"{name}={raw!r} is not allowed; use a Hugging Face model id (org/name) or an absolute folder")


def _choice(*allowed: str) -> Parser:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{name}={raw!r} is not allowed; use one of {', '.join(allowed)}")
        return value

    return parse


def _absolute_path(name: str, raw: str) -> Path:
    if not raw.startswith("/"):
        raise ConfigError(f"{name}={raw!r} is not allowed; use an absolute folder path")
    return Path(raw)


def _folder_or_auto(name: str, raw: str) -> Path | None:
    """None for `auto`; else an absolute folder path."""
    return None if raw.strip().lower() == "auto" else _absolute_path(name, raw.strip())


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not allowed; use true or false")


def _int_between(low: int, high: int) -> Parser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not allowed; use a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={raw!r} is not allowed; use a whole number from {low} to {high}")
        return value

    return parse


def _chat_template(name: str, raw: str) -> str | None:
    """Inline Jinja text as it is; anything else is the path of a file holding it."""
    value = raw.strip()
    if not value or "{" in value:
        return value or None
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"{name}={raw!r}: cannot read the file ({reason}); give a readable template file or the Jinja text itself"
        ) from None


def names_a_file(response_template: str) -> bool:
    """Whether a RESPONSE_TEMPLATE value is the path of a file: it has a path separator or a .json ending."""
    return "/" in response_template or response_template.endswith(".json")


def _response_template(name: str, raw: str) -> str:
    """`auto`, `none` or a format's name as it is (serving/tools/formats.py checks the name at startup); a file
    (`names_a_file`) must be readable."""
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} is empty; use auto, none, a format's name or the path of a JSON file")
    if names_a_file(value):
        try:
            Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ConfigError(f"{name}={raw!r}: cannot read the file ({reason}); give a readable JSON file") from None
    return value


def _secret(name: str, raw: str) -> Secret | None:
    return Secret(raw.strip()) if raw.strip() else None


def setting(env: str, default: str | None, parse: Parser, help: str) -> Any:
    """A dataclass field that knows its environment variable. `default` is the raw text, parsed like
    any other value so that a default can never be a value the parser would refuse."""
    value = None if default is None else parse(env, default)
    return field(
        default=value,
        metadata={"env": env, "raw_default": default, "parse": parse, "help": help},
    )


@dataclass(frozen=True)
class Settings:
    model_name: str = setting(
        "MODEL_NAME", DEFAULT_MODEL, _model_name, "Hugging Face model id, or an absolute folder holding the model"
    )
    model_revision: str | None = setting(
        "MODEL_REVISION", None, _optional_text, "Branch, tag or commit of the model; unset means `main`"
    )
    model_source: str = setting(
        "MODEL_SOURCE",
        "auto",
        _choice(*MODEL_SOURCES),
        "Where to look for the weights: `auto` (baked, cached, volume, local cache, then Hub) or one source only",
    )
    baked_model_dir: Path = setting(
        "BAKED_MODEL_DIR", "/models", _absolute_path, "Folder of a model baked into the image (with `manifest.json`)"
    )
    runpod_cache_dir: Path = setting(
        "RUNPOD_CACHE_DIR",
        "/runpod-volume/huggingface-cache/hub",
        _absolute_path,
        "Hugging Face cache where RunPod mounts cached models",
    )
    volume_model_dir: Path = setting(
        "VOLUME_MODEL_DIR",
        "/runpod-volume/models",
        _absolute_path,
        "Network-volume folder holding models as `ORG/NAME` subfolders",
    )
    dtype: str = setting(
        "DTYPE", "auto", _choice(*DTYPES), "Weights' dtype on the device; `auto` keeps the checkpoint's dtype"
    )
    device: str = setting("DEVICE", "auto", _choice(*DEVICES), "`auto` uses CUDA when present, else the CPU")
    max_new_tokens: int = setting(
        "MAX_NEW_TOKENS", "1024", _int_between(1, 1_000_000), "Largest `max_new_tokens` a job may ask for"
    )
    max_input_tokens: int = setting(
        "MAX_INPUT_TOKENS", "4096", _int_between(1, 10_000_000), "Longest prompt, in tokens after the chat template"
    )
    max_concurrency: int = setting(
        "MAX_CONCURRENCY",
        "8",
        _int_between(1, 1024),
        "Jobs one worker runs at once, batched together on the device (at most: a model the batcher cannot "
        "batch runs one at a time)",
    )
    engine: str = setting(
        "ENGINE",
        "auto",
        _choice(*ENGINES),
        "`batch`: continuous batching over the worker's own cache (keys and values, recurrent states); "
        "`continuous`: transformers' own continuous batching (a paged KV cache, attention layers only); `serial`: "
        "one job at a time through `generate` (RWKV, RecurrentGemma, flash attention); `auto` batches (`batch`) "
        "wherever the model allows it and passes its check",
    )
    compile: str = setting(
        "COMPILE",
        "background",
        _choice(*COMPILE_MODES),
        "The batch engine's decode step compiled (torch.compile): `background` serves on the eager step from "
        "ready on and switches to the compiled one once it is built; `before_ready` builds it during startup; "
        "`off` never compiles",
    )
    compile_cache_dir: Path | None = setting(
        "COMPILE_CACHE_DIR",
        "auto",
        _folder_or_auto,
        "Folder where the compiled decode step is saved for the next worker: `auto` is the network volume's "
        "`worker-transformers/compile` for a volume model, else `~/.cache/worker-transformers/compile`",
    )
    served_model_name: str | None = setting(
        "SERVED_MODEL_NAME",
        None,
        _optional_text,
        "The model's name in answers, `/v1/models` and the `model` OpenAI requests must send; unset means the "
        "repository id (`MODEL_NAME`)",
    )
    chat_template: str | None = setting(
        "CHAT_TEMPLATE",
        None,
        _chat_template,
        "A chat template used instead of the model's own: a file path, or the Jinja text itself",
    )
    response_template: str = setting(
        "RESPONSE_TEMPLATE",
        "auto",
        _response_template,
        "How answers are read for tool calls and reasoning: `auto` (the tokenizer's own `response_template`, else "
        "transformers' for the model's family, else one of the formats below found from the chat template's "
        "markup), a format's name, `none`, or the path of a JSON file holding a response_template",
    )
    generation_config_defaults: bool = setting(
        "GENERATION_CONFIG_DEFAULTS",
        "true",
        _flag,
        "Take `temperature`, `top_p`, `top_k` and `repetition_penalty` a request leaves out from the model's "
        "`generation_config.json`; `false` uses the request formats' own defaults",
    )
    trust_remote_code: bool = setting(
        "TRUST_REMOTE_CODE", "false", _flag, "Run Python code shipped with the model; only for models you trust"
    )
    init_timeout_s: int = setting(
        "RUNPOD_INIT_TIMEOUT",
        "420",
        _int_between(1, 86_400),
        "Seconds the platform allows for startup; the worker warns at 50 % and 80 % of it and stops a download "
        "that cannot finish in time",
    )
    shutdown_grace_s: int = setting(
        "SHUTDOWN_GRACE_S",
        "5",
        _int_between(0, 3600),
        "Seconds that jobs running at SIGTERM get to finish before they are failed and the worker exits; keep it "
        "well inside the platform's wait for SIGKILL",
    )
    fast_load: bool = setting(
        "FAST_LOAD",
        "true",
        _flag,
        "Load the weights straight into an empty model when the checkpoint allows it; `false` always uses "
        "`from_pretrained`",
    )
    allow_pickle_weights: bool = setting(
        "ALLOW_PICKLE_WEIGHTS",
        "false",
        _flag,
        "Load `.bin`/`.pt` weights when a model has no safetensors; unpickling can run code: only for models you trust",
    )
    verify_weights: bool = setting(
        "VERIFY_WEIGHTS",
        "false",
        _flag,
        "Check every file's sha256 against `manifest.json` at startup (baked and volume models); reads every byte",
    )
    runpod_log_level: str = setting(
        "RUNPOD_LOG_LEVEL",
        "info",
        _choice(*SDK_LOG_LEVELS),
        "The runpod SDK's log level; at `debug` it logs every job's output, so prompts' answers reach the logs",
    )
    max_images_per_request: int = setting(
        "MAX_IMAGES_PER_REQUEST",
        "8",
        _int_between(0, 256),
        "Images one chat request may carry (vision-language models); 0 refuses images",
    )
    # Bounded by Pillow's own decompression-bomb threshold, which refuses larger images while reading the header.
    max_image_pixels: int = setting(
        "MAX_IMAGE_PIXELS",
        "16777216",
        _int_between(1, 89_478_485),
        "Largest image a request may send, in pixels (width times height), checked before it is decoded",
    )
    max_image_bytes: int = setting(
        "MAX_IMAGE_BYTES",
        "20971520",
        _int_between(1, 1_073_741_824),
        "Largest image file a request may send or link to, in bytes; a download stops past it",
    )
    image_fetch_timeout_s: int = setting(
        "IMAGE_FETCH_TIMEOUT_S",
        "10",
        _int_between(1, 600),
        "Seconds that downloading one image from an http(s) URL may take, redirects included",
    )
    allow_private_image_urls: bool = setting(
        "ALLOW_PRIVATE_IMAGE_URLS",
        "false",
        _flag,
        "Fetch image URLs that lead to loopback, private, link-local or other non-public addresses; only where "
        "callers may reach the worker's own network",
    )
    hf_token: Secret | None = setting("HF_TOKEN", None, _secret, "Hugging Face token, for private or gated models")
    hf_endpoint: str | None = setting(
        "HF_ENDPOINT", None, _optional_text, "Address of the Hugging Face Hub, for a mirror; unset means huggingface.co"
    )
    hf_hub_offline: bool = setting(
        "HF_HUB_OFFLINE", "false", _flag, "Never contact the Hub; only local sources are used"
    )
    # Where huggingface_hub keeps its cache; derived in from_env exactly as huggingface_hub does.
    hf_hub_cache: Path = field(default_factory=lambda: hf_hub_cache_dir({}))
    # The user's cache folder (XDG_CACHE_HOME, else ~/.cache), derived in from_env: COMPILE_CACHE_DIR's `auto`.
    cache_home: Path = field(default_factory=lambda: cache_home_dir({}))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata.get("env")
            if name is not None and name in env:
                values[f.name] = f.metadata["parse"](name, env[name])
        values["hf_hub_cache"] = hf_hub_cache_dir(env)
        values["cache_home"] = cache_home_dir(env)
        return cls(**values)

    @property
    def model_is_folder(self) -> bool:
        return self.model_name.startswith("/")

    @property
    def hub_allowed(self) -> bool:
        return self.model_source in ("auto", "hub") and not self.hf_hub_offline and not self.model_is_folder


def is_deployed(env: Mapping[str, str]) -> bool:
    """RunPod sets RUNPOD_WEBHOOK_GET_JOB on a deployed worker; without it the SDK runs one local test job."""
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB"))


def hf_hub_cache_dir(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, resolved the way huggingface_hub resolves it."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return cache_home_dir(env) / "huggingface" / "hub"


def cache_home_dir(env: Mapping[str, str]) -> Path:
    """The user's cache folder: XDG_CACHE_HOME, else ~/.cache."""
    cache_home = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path(env.get("HOME", "~")) / ".cache"
    return cache_home.expanduser()


def compile_cache_folder(settings: Settings, model_source: str) -> Path:
    """Where the compiled decode step is kept (COMPILE_CACHE_DIR): on the network volume beside a volume model,
    where every worker of the endpoint finds it; else in the user's cache folder, which an image can carry."""
    if settings.compile_cache_dir is not None:
        return settings.compile_cache_dir
    if model_source == "volume":
        return Path(settings.volume_model_dir).parent / "worker-transformers" / "compile"
    return settings.cache_home / "worker-transformers" / "compile"


def settings_table() -> str:
    """The README's environment table, in Markdown."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for f in fields(Settings):
        if "env" not in f.metadata:
            continue
        default = f.metadata["raw_default"]
        shown = f"`{default}`" if default is not None else "unset"
        rows.append(f"| `{f.metadata['env']}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
