"""What a `mitigation=` argument may say: method names, their options and defaults, default layers,
and which methods may be combined.

A spec is a name (`"vhr"`), a list of names (`["vhr", "pai"]`), a dict of name -> options
(`{"pai": {"alpha": 0.2}, "vcd": {"alpha": 1.0}}`) or a command-line string (`"vhr,pai:alpha=0.2"`).
`resolve_mitigation` turns any of them into a dict of name -> complete options, with the default layers
filled in for the model's depth.
"""

from . import icd, lqcd, pai, paint, token_exit, var, vcd, vhr  # noqa: F401  (each registers its method)
from .registry import METHODS

# Each method's file holds its defaults (after `shared/reference/hallucination.md`); `layers=None` means "the
# method's default layers for this depth" (see `default_layers`). `vlm list mitigations` and the docs use this order.
ORDER = ("vhr", "pai", "paint", "var", "vcd", "icd", "lqcd", "exit")
METHOD_DEFAULTS = {name: METHODS[name].defaults for name in ORDER}
METHOD_DESCRIPTIONS = {name: METHODS[name].description for name in ORDER}


def parse_mitigation_arg(text: str) -> dict:
    """Parse a command-line value such as `"vhr,pai:alpha=0.2"` or `"paint:alpha=0.7:beta=0.4,vcd"`.

    Methods are separated by commas, options follow the method name after colons as `key=value`;
    values are read as int, float, bool (`true`/`false`), `none`, a `+`-separated list of ints
    (`layers=2+3+4`) or else kept as strings. Returns `{method: {option: value}}`.
    """
    spec = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, *options = item.split(":")
        name = name.strip().lower()
        if name not in METHOD_DEFAULTS:
            raise ValueError(f"--mitigation {text!r}: unknown method {name!r}; known: {', '.join(METHOD_DEFAULTS)}")
        parsed = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                raise ValueError(f"--mitigation {text!r}: option {option!r} of {name} must be key=value")
            parsed[key.strip()] = _parse_value(value.strip())
        spec[name] = parsed
    return spec


def _parse_value(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if "+" in value:
        return [int(v) for v in value.split("+")]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def default_layers(method: str, num_layers: int) -> list[int]:
    """The layers a method edits by default, scaled from the LLaVA-1.5 (32-layer) choices to any depth."""
    layers = METHODS[method].layers
    if layers is None:
        raise ValueError(f"{method} has no layers")
    return layers(num_layers)


def normalize_spec(spec) -> dict:
    """Any accepted spec form -> `{method: {given options}}` (validated names, no defaults yet)."""
    if isinstance(spec, str):
        return parse_mitigation_arg(spec)
    if isinstance(spec, dict):
        items = spec.items()
    elif isinstance(spec, (list, tuple, set)):
        items = ((name, {}) for name in spec)
    else:
        raise TypeError(f"mitigation must be a str, list or dict, got {type(spec).__name__}")
    normalized = {}
    for name, options in items:
        key = str(name).lower()
        if key not in METHOD_DEFAULTS:
            raise ValueError(f"unknown mitigation method {name!r}; known: {', '.join(METHOD_DEFAULTS)}")
        if options is None or options is True:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(f"mitigation[{name!r}] must be a dict of options, got {type(options).__name__}")
        normalized[key] = dict(options)
    return normalized


def check_options(spec, num_beams: int = 1) -> dict:
    """`{method: complete options}` with `layers` as given (None: the default for the model's depth): all that
    can be checked before a model is loaded. Raises ValueError for unknown methods or options, two methods
    needing the contrast branch (VCD, ICD, LQCD, PAI/PAINT with `cfg`), PAI with PAINT (PAINT is PAI with split
    margins: both would add to the same logits) and contrastive decoding with beam search."""
    resolved = {}
    for name, options in normalize_spec(spec).items():
        if "processor" in options:
            raise ValueError(f"mitigation {name!r}: the processor is an argument of generate, not an option: "
                             f"model.generate(**inputs, mitigation={name!r}, processor=processor)")
        unknown = set(options) - set(METHOD_DEFAULTS[name])
        if unknown:
            raise ValueError(f"mitigation {name!r}: unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(METHOD_DEFAULTS[name])}")
        resolved[name] = {**METHOD_DEFAULTS[name], **options}
    branch = contrast_branch_users(resolved)
    if len(branch) > 1:
        raise ValueError(f"{' and '.join(branch)} each need the contrast branch: use one of them at a time")
    if branch and num_beams > 1:
        raise ValueError(f"{branch[0]} (contrastive decoding) does not support beam search "
                         f"(num_beams={num_beams}): use greedy or sampling")
    if "pai" in resolved and "paint" in resolved:
        raise ValueError("pai and paint both raise the same image-token logits (PAINT is PAI with split margins): "
                         "use one of them")
    return resolved


def resolve_mitigation(spec, num_layers: int, num_beams: int = 1) -> dict:
    """Validated `{method: complete options}` for a model with `num_layers` decoder layers: `check_options`,
    the default layers filled in, and refused layers: out of range, or VAR with PAI/PAINT on shared layers
    (VAR would select heads on attention PAI already moved)."""
    resolved = check_options(spec, num_beams)
    for name, options in resolved.items():
        if "layers" in options:
            options["layers"] = _check_layers(name, options["layers"], num_layers)
    if "exit" in resolved:
        _check_exit(resolved, num_layers)
    if "var" in resolved:
        for name in ("pai", "paint"):
            shared = sorted(set(resolved["var"]["layers"]) & set(resolved.get(name, {}).get("layers", [])))
            if shared:
                raise ValueError(f"var and {name} both edit the attention of layers {shared}: VAR would pick heads on "
                                 f"attention {name} already moved; give them disjoint `layers`")
    return resolved


def _check_exit(resolved: dict, num_layers: int):
    """The exit layer (default: half the depth) in [1, num_layers], and no method reading image attention at or
    above it: there are no image keys left to read (the contrastive methods need none). Layer 0 keeps every
    token, as generation counts the sequence in layer 0's cache (and an image no layer sees would be pointless)."""
    layer = resolved["exit"]["layer"]
    layer = max(1, num_layers // 2) if layer is None else layer
    if layer != "auto" and (not isinstance(layer, int) or not 1 <= layer <= num_layers):
        raise ValueError(f"mitigation 'exit': layer={layer!r} must be 'auto' or an int in [1, {num_layers}] for a "
                         f"{num_layers}-layer LLM ({num_layers}: no exit)")
    resolved["exit"]["layer"] = layer
    lowest = 1 if layer == "auto" else layer  # the routers may exit from layer 1 on
    for name, options in resolved.items():
        above = [index for index in options.get("layers", []) if index >= lowest]  # the exit has no `layers`
        if above:
            raise ValueError(f"{name} works on image attention in layers {above}, at or above the visual-token exit "
                             f"at layer {layer}, where no image tokens are left: give {name} layers below {lowest} "
                             "or exit later")


def _check_layers(name, layers, num_layers):
    if layers is None:
        return default_layers(name, num_layers)
    if isinstance(layers, int):  # `layers=3` on the command line: one layer
        layers = [layers]
    layers = sorted({int(layer) for layer in layers})
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"mitigation {name!r}: layers {bad} out of range for a {num_layers}-layer LLM")
    return layers


def contrast_branch_users(resolved: dict) -> list[str]:
    """The methods of a resolved spec that need the second (contrast) branch."""
    return [name for name, options in resolved.items() if METHODS[name].uses_contrast_branch(options)]
