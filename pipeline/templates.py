"""Prompt and target templates: the `{field}` placeholders a template names, as str.format reads them.

The recipe's cross-field rules and the data stage both need them; this module is what both import.
"""

from __future__ import annotations

import string


def template_fields(template: str) -> set[str]:
    """The field names a template inserts; raises ValueError for a template str.format cannot read."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def template_problem(template: object) -> str | None:
    """Why `template` is not a prompt template (a message ending a recipe error), or None where it is one: it
    parses, and every placeholder is a plain {name} of a row's field (no position, attribute, index, conversion
    or format spec)."""
    if isinstance(template, dict | list):  # YAML read an unquoted {text} as a mapping
        return 'is not text: YAML reads an unquoted {field} as a mapping; quote the template ("Message: {text}")'
    if not isinstance(template, str):
        return None  # pydantic's own type error says what it is
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"is not a template ({e}); write literal braces as {{{{ and }}}}"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.strip() or name.strip().isdigit():
            return "has a {} without a field name; name the row's field, e.g. {text}"
        if any(c in name for c in ".[]") or spec or conversion:
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            return f"{written} is not a plain field: write {{name}} of a row's field (literal braces as {{{{ and }}}})"
    return None
