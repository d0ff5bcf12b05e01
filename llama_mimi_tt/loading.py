"""Building a Llama-Mimi model from a recipe config, for inference (generate, eval, serve)."""

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

log = utils.get_logger("INFO")


def random_weights(cfg: DictConfig) -> bool:
    """True when the config names no checkpoint: ``checkpointer: null``, or a checkpointer whose
    ``checkpoint_dir`` is null (the tiny configs' ``model_dir: null``)."""
    ckpt_cfg = cfg.get("checkpointer", None)
    return ckpt_cfg is None or ckpt_cfg.get("checkpoint_dir", None) is None


def load_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``cfg.model`` with the weights of ``cfg.checkpointer``, in eval mode; random
    weights seeded with ``cfg.seed`` when there is no checkpoint (tests and the demo)."""
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    if not random_weights(cfg):
        ckpt_cfg = cfg.checkpointer
        checkpointer = config.instantiate(ckpt_cfg)
        checkpointer.check_model(model)  # another architecture: one line naming the field
        model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
        log.info(f"loaded weights from {ckpt_cfg.get('checkpoint_dir')}")
    else:
        log.warning(
            f"!!! no checkpoint (model_dir / checkpointer is null): the model has RANDOM weights "
            f"(seed {seed}). The outputs are NOT speech: this run only exercises the pipeline. !!!"
        )
    return model.eval()
