"""Sphinx configuration for the vitsd_nbdev documentation site.

Built by `tools/build_docs.py` (run `make docs`), which generates the page sources from the
notebooks in nbs/; this file only sets up the theme and extensions. Title and description come
from settings.ini, the nbdev project file.
"""
from configparser import ConfigParser
from html import escape
from pathlib import Path

_cfg = ConfigParser(delimiters=["="])
_cfg.read(Path(__file__).resolve().parent.parent / "settings.ini", encoding="utf-8")
_cfg = _cfg["DEFAULT"]

project = html_title = _cfg["title"]
author = _cfg["author"]
copyright = _cfg["copyright"]
release = version = _cfg["version"]
description = _cfg["description"]

extensions = ["myst_nb", "sphinx-mathjax-offline"]  # the latter ships MathJax 3 into _static/
nb_execution_mode = "off"  # notebooks are shown with the outputs saved in them
nb_render_markdown_format = "myst"  # markdown outputs (the results tables) are MyST, so tables and math render
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
# Markdown links are plain hrefs, as on nbdev's Quarto site: the build script points nbdev's doc links
# at the generated pages (`patches.html#patchify`), which Sphinx's cross-referencing doesn't know.
myst_all_links_external = True
# show_doc headings are H3 and may directly follow the H1 page title.
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_copy_source = False  # don't publish the generated notebook sources next to the pages
html_show_sourcelink = False


def _add_description(app, pagename, templatename, context, doctree):
    "Add settings.ini's description as the pages' <meta name=description>."
    context["metatags"] = context.get("metatags", "") + f'<meta name="description" content="{escape(description)}">\n'


def setup(app):
    app.connect("html-page-context", _add_description)
    # Load MathJax on every page, not only on pages with equations: a page title with math is shown in
    # the sidebar of all pages (search and index pages included).
    app.set_html_assets_policy("always")
