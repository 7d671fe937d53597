"""The `vlm` command line. Sub-commands are plugged in by the suite's packages through the entry-point
group `vlm.commands` (see pyproject.toml): each entry is a `register(subparsers)` function, so `vlm` itself
depends on none of them; `vlm list` kinds beyond vlm's own come from the group `vlm.lists` the same way.

A user's error (a bad option, config field, file or input) ends the command with one line on stderr and exit
code 2; `--debug` shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""

import argparse
import difflib
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

# What bad input raises in the suite: ValueError (ConfigError, DataFormatError, PromptTooLongError and plain
# validation), OSError (missing or unreadable files, ImageLoadError) and ImportError (an optional extra absent).
USER_ERRORS = (ValueError, OSError, ImportError)


BACKBONES = {  # family -> (timm names, operator)
    "vit": ("vit_{tiny,small,base}_patch16_224", "ViT from timm: softmax attention"),
    "davit": ("davit_{tiny,small,base}", "DaViT from timm: spatial + channel attention"),
    "lookupvit": ("lookupvit_{tiny,small,base}_patch16_224", "compressed tokens, bidirectional cross-attention"),
    "biformer": ("biformer_{tiny,small,base}", "bi-level routing attention"),
    "vim": ("vim_{tiny,small,base}_patch16_224", "Vision Mamba: bidirectional selective scan"),
    "vig": ("vig_{tiny,small,base}_patch16_224", "bidirectional gated linear attention"),
}


def list_command(args) -> int:
    """Print the entries of one kind, one per line: name, description (and options)."""
    plugged = {entry.name: entry for entry in entry_points(group="vlm.lists")}
    if args.kind in plugged:
        rows = plugged[args.kind].load()()
    elif args.kind == "backbones":
        rows = [(name, f"{description}; timm names {names}") for name, (names, description) in BACKBONES.items()]
    elif args.kind == "modes":
        from .masks import ATTENTION_MODE_DESCRIPTIONS

        rows = list(ATTENTION_MODE_DESCRIPTIONS.items())
    else:
        from .mitigation.spec import METHOD_DEFAULTS, METHOD_DESCRIPTIONS

        rows = [(name, f"{description}; options: " + ", ".join(
            f"{key}={value}" for key, value in METHOD_DEFAULTS[name].items()))
            for name, description in METHOD_DESCRIPTIONS.items()]
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0


def did_you_mean(name: str, known) -> str:
    """"did you mean 'max_steps'? " when `name` is close to one of `known`, else ""."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: an integer of at least 1."""
    value = int(text)  # a ValueError here is argparse's "invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it already or there is none to say (flags,
    required options, options left unset by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of `vlm` and, through `add_subparsers`, of every sub-command the packages plug in."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _add_debug_option(parser: argparse.ArgumentParser, top: bool = True):
    # on every (sub-)parser, so that `vlm ask ... --debug` works as `vlm --debug ask ...` does; below the top
    # the default is SUPPRESS so that a sub-parser does not reset what the top one parsed
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on an error, show the full traceback instead of one line")
    parser.set_defaults(command_name=parser.prog)  # the deepest sub-command's wins: "vlm data scenes"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_option(child, top=False)


def convert_command(args) -> int:
    """`vlm convert --to vlm|llava SOURCE OUT`."""
    from .llava_convert import export_llava, import_llava

    if args.to == "vlm":
        out = import_llava(args.source, args.out, args.vision_tower, args.attention_mode)
    else:
        if args.vision_tower or args.attention_mode != "causal":
            raise ValueError("--vision-tower and --attention-mode are options of --to vlm")
        out = export_llava(args.source, args.out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = Parser(prog="vlm", description="Build, train, run and evaluate vision-language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('vlm-suite')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    kinds = ["backbones", "modes", "mitigations", *sorted(entry.name for entry in entry_points(group="vlm.lists"))]
    listing = subparsers.add_parser("list", help=f"list the {', '.join(kinds)}",
                                    description="List the entries of one kind, each with a description and options.")
    listing.add_argument("kind", choices=kinds, help="what to list")
    listing.set_defaults(func=list_command)
    convert = subparsers.add_parser(
        "convert", help="LLaVA-1.5 (llava-hf or original layout) into a VisionLanguageModel folder, or back",
        description="Convert LLaVA-1.5 checkpoints into VisionLanguageModel folders (--to vlm) and causal "
                    "VisionLanguageModels with a CLIP tower into llava-hf folders (--to llava).")
    convert.add_argument("--to", required=True, choices=["vlm", "llava"], help="the layout to write")
    convert.add_argument("source", type=Path, help="the folder to convert")
    convert.add_argument("out", type=Path, help="the folder to write")
    convert.add_argument("--vision-tower", type=Path, default=None,
                         help="CLIPVisionModel folder, for the original LLaVA layout (which holds no tower config)")
    convert.add_argument("--attention-mode", default="causal", help="mask mode of the imported model (vlm list modes)")
    convert.set_defaults(func=convert_command)
    for entry in sorted(entry_points(group="vlm.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    _add_debug_option(parser)
    return parser


def main(argv=None) -> int:
    from transformers.utils import logging as transformers_logging

    # transformers draws a bar for every weight load: noise on each command, and a mess in logs off a terminal
    transformers_logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if not args.debug:  # its load reports and warnings; what they warn of that matters is refused as an error
        transformers_logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"{args.command_name}: error: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if args.debug:
            raise
        print(f"{args.command_name}: interrupted", file=sys.stderr)
        return 128 + getattr(interrupt, "signum", signal.SIGINT)  # the shell's code for death by that signal


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:  # not "[Errno 2] No such file...: 'x'"
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
