"""Prompt and target templates: the `{field}` placeholders a template names, as str.format reads them.

The recipe's cross-field rules and the data stage both need them; this module is what both import.
"""

from __future__ import annotations

import string


def template_fields(template: str) -> set[str]:
    """The field names a template inserts; raises ValueError for a template str.format cannot read."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}
