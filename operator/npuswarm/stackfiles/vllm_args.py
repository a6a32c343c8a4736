"""`vllm serve` command lines in a stack file: finding them (also inside `sh -c`) and mapping
their arguments to ModelDeployment fields."""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from npuswarm.stackfiles.compose import Notes, StackFileError

_SHELLS = frozenset({"sh", "bash", "ash", "dash"})
_SHELL_OPERATORS = frozenset({"&&", "||", ";", "|", "&", ";;", "(", ")", "<", ">", ">>"})


def vllm_serve_args(argv: Sequence[str]) -> tuple[list[str], str | None] | None:
    """The arguments after ``vllm serve``, and how it was wrapped; None when it is not vLLM.

    A ``sh -c 'vllm serve ...'`` wrapper is unwrapped; a shell script that also does other
    things cannot be taken apart safely and is an error.
    """
    if len(argv) >= 2 and posixpath.basename(argv[0]) == "vllm" and argv[1] == "serve":
        return list(argv[2:]), None
    if len(argv) == 3 and posixpath.basename(argv[0]) in _SHELLS and argv[1] in ("-c", "-lc"):
        script = argv[2]
        if not re.search(r"\bvllm\s+serve\b", script):
            return None
        lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as error:
            raise StackFileError(f"cannot split the shell script {script!r}: {error}") from None
        if tokens[:1] == ["exec"]:
            tokens = tokens[1:]
        operators = sorted({t for t in tokens if t in _SHELL_OPERATORS})
        if operators or tokens[:2] != ["vllm", "serve"]:
            raise StackFileError(
                f"runs `vllm serve` inside a shell script ({' '.join(operators) or 'prefix'}"
                f" in {script!r}); npuswarm runs vllm directly: move the other steps into "
                "the image and write the manifest by hand"
            )
        return tokens[2:], f"{argv[0]} {argv[1]}"
    return None


# --- vllm serve arguments ---------------------------------------------------------------------


@dataclass
class ServeArgs:
    model: str | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int | None = None
    enable_expert_parallel: bool | None = None
    max_model_len: int | None = None
    port: int | None = None
    extra: list[str] = field(default_factory=list)


def _flag_name(token: str) -> str:
    """vLLM accepts ``--max_model_len`` for ``--max-model-len``; compare in one spelling."""
    name = token.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


_VALUE_FLAGS = {
    "--model": "model",
    "--served-model-name": "served_model_name",
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--max-model-len": "max_model_len",
    "--port": "port",
    "--host": "host",
}
_INT_FIELDS = frozenset({"tensor_parallel_size", "max_model_len", "port"})


def parse_serve_args(args: Sequence[str], notes: Notes) -> ServeArgs:
    """Take the flags ModelDeployment types out of ``vllm serve`` args; keep the rest in order."""
    parsed = ServeArgs()
    rest = list(args)
    if rest and not rest[0].startswith("-"):
        parsed.model = rest.pop(0)
    index = 0
    while index < len(rest):
        token = rest[index]
        flag = _flag_name(token)
        if flag in ("--enable-expert-parallel", "--no-enable-expert-parallel"):
            parsed.enable_expert_parallel = flag == "--enable-expert-parallel"
            index += 1
            continue
        target = _VALUE_FLAGS.get(flag)
        if target is None:
            parsed.extra.append(token)
            index += 1
            continue
        if "=" in token:
            values, index = [token.split("=", 1)[1]], index + 1
        else:
            values, index = _values_after(rest, index, many=target == "served_model_name")
            if not values:
                raise StackFileError(f"vllm serve {token} has no value")
        _set_serve_field(parsed, target, token, values, notes)
    return parsed


def _values_after(args: list[str], index: int, *, many: bool) -> tuple[list[str], int]:
    # --served-model-name takes one or more names (nargs="+"); other flags take exactly one.
    values: list[str] = []
    position = index + 1
    while position < len(args) and not args[position].startswith("-"):
        values.append(args[position])
        position += 1
        if not many:
            break
    return values, position


def _set_serve_field(
    parsed: ServeArgs, target: str, token: str, values: list[str], notes: Notes
) -> None:
    flag = token.split("=", 1)[0]
    if target == "host":
        notes.dropped(f"command {flag}", f"{values[0]}: npuswarm always listens on 0.0.0.0")
        return
    if len(values) > 1:
        notes.dropped(
            f"command {flag}",
            f"extra names {values[1:]}: a ModelDeployment serves one name ({values[0]})",
        )
    value: str | int = values[0]
    if target in _INT_FIELDS:
        try:
            value = int(values[0])
        except ValueError:
            raise StackFileError(f"vllm serve {flag} {values[0]!r} is not a whole number") from None
    if getattr(parsed, target) is not None:
        notes.check(f"command {flag}", f"given twice; vLLM used the last one ({value})")
    setattr(parsed, target, value)
