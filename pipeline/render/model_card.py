"""The model card's body as the Hub shows it, from a Jinja2 template (templates/model_card.md.j2) like the HTML
report: pipeline/publish.py gathers what goes in, the template says where it goes."""

from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"


def render_body(context: dict) -> str:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=False,  # Markdown, not HTML: the report's tables and code blocks go in as they are
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )
    return environment.get_template("model_card.md.j2").render(**context).rstrip("\n")
