"""MkDocs hook: the configuration page's reference table, generated from ``TrainConfig`` at build time
(every field with its type, default, bound or choices and one line of meaning), in place of the
line ``<!-- config-reference -->``; so the reference can never drift from the code."""

from __future__ import annotations

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    from switchformer.train.config import reference_rows  # the installed package, at build time

    lines = ["| field | type | default | bound or choices | meaning |", "|---|---|---|---|---|"]
    for row in reference_rows():
        cells = [f"`{row['name']}`", f"`{row['type']}`", f"`{row['default']}`", row["bound"], row["meaning"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return markdown.replace(MARKER, "\n".join(lines))
