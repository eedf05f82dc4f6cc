"""The command line's parser and value types: a bad flag is one `error:` line and exit status 2.

Every type wraps a check of diffptq.config.checks (the same check a config field goes through), so a flag and the
field it fills agree on what is valid. Light: no torch.
"""
from __future__ import annotations

import argparse
import re

from diffptq.config.checks import (
    check_bits,
    check_float,
    check_guidance,
    check_non_negative_int,
    check_positive_int,
    check_seed,
)
from diffptq.config.quant import Damping
from diffptq.config.sequential import AUTO
from diffptq.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: `error: <what is wrong>` on one line, exit status 2 (`--help` still
    prints the whole usage)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


def _typed(check, name: str):
    """An argparse type from a check: its ConfigError message becomes argparse's message for the flag."""
    def convert(text: str):
        try:
            return check(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = name
    return convert


positive_int = _typed(lambda t: check_positive_int(t), "positive_int")
non_negative_int = _typed(lambda t: check_non_negative_int(t), "non_negative_int")
seed_value = _typed(lambda t: check_seed(t, ""), "seed")
bits_value = _typed(lambda t: check_bits(t), "bits")
guidance_value = _typed(lambda t: check_guidance(t, ""), "guidance")
positive_float = _typed(lambda t: check_float(t, lo=0.0, lo_open=True), "positive_float")
damp_value = _typed(lambda t: Damping.parse(t, ""), "damp")
smooth_value = _typed(lambda t: check_float(t, lo=0.0, hi=1.0, lo_open=True), "smooth")


def _auto_or(check):
    """A check that also takes the word "auto" (the recipe of the bits decides: SequentialConfig.with_bits)."""
    return lambda t: AUTO if t.strip() == AUTO else check(t)


def _layer_patterns(text: str) -> tuple[str, ...]:
    """Comma-separated layer-name patterns: globs (fnmatch) or "re:REGEX" (re.search); each regex must compile."""
    import re

    patterns = tuple(p.strip() for p in text.split(","))
    if not text.strip() or any(not p or p == "re:" for p in patterns):
        raise ConfigError(f"expected comma-separated layer-name patterns (glob or re:REGEX), got {text!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise ConfigError(f"{p!r} is not a valid regular expression ({err})") from None
    return patterns


skip_value = _typed(_layer_patterns, "skip")
correction_value = _typed(_auto_or(lambda t: check_float(t, lo=0.0, hi=1.0)), "correction")
lowrank_value = _typed(_auto_or(check_non_negative_int), "lowrank")


def prompt_file(text: str) -> str:
    """A prompt file that exists and reads as UTF-8 text with at least one prompt (diffptq.data.prompts)."""
    from diffptq.data.prompts import load_prompts
    from diffptq.errors import PromptFileError

    try:
        load_prompts(text)
    except PromptFileError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def device_value(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (whether that device exists is checked when the run starts)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text.strip()):
        return text.strip()
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


BLOCKS_PATTERN = re.compile(r"all|\d+|\d+-\d+(,\d+(-\d+)?)*|\d+(,\d+(-\d+)?)+")


def blocks_value(text: str) -> str:
    """--blocks: 'all', 'N' (the first N), a range '0-7' or a comma list '0-3,8' (indices checked on the model)."""
    text = text.strip()
    if BLOCKS_PATTERN.fullmatch(text) and text != "0":
        return text
    raise argparse.ArgumentTypeError(f"expected all, N (the first N blocks, N >= 1), a range like 0-7, or a comma "
                                     f"list like 0-3,8; got {text!r}")


def parse_methods(text: str, methods: tuple[str, ...] = ("fp", "rtn", "gptq", "qronos")) -> list[str]:
    """'fp,rtn,gptq,qronos' -> the listed methods in that order (each once)."""
    items = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not items or any(m not in methods for m in items):
        raise ConfigError(f"expected a comma list of {', '.join(methods)}, got {text!r}")
    return items


def parse_bits(text: str) -> list[tuple[int, int]]:
    """'w4a8,w4a4' -> [(4, 8), (4, 4)]; 'w4' or 'w4a16' = float activations (abits 16)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        w, sep, a = part.removeprefix("w").partition("a")
        if not part.startswith("w") or not w.isdigit() or (sep and not a.isdigit()):
            raise ConfigError(f"expected a comma list like w4a8,w4a4 (w4 = float activations), got {text!r}")
        wbits, abits = int(w), int(a) if sep else 16
        if not 2 <= wbits <= 8 or not (2 <= abits <= 8 or abits == 16):
            raise ConfigError(f"{part}: weight bits 2..8, activation bits 2..8 or 16")
        out.append((wbits, abits))
    if not out:
        raise ConfigError("give at least one setting, e.g. w4a8")
    return list(dict.fromkeys(out))


def peers_value(text: str) -> str:
    """--peers: a comma list of peer configurations (diffptq.peers; 'none' or '' for none), checked by name only:
    whether their packages are installed is a warning at start-up, not an error."""
    from diffptq.peers import parse_peers

    try:
        parse_peers(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# --methods / --bits / --peers stay text (config.json records them as given); the run parses them again
methods_value = _typed(lambda t: parse_methods(t) and t, "methods")
bits_list_value = _typed(lambda t: parse_bits(t) and t, "bits")
