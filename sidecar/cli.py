"""`localmlx`: serve (the sidecar), demo (the main job end to end), repl, models, finetune, profiles, demo-model."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .finetune_cli import add_arguments as add_finetune_arguments
from .logs import configure_logging
from .models_cli import add_arguments as add_models_arguments
from .profiles_cli import add_arguments as add_profiles_arguments
from .repl import add_arguments as add_repl_arguments
from .settings import add_setting_flags, settings_from_args
from .transport import claim_stdout


def serve(args: argparse.Namespace) -> None:
    wire_fd = claim_stdout()  # first: nothing imported below may print onto the wire
    parent = os.getppid()  # as early as can be: the watchdog's reference
    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    from .blas import use_best_blas  # here: only serve loads a BLAS (ctypes)

    use_best_blas(settings.blas)  # before anything imports MLX: its CPU kernels bind to it on import
    # The client owns our lifetime (stdin EOF, shutdown/exit, SIGTERM, its own exit): a
    # Ctrl-C meant for an interactive parent must not kill us. Run by hand at a terminal,
    # Ctrl-C stops the sidecar gracefully instead (see Session).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # MLX loads (a few hundred ms of shared libraries and kernels) while this thread imports the
    # session: `initialize` waits for both, so they overlap instead of adding up.
    threading.Thread(target=importlib.import_module, args=("mlx.core",), name="mlx-import", daemon=True).start()
    # Only now: the other commands (and --help) never need anyio, jsonschema or the engine.
    import anyio

    from .session import Session

    session = Session(settings, wire_fd, parent_pid=parent)
    code = anyio.run(session.run, backend="asyncio")  # SIGTERM: a graceful stop, see Session.terminate
    logging.shutdown()
    sys.stderr.flush()
    # Skip interpreter teardown: a daemon thread may still be inside MLX.
    os._exit(code)


def follower(args: argparse.Namespace) -> None:
    claim_stdout()  # a follower's stdout is nobody's wire, but nothing may print there either
    from .distributed.lifeline import run_under_a_guard

    run_under_a_guard()  # before any thread starts: it forks
    from .distributed.follower import run_follower

    run_follower()


def demo_model(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    from .demo_model import DEMO_MODEL_DIRNAME, build_demo_model  # here: --help needs none of it

    dest = Path(args.out) if args.out else settings.models_dir / DEMO_MODEL_DIRNAME
    print(build_demo_model(dest))


# The commands below import their clients on use: `serve`, spawned for every session, never runs
# them, and its time to the first answer is what a user waits for.
def demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    raise SystemExit(run_demo(args))


def repl(args: argparse.Namespace) -> None:
    from .repl import run as run_repl

    raise SystemExit(run_repl(args))


def models(args: argparse.Namespace) -> None:
    from .models_cli import run as run_models

    raise SystemExit(run_models(args))


def finetune(args: argparse.Namespace) -> None:
    from .finetune_cli import run as run_finetune

    raise SystemExit(run_finetune(args))


def profiles(args: argparse.Namespace) -> None:
    from .profiles_cli import run as run_profiles

    raise SystemExit(run_profiles(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localmlx", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    serve_cmd = commands.add_parser(
        "serve", help="run the sidecar: NDJSON JSON-RPC 2.0 on stdin/stdout",
        description="Run the sidecar. Settings come from LOCALMLX_* environment variables; "
                    "each flag below overrides its variable.")
    add_setting_flags(serve_cmd)
    serve_cmd.set_defaults(func=serve)

    demo_cmd = commands.add_parser("demo", help="spawn the sidecar and stream a chat reply")
    add_setting_flags(demo_cmd)
    demo_cmd.add_argument("--model", default=None, help="model to chat with (default: demo)")
    demo_cmd.add_argument("--prompt", default="Tell me about the sea and the mountains.")
    demo_cmd.add_argument("--max-new-tokens", type=int, default=96)
    demo_cmd.add_argument("--temp", type=float, default=0.0)
    demo_cmd.set_defaults(func=demo)

    repl_cmd = commands.add_parser("repl", help="try the sidecar by hand: shorthand or raw JSON-RPC")
    add_repl_arguments(repl_cmd)
    repl_cmd.set_defaults(func=repl)

    models_cmd = commands.add_parser("models", help="list, pull, rm, fuse or check local models and adapters",
                                     description="The local model cache, through a sidecar.")
    add_models_arguments(models_cmd)
    models_cmd.set_defaults(func=models)

    finetune_cmd = commands.add_parser(
        "finetune", help="train a LoRA/DoRA adapter on local data (with a progress bar)",
        description="Train an adapter for a model on a dataset, through a sidecar; serve it as <model>+<name>.")
    add_finetune_arguments(finetune_cmd)
    finetune_cmd.set_defaults(func=finetune)

    profiles_cmd = commands.add_parser(
        "profiles", help="create, list, show, edit or rm model profiles (a model, template, defaults, tasks)",
        description="Model profiles (profiles/<name>.toml), through a sidecar; a profile's name works as a model's.")
    add_profiles_arguments(profiles_cmd)
    profiles_cmd.set_defaults(func=profiles)

    follower_cmd = commands.add_parser("follower", help="one rank of a group (started by rank 0 itself)")
    follower_cmd.set_defaults(func=follower)

    model_cmd = commands.add_parser("demo-model", help="build the embedded demo model")
    add_setting_flags(model_cmd)
    model_cmd.add_argument("--out", default=None, help="directory to build into")
    model_cmd.set_defaults(func=demo_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `python -m sidecar` alone serves, as Wooster spawns it
        args = parser.parse_args(["serve", *(argv or sys.argv[1:])])
    try:
        args.func(args)
    except KeyboardInterrupt:  # Ctrl-C at a terminal: no traceback
        raise SystemExit(130) from None
    except BrokenPipeError:  # `localmlx models list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
