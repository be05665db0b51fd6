"""One line for a command-line override Hydra's grammar cannot read, with the quoting that fixes it."""

from __future__ import annotations

from collections.abc import Sequence


def _quoted(key: str, value: str) -> str:
    # Hydra's quotes inside the shell's: "key='value'" (escaped double quotes where the value holds a ')
    if "'" in value:
        return f'"{key}=\\"{value}\\""'
    return f"\"{key}='{value}'\""


def override_error(override: str, argv: Sequence[str]) -> str:
    """What went wrong with `override` (the argument Hydra could not parse) among the command's `argv`, and the fix.

    The shell split an unquoted value with spaces (`data.root=/my data` gives `data.root=/my` and `data`), or Hydra's
    lexer stopped at a character its unquoted values exclude (non-ASCII letters such as `ü`, brackets, quotes).
    """
    args = list(argv)
    if "=" not in override and override in args:
        end = args.index(override)
        start = next((i for i in range(end - 1, -1, -1) if "=" in args[i]), None)
        if start is not None:
            while end + 1 < len(args) and "=" not in args[end + 1] and not args[end + 1].startswith("-"):
                end += 1
            key, _, value = args[start].partition("=")
            value = " ".join([value, *args[start + 1 : end + 1]])
            return (
                f"{override!r} is not a KEY=VALUE override: the shell split a value with spaces; quote the whole "
                f"override, with Hydra's quotes inside the shell's: {_quoted(key, value)}"
            )
        return f"{override!r} is not a KEY=VALUE override (e.g. data.root=DIR); see --help for the settings"
    key, _, value = override.partition("=")
    if not key:
        return f"cannot read the override {override!r}; overrides have the form KEY=VALUE (see --help)"
    return (
        f"cannot read the override {override!r}: Hydra needs values with spaces, non-ASCII letters (such as ü) or "
        f"special characters in quotes; write it with Hydra's quotes inside the shell's: {_quoted(key, value)}"
    )
