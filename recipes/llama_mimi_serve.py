"""Listen to it: ``tune run llama_mimi_serve --config serve`` (then open http://127.0.0.1:8000/).

A page and an HTTP API that stream speech continuations as they are generated: upload or
record a prompt, hear each sample while it is generated. Requests that arrive together are
generated in one batch behind a bounded queue (see llama_mimi_tt/serve.py).

    curl --data-binary @prompt.wav 'http://127.0.0.1:8000/v1/continue?seconds=4&seed=0' -o out.wav
"""

import os
import sys

from omegaconf import DictConfig
from torchtune import config, training, utils

from llama_mimi_tt.loading import load_model, random_weights
from llama_mimi_tt.quantize import parse_quantize, quantize_model
from llama_mimi_tt.recipe_config import run_recipe
from llama_mimi_tt.serve import ContinuationBatcher, ServeLimits, serve

log = utils.get_logger("INFO")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    limits = ServeLimits(**{k: cfg[k] for k in ServeLimits.__dataclass_fields__ if k in cfg})
    device = utils.get_device(cfg.get("device", "cpu"))
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device)
    quant = parse_quantize(cfg.get("quantize"), cfg.get("quantize_group_size", 128))
    tokenizer = config.instantiate(cfg.tokenizer)
    codec = config.instantiate(cfg.codec)
    if str(cfg.codec.get("path")) == "random":
        log.warning("!!! codec.path=random: an UNTRAINED Mimi decodes the codes. !!!")
    model = quantize_model(load_model(cfg, device, dtype), quant, device)
    log.info(f"precision: {quant.describe(device)}")
    name = cfg.get("model_dir") or cfg.model._component_
    batcher = ContinuationBatcher(model, codec, tokenizer, limits, name, random_weights(cfg))
    api_key = os.environ.get(cfg.api_key_env) if cfg.get("api_key_env") else None
    if api_key:
        log.info(f"API key required (from ${cfg.api_key_env})")
    serve(batcher, str(cfg.host), int(cfg.port), api_key)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_serve"))
