"""What a `mitigation=` argument may say: method names, their options and defaults, default layers,
and which methods may be combined.

A spec is a name (`"vhr"`), a list of names (`["vhr", "pai"]`), a dict of name -> options
(`{"pai": {"alpha": 0.2}, "vcd": {"alpha": 1.0}}`) or a command-line string (`"vhr,pai:alpha=0.2"`).
`resolve_mitigation` turns any of them into a dict of name -> complete options, with the default layers
filled in for the model's depth.
"""

# Defaults follow `shared/reference/hallucination.md`; `layers=None` means "the method's default layers
# for this depth" (see `default_layers`).
METHOD_DEFAULTS = {
    # VHR: scale the top-half heads (by vision-aware head divergence) of the chosen layers by alpha.
    "vhr": {"alpha": 2.0, "layers": None},
    # PAI: a[img] += alpha * |a[img]| on the last query row, pre-softmax; cfg=gamma adds the text-only
    # guidance branch (1.1 in the PAI README), off by default because it costs a second forward.
    "pai": {"alpha": 0.2, "layers": None, "cfg": None, "cfg_beta": 0.1},
    # PAINT: separate margins for local (alpha) and summary (beta) image tokens; head_specific scales
    # the margins per head by the calibrated visual sensitivity.
    "paint": {"alpha": 0.7, "beta": 0.3, "local_ratio": 0.25, "layers": None, "head_specific": False,
              "cfg": None, "cfg_beta": 0.1},
    # VAR: keep p of the sink attention of image-centric rows and give the rest to non-sink image tokens.
    "var": {"tau": 20.0, "rho": 0.5, "p": 0.6, "summ": 0.2, "sink_dims": None, "layers": None},
    # Contrastive decoding: (1 + alpha) l - alpha l' with the plausibility cut beta.
    "vcd": {"alpha": 1.0, "beta": 0.1, "noise_step": 500, "seed": 0},
    "icd": {"alpha": 1.0, "beta": 0.1, "disturbance": "You are a confused object detector.", "processor": None},
    # LQCD: the contrast is `leading` (a processor output), or the prompt with `suffix` added to its last
    # user turn when a `processor` is given instead.
    "lqcd": {"alpha": 1.0, "beta": 0.1, "leading": None, "processor": None, "suffix": " I am sure it is there, right?"},
}

METHOD_DESCRIPTIONS = {
    "vhr": "reinforces vision-aware attention heads (measured against an image-free pass)",
    "pai": "raises attention to image tokens in chosen layers",
    "paint": "as PAI, separately for informative and summary visual tokens",
    "var": "moves attention from visual sink tokens to the other image tokens",
    "vcd": "contrastive decoding against a noised image",
    "icd": "contrastive decoding against a disturbed instruction",
    "lqcd": "contrastive decoding against a leading query",
}

ATTENTION_METHODS = ("pai", "paint", "var")
CONTRASTIVE_METHODS = ("vcd", "icd", "lqcd")


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
    """The layers a method edits by default, scaled from the LLaVA-1.5 (32-layer) choices to any depth.

    - VHR: layer 1 and the last 14/32 of the layers ("the second and last 14 layers").
    - PAI/PAINT: from 2/32 of the depth to the end (layers 2..31 of 32).
    - VAR: from 2/32 of the depth to the last layer, excluded (the last layer is skipped).
    """
    start = round(2 * num_layers / 32)
    if method == "vhr":
        tail = range(num_layers - max(1, round(14 * num_layers / 32)), num_layers)
        return sorted({min(1, num_layers - 1), *tail})
    if method in ("pai", "paint"):
        return list(range(start, num_layers))
    if method == "var":
        return list(range(start, max(start + 1, num_layers - 1)))
    raise ValueError(f"{method} has no layers")


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


PROMPT_METHODS = ("icd", "lqcd")  # they rewrite the prompt, so they need the processor


def with_processor(spec, processor) -> dict:
    """`spec` as a dict, with `processor` handed to the prompt-rewriting methods that were not given one
    (what `vlm eval --mitigation icd` and the demo need: a command line cannot pass a processor)."""
    spec = normalize_spec(spec)
    return {name: ({"processor": processor, **options} if name in PROMPT_METHODS and options.get("leading") is None
                   else options) for name, options in spec.items()}


def check_options(spec, num_beams: int = 1) -> dict:
    """`{method: complete options}` with `layers` as given (None: the default for the model's depth): all that
    can be checked before a model is loaded. Raises ValueError for unknown methods or options, two methods
    needing the contrast branch (VCD, ICD, LQCD, PAI/PAINT with `cfg`), PAI with PAINT (PAINT is PAI with split
    margins: both would add to the same logits) and contrastive decoding with beam search."""
    resolved = {}
    for name, options in normalize_spec(spec).items():
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
    if "var" in resolved:
        for name in ("pai", "paint"):
            shared = sorted(set(resolved["var"]["layers"]) & set(resolved.get(name, {}).get("layers", [])))
            if shared:
                raise ValueError(f"var and {name} both edit the attention of layers {shared}: VAR would pick heads on "
                                 f"attention {name} already moved; give them disjoint `layers`")
    return resolved


def _check_layers(name, layers, num_layers):
    if layers is None:
        return default_layers(name, num_layers)
    layers = sorted({int(layer) for layer in layers})
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"mitigation {name!r}: layers {bad} out of range for a {num_layers}-layer LLM")
    return layers


def contrast_branch_users(resolved: dict) -> list[str]:
    """The methods of a resolved spec that need the second (contrast) branch."""
    users = [name for name in CONTRASTIVE_METHODS if name in resolved]
    users += [name for name in ("pai", "paint") if name in resolved and resolved[name]["cfg"] is not None]
    return users
