"""Hook: ``EngineArgs`` accepts a CoS file/dict as ``speculative_config``.

vLLM internals touched (vllm/engine/arg_utils.py):
- ``EngineArgs.add_cli_args``: after the stock parser is built, the ``--speculative-config``
  action's ``type`` (stock: ``json.loads``) also accepts a CoS YAML path.
- ``EngineArgs.create_engine_config``: before the stock method runs, a CoS spec in
  ``self.speculative_config`` is replaced by the stock arguments that realise it
  (:func:`vllm_cos.engine.prepare_engine`), and the CoS config is put into
  ``self.additional_config["cos"]`` which reaches every process inside ``VllmConfig``;
  ``self.worker_extension_cls`` names :class:`vllm_cos.adapters.worker_ext.CoSWorkerExtension`
  (a user's own extension must subclass it, see :func:`merge_worker_extension`).
"""

from __future__ import annotations

import argparse
import importlib
import logging

from vllm_cos import engine

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

_installed = False
COS_HELP = (" vllm-cos: or a CoS collaborative-decoding YAML file (models, rule, schedule, ...; "
            "see the vllm-cos README, Configuration); validate one with `vllm-cos check cos.yaml`.")


def _cli_type(value: str):
    try:
        return engine.parse_cli_value(value)
    except ValueError as exc:  # ConfigError is a ValueError
        raise argparse.ArgumentTypeError(str(exc)) from None


def merge_worker_extension(existing: str | None, ours: str) -> str:
    """The ``worker_extension_cls`` a CoS engine runs with: ours, or the user's own extension
    if it subclasses ours (vLLM takes one class); any other is refused, never overwritten."""
    if not existing or existing == ours:
        return ours
    from vllm_cos.adapters.worker_ext import CoSWorkerExtension

    module_name, _, class_name = existing.rpartition(".")
    try:
        user_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise engine.CoSStartupError(f"cos: worker_extension_cls {existing!r} cannot be imported: {exc}") from None
    if isinstance(user_cls, type) and issubclass(user_cls, CoSWorkerExtension):
        return existing
    raise engine.CoSStartupError(
        f"cos: worker_extension_cls {existing!r} replaces the one CoS needs ({ours}, which serves "
        f"cos_stats); make your class subclass {ours} and pass it")


def check_executor(backend) -> None:
    """vLLM's CPU platform has no ray executor (its engine core dies with a traceback): one line."""
    if backend != "ray":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        raise engine.CoSStartupError("cos: --distributed-executor-backend ray: vLLM's CPU platform does not "
                                     "support ray; use the default multiprocessing executor (mp)")


def apply_cos(args) -> bool:
    """Rewrite an ``EngineArgs`` in place if its speculative config is a CoS spec."""
    spec = args.speculative_config
    if spec is None or not engine.is_cos_spec(spec):
        return False
    check_executor(args.distributed_executor_backend)
    parallel = {"pipeline": args.pipeline_parallel_size, "tensor": args.tensor_parallel_size,
                "data": args.data_parallel_size}
    cfg, overrides = engine.prepare_engine(spec, args.model, async_scheduling=args.async_scheduling,
                                           dtype=args.dtype, parallel=parallel)
    args.worker_extension_cls = merge_worker_extension(args.worker_extension_cls,
                                                       overrides.pop("worker_extension_cls"))
    hf_overrides = overrides.pop("hf_overrides", None)
    if hf_overrides is not None:
        existing = args.hf_overrides
        if callable(existing):
            raise engine.CoSStartupError("cos: schedule 'standard' cannot be combined with a callable hf_overrides")
        args.hf_overrides = {**(existing or {}), **hf_overrides}
    additional = dict(args.additional_config or {})
    additional.update(overrides.pop("additional_config"))
    args.additional_config = additional
    for key, value in overrides.items():
        setattr(args, key, value)
    logger.info("cos: %s schedule, rule %s, models %s (served: %s)", cfg.schedule, cfg.rule.name,
                ", ".join(f"{m.name}(gamma {m.gamma})" for m in cfg.models), cfg.target)
    return True


def install() -> None:
    global _installed
    if _installed:
        return
    import os

    from vllm.engine.arg_utils import EngineArgs

    stock_add_cli_args = EngineArgs.add_cli_args
    stock_create_engine_config = EngineArgs.create_engine_config

    def add_cli_args(parser, *args, **kwargs):
        parser = stock_add_cli_args(parser, *args, **kwargs)
        action = parser._option_string_actions.get("--speculative-config")
        if action is not None:
            action.type = _cli_type
            action.help = (action.help or "") + COS_HELP
        return parser

    def create_engine_config(self, *args, **kwargs):
        if apply_cos(self):
            # V1 runner: the one the CoS hooks are written for (see engine.SUPPORTED_RUNNER).
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            logger.info("cos: runs on the %s (VLLM_USE_V2_MODEL_RUNNER=0): its hooks are written for it; "
                        "vLLM's Model Runner V2 (a GPU default in 0.32/0.33) is not supported", engine.SUPPORTED_RUNNER)
        return stock_create_engine_config(self, *args, **kwargs)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    _installed = True
