"""Checks of the built documentation site in docs/ (build it with `make docs`).

Skipped when docs/ has not been built, unless VITSD_REQUIRE_DOCS=1 (as `make test` sets).
"""
import importlib, importlib.util, inspect, json, os, re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
DOCS, NBS = ROOT / "docs", ROOT / "nbs"
LIB = "vitsd_nbdev"
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//)", re.I)  # http:, mailto:, data:, //host ...
NO_MATH = ("script", "style", "pre", "code", "textarea")  # where TeX-looking text is fine


@pytest.fixture(scope="module")
def pages():
    "Every HTML page of the site, parsed: {'patches.html': soup}."
    if not (DOCS / "index.html").exists():
        msg = "docs/ is not built: run `make docs`"
        if os.environ.get("VITSD_REQUIRE_DOCS") == "1": pytest.fail(msg)
        pytest.skip(msg)
    return {p.name: BeautifulSoup(p.read_text(encoding="utf-8"), "html.parser")
            for p in DOCS.glob("*.html")}


def notebook_pages():
    "nbs/ notebooks -> the page nbdev names for each (01_patches.ipynb -> patches.html)."
    nbs = sorted(p.name for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))
    return {nb: re.sub(r"^\d+[a-zA-Z0-9]*_", "", nb.lower())[:-6] + ".html" for nb in nbs}


def chapter_key(nb):
    m = re.match(r"\d+", nb)
    return (int(m.group()) if m else float("inf"), nb)


def exported_symbols():
    "{'vitsd_nbdev.patches.patchify': object} for every symbol in _modidx.py."
    try: syms = importlib.import_module(f"{LIB}._modidx").d["syms"]
    except ModuleNotFoundError: pytest.skip("the library exports nothing yet (no _modidx.py)")
    res = {}
    for mod, entries in syms.items():
        for nm in entries:
            obj = importlib.import_module(mod)
            for part in nm[len(mod) + 1:].split("."): obj = getattr(obj, part)
            res[nm] = obj
    return res


def norm(s):
    "Letters and digits only, markdown links reduced to their text: docstrings vs page text."
    return re.sub(r"[^0-9a-z]+", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s or "").lower())


def test_page_for_every_notebook(pages):
    for nb, page in notebook_pages().items():
        assert page in pages, f"no page {page} for nbs/{nb}"
        assert pages[page].find("h1"), (
            f"{page} has no title: start nbs/{nb} with a `# Title` markdown cell")
    assert "api.html" in pages


def test_sidebar_lists_chapters_in_order(pages):
    nbs = notebook_pages()
    want = [nbs[nb] for nb in sorted(nbs, key=chapter_key) if nb != "index.ipynb"] + ["api.html"]
    got = [a["href"] for a in pages["index.html"].select(".sidebar-tree a.reference.internal")]
    assert got == want, ("sidebar entries differ from the notebooks in numeric order: "
                         "each notebook needs exactly one `# Title` (H1); "
                         "use `##` and below for its sections")


def test_every_export_has_api_entry(pages):
    api = pages["api.html"]
    for nm, obj in exported_symbols().items():
        anchor = api.find(id=nm)
        assert anchor, f"{nm} is missing from the API page"
        # the show_doc heading's section
        entry = norm(anchor.find_next("section").get_text())
        # undocumented __init__: its class's entry
        folded = nm.endswith(".__init__") and obj.__doc__ is None
        assert norm(nm.split(".")[-2 if folded else -1]) in entry, (
            f"{nm}: anchor is not on its entry")
        own_doc = inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""
        assert norm(own_doc) in entry, f"docstring of {nm} missing from its API entry"
        from fastcore.docments import docments
        try: params = docments(obj, full=False)
        # no signature (e.g. some builtins)
        except (TypeError, ValueError): params = {}
        for p, doc in params.items():
            assert not doc or norm(doc) in entry, (
                f"parameter doc of {nm}({p}) missing from its API entry")


def test_math_is_rendered_by_local_mathjax(pages):
    tex = re.compile(r"(?<!\\)\$\$?[^$\s][^$]*?\$|\\(mathcal|mathbb|frac|begin)\b")
    for name, soup in pages.items():
        for s in soup.find_all(string=tex):
            if not s.find_parent(NO_MATH) and not s.find_parent(class_="math"):
                pytest.fail(f"{name}: unrendered TeX outside a MathJax container: "
                            f"{s.strip()[:120]!r}")
    scripts = [(name, s["src"]) for name, soup in pages.items()
               for s in soup.find_all("script", src=True)]
    assert not [x for x in scripts if EXTERNAL.match(x[1])], (
        "scripts must load from docs/, not the network")
    styles = [(name, s["href"]) for name, soup in pages.items()
              for s in soup.find_all("link", rel="stylesheet")]
    assert not [x for x in styles if EXTERNAL.match(x[1])], (
        "stylesheets must load from docs/, not the network")
    math_pages = [name for name, soup in pages.items() if soup.find(class_="math")]
    for name in math_pages:
        srcs = [s["src"] for s in pages[name].find_all("script", src=True)
                if "mathjax" in s["src"].lower()]
        assert srcs and all((DOCS / urlsplit(s).path).is_file() for s in srcs), (
            f"{name}: MathJax not loaded")


def test_markdown_tables_are_rendered(pages):
    "Tables in markdown cells and outputs (the results tables) become HTML tables, not pipe rows."
    # a table's |---| separator line (or |—|, as a typographer turns it)
    row = re.compile(r"\|\s*:?(-{3,}|[—–]+-*):?\s*\|")
    for name, soup in pages.items():
        for s in soup.find_all(string=row):
            if not s.find_parent(NO_MATH):
                pytest.fail(f"{name}: an unrendered markdown table: {s.strip()[:120]!r}")
    assert pages["index.html"].find_all("table"), "the home page's results tables are missing"


def test_internal_links_resolve(pages):
    for name, soup in pages.items():
        for tag in soup.find_all(["a", "link", "img", "script", "source"]):
            url = tag.get("href") or tag.get("src")
            if not url or EXTERNAL.match(url): continue
            parts = urlsplit(url)
            target = (DOCS / name).parent / unquote(parts.path) if parts.path else DOCS / name
            assert target.is_file(), f"{name}: broken link {url!r}"
            page = pages.get(target.name) if target.parent == DOCS else None
            if parts.fragment and page is not None:
                assert page.find(id=unquote(parts.fragment)), (
                    f"{name}: link {url!r} to a missing anchor")


def test_images_exist(pages):
    imgs = [(name, img["src"]) for name, soup in pages.items()
            for img in soup.find_all("img", src=True)]
    for name, src in imgs:
        if not src.startswith("data:"):
            assert (not EXTERNAL.match(src)
                    and (DOCS / unquote(urlsplit(src).path)).is_file()), f"{name}: image {src}"


def test_search(pages):
    assert "search.html" in pages
    index = (DOCS / "searchindex.js").read_text(encoding="utf-8")
    for page in notebook_pages().values():
        assert f'"{page[:-5]}"' in index, f"{page} is not in the search index"


MAX_CODE_LINE = 100  # a wider code line gets a horizontal scroll bar on the docs pages


def long_code_lines(soup):
    "(line, length) of each code line over MAX_CODE_LINE: code cells, code blocks, signatures."
    res = []
    for pre in soup.find_all("pre"):
        if pre.find_parent(class_="cell_output"): continue   # printed output is data, not code
        res += [(line, len(line)) for line in pre.get_text().splitlines()
                if len(line) > MAX_CODE_LINE]
    return res


def test_long_code_lines_are_found():
    soup = BeautifulSoup(f"<pre>{'x' * 101}</pre>"
                         f"<div class='cell_output'><pre>{'y' * 200}</pre></div>"
                         f"<pre>{'z' * 100}</pre>", "html.parser")
    assert long_code_lines(soup) == [("x" * 101, 101)]


def test_code_lines_fit_the_page(pages):
    "No code line on any page is wider than MAX_CODE_LINE characters."
    too_long = {name: long_code_lines(soup) for name, soup in sorted(pages.items())}
    report = [f"{name}: {n} chars: {line.strip()[:70]}..." for name, lines in too_long.items()
              for line, n in lines]
    assert not report, (f"{len(report)} code lines over {MAX_CODE_LINE} characters:\n"
                        + "\n".join(report))


def build_docs_module():
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    return bd


def test_consecutive_prints_are_one_output_block():
    bd = build_docs_module()
    out = lambda name, t: dict(output_type="stream", name=name, text=t)
    merged = bd.merge_streams([out("stdout", "a\n"), out("stdout", ["b\n"]), out("stderr", "w\n"),
                               dict(output_type="display_data", data={}), out("stdout", "c\n")])
    assert [(o.get("name"), o.get("text")) for o in merged] == [
        ("stdout", "a\nb\n"), ("stderr", "w\n"), (None, None), ("stdout", "c\n")]


def test_quarto_options_map_to_myst_nb_tags():
    tags = build_docs_module().cell_tags
    assert tags({"code-fold": "true"}) == ["hide-input"]
    assert tags({"code-fold": "show"}) == []           # Quarto's "foldable, shown": a plain cell
    assert tags({"echo": "false", "code-fold": "true"}) == ["remove-input"]
    assert tags({"include": "false", "output": "false"}) == ["remove-cell", "remove-output"]


def folded_cells(nb):
    "The code (without its `#|` lines) of each `#| code-fold: true` cell of a notebook."
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    srcs = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return ["\n".join(line for line in s.splitlines() if not line.startswith("#|")).strip()
            for s in srcs if re.match(r"#\|\s*code-fold:\s*true\s*$", s, re.M | re.I)]


def test_folded_solutions_render_folded(pages):
    """A `#| code-fold: true` cell (an exercise's solution) is on its page under a closed
    "show code" toggle, its code inside the toggle and its output outside."""
    folded = {nb: folded_cells(NBS / nb) for nb in notebook_pages()}
    assert folded["01_patches.ipynb"], "chapter 1's exercises have no folded solution cell"
    for nb, codes in folded.items():
        page = notebook_pages()[nb]
        cells = pages[page].select("div.cell.tag_hide-input")
        shown = [norm(d.get_text()) for c in cells for d in c.select("details.hide.above-input")
                 if not d.has_attr("open")]
        for code in codes:
            assert any(norm(code) in s for s in shown), (
                f"{page}: a code-fold cell of nbs/{nb} is not folded: {code[:60]!r}")
        assert not [c for c in cells if c.select("details .cell_output")], (
            f"{page}: a code-fold cell's output is folded too; only its code should be")
    sec = pages["patches.html"].find(id="exercises")
    assert sec and sec.select("div.cell.tag_hide-input details"), (
        "patches.html: no folded solution in the Exercises section")


def test_api_entry_for_a_lazily_imported_annotation(tmp_path, monkeypatch):
    """A function annotated with a name its module imports only inside functions (to stay light
    at import) still gets its API entry, and the module is left as it was."""
    (tmp_path / "owner_mod_x.py").write_text("class Thing: pass\n")
    (tmp_path / "lazy_mod_x.py").write_text(
        "from __future__ import annotations\n\n"
        "def make(n: int) -> Thing:  # a new Thing\n"
        "    'Make a Thing.'\n"
        "    from owner_mod_x import Thing\n"
        "    return Thing()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = importlib.import_module("lazy_mod_x")
    md = build_docs_module().show_doc_lazy(lazy.make, {"owner_mod_x": {}, "lazy_mod_x": {}})
    assert "-> Thing" in md.replace(")->", ") -> ") and "Make a Thing." in md
    assert "Thing" not in vars(lazy)
