"""Download a model from the Hugging Face Hub into the local cache: the last resort of `sources.resolve`.

Only what a causal LM needs is fetched: safetensors weights, configs and tokenizer files. Pickle weights are
never downloaded. The token comes from Settings and never appears in a message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Settings
from .model_files import MODEL_FILE_PATTERNS
from .sources import ModelNotFound, check_model_folder

log = logging.getLogger(__name__)


def download_from_hub(settings: Settings) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    model = f"{settings.model_name}@{settings.model_revision or 'main'}"
    log.info("downloading %s from the Hub into %s", model, settings.hf_hub_cache)
    try:
        path = Path(
            snapshot_download(
                settings.model_name,
                revision=settings.model_revision,
                cache_dir=settings.hf_hub_cache,
                allow_patterns=list(MODEL_FILE_PATTERNS),
                token=settings.hf_token or False,
            )
        )
    except GatedRepoError:
        raise ModelNotFound(f"{model} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"{model} does not exist on the Hub or is private: check MODEL_NAME, or set HF_TOKEN for a private model"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{model}: no such revision on the Hub; check MODEL_REVISION") from None
    except (HfHubHTTPError, OSError) as error:
        # The error's text can carry request headers on some versions: name its type only.
        raise ModelNotFound(
            f"{model} could not be downloaded from the Hub ({type(error).__name__}); check the network, "
            "or bake the model into the image, or select it as the endpoint's cached model"
        ) from None
    check_model_folder(path, settings.model_name)
    return path
