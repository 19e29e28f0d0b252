"""Build the documentation site into docs/ and README.md from the notebooks, without Quarto.

Run from the repo root: `.venv/bin/python tools/build_docs.py` (or `make docs`).

1. nbdev's own processing (`proc_nbs`) writes Quarto-flavoured notebooks to _proc/: hidden and
   export cells removed, show_doc rendered as markdown, front matter as a raw YAML cell, doc links.
2. A small adapter turns them into plain notebooks for myst-nb in .sphinx_build/src/, adds the
   index toctree (chapters in numeric order) and an API reference page built from _modidx.py.
3. Sphinx (configured in docs_src/conf.py) renders the HTML site, which is moved to docs/.
4. README.md is regenerated from the processed nbs/index.ipynb (nbdev_readme needs Quarto).

Where Quarto is installed, plain `nbdev_docs` still works on the same notebooks.
"""
import gc, importlib, inspect, json, re, shutil, sys, textwrap, time
from pathlib import Path

import yaml
from docutils.nodes import make_id

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".sphinx_build"  # git-ignored: generated sources, doctrees, myst-nb's image files
SRC, OUT, DOCS = BUILD / "src", BUILD / "html", ROOT / "docs"
sys.path.insert(0, str(ROOT))  # document this checkout's package, whatever the venv has installed

_re_opt = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")  # a Quarto cell option: `#| echo: false`
_re_source = re.compile(r"^\[source\]\((\S+)\)\{[^}]*\}[ \t]*$", re.M)  # show_doc's link to GitHub
_re_heading = re.compile(r"^(#+) +(.+?) *$", re.M)
# a Quarto callout div, `::: {.callout-note}`, with an optional `## Title` as its first line
_re_callout = re.compile(r"^(:{3,}) *\{\.callout-(note|tip|warning|important|caution)([^}]*)\}"
                         r"[ \t]*\n(?:#+ +(.+)\n)?", re.M)
# a relative link, `](page.html#anchor)`
_re_link = re.compile(r"\]\(([^)\s#:]+\.(?:html|ipynb))(#[^)\s]*)?\)")


def chapter_order(path):
    "Sort key: 01_, 02_, 03a_, 10_ by number, then notebooks without a number, by name."
    m = re.match(r"\d+", path.name)
    return (int(m.group()) if m else float("inf"), path.name)


def text(x):
    "Notebook JSON stores text as a string or a list of lines."
    return "".join(x) if isinstance(x, list) else x


def split_options(src):
    "Split a code cell's leading `#| key: value` lines (Quarto cell options) from its code."
    lines, opts = src.splitlines(), {}
    while lines and lines[0].startswith("#|"):
        m = _re_opt.match(lines.pop(0))
        if m: opts[m[1]] = m[2].strip("'\"")
    return opts, "\n".join(lines)


def md_outputs(cell):
    "The markdown a `#| output: asis` cell injects into the page (as Quarto does)."
    res = []
    for o in cell.get("outputs", []):
        if "text/markdown" in o.get("data", {}): res.append(text(o["data"]["text/markdown"]))
        elif o.get("output_type") == "stream": res.append(text(o["text"]))
    return "\n\n".join(res)


def cell_tags(opts):
    """myst-nb's tags for a code cell's Quarto options: `include: false` -> remove-cell,
    `echo: false` -> remove-input, `output: false` -> remove-output, and `code-fold: true` ->
    hide-input (the code folded under a "show code" toggle, its output shown)."""
    tags = {"include": "remove-cell", "echo": "remove-input", "output": "remove-output"}
    res = [t for k, t in tags.items() if opts.get(k, "").lower() == "false"]
    if opts.get("code-fold", "").lower() == "true" and "remove-input" not in res:
        res.append("hide-input")
    return res


def merge_streams(outputs):
    "Consecutive prints to one stream as one output block, as Jupyter shows them."
    res = []
    for o in outputs:
        prev = res[-1] if res else None
        if (o.get("output_type") == "stream" and prev and prev.get("output_type") == "stream"
                and prev["name"] == o["name"]):
            prev["text"] = text(prev["text"]) + text(o["text"])
        else: res.append(dict(o))
    return res


def callouts(md):
    "Quarto callouts -> MyST admonitions (`:::{note}`, or `:::{admonition} Title` with class note)."
    def repl(m):
        title = m[4] or (re.search(r'title="([^"]*)"', m[3]) or [None, ""])[1]
        return f"{m[1]}{{admonition}} {title}\n:class: {m[2]}\n" if title else f"{m[1]}{{{m[2]}}}\n"
    return _re_callout.sub(repl, md)


def anchor(id_):
    "An HTML anchor, for ids that Sphinx's own heading ids don't already provide."
    return "" if make_id(id_) == id_ else f'<div id="{id_}"></div>\n\n'


MAX_LINE = 100  # the width of a code block on a page without a horizontal scroll bar


def wrap_signature_line(line):
    """A show_doc signature line wider than MAX_LINE, as several: the parameter's comment on the
    next line(s), and a long default value broken after its commas."""
    if len(line) <= MAX_LINE: return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    code, sep, comment = line.partition(" # ")
    res = textwrap.wrap(code.rstrip(), MAX_LINE, subsequent_indent=indent, break_long_words=False,
                        break_on_hyphens=False)
    if sep: res += textwrap.wrap(comment, MAX_LINE, initial_indent=indent + "# ",
                                 subsequent_indent=indent + "# ", break_long_words=False)
    return res


def fix_show_doc(md, ids, anchor_id=None):
    """Make show_doc's Quarto markdown plain MyST: the rule and the `{target=...}` source link
    become HTML, the heading gets nbdev's anchor (`#patchify`, `#foo.__call__`) and escaped
    underscores."""
    md = re.sub(r"^---[ \t]*$", '<hr class="showdoc">', md, count=1, flags=re.M)
    # nbdev's add_links also links `names` in signature comments, inside the code block: undo that
    md = re.sub(r"```.*?```", lambda m: re.sub(r"\[(`[^`]+`)\]\([^)]*\)", r"\1", m[0]), md,
                flags=re.S)
    md = re.sub(r"```.*?```", lambda m: "\n".join(w for line in m[0].split("\n")
                                                   for w in wrap_signature_line(line)),
                md, flags=re.S)
    md = _re_source.sub(r'<p class="sd-source"><a href="\1" target="_blank">source</a></p>', md)
    m = _re_heading.search(md)
    if not m: return md
    id_ = anchor_id or m[2].lower()
    ids.add(id_)
    heading = f"{m[1]} " + m[2].replace("_", r"\_")
    return anchor(id_) + md[:m.start()] + heading + md[m.end():]


class Site:
    "Turn processed notebooks into myst-nb sources, tracking anchors so doc links can be checked."
    def __init__(self, cfg, syms):
        # nbdev's absolute doc URLs
        self.base = cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/") + "/"
        # page stem -> anchor ids, title; notebook file -> stem
        self.ids, self.titles, self.stems = {}, {}, {}
        # nbdev doc URL ('patches.html#patchify') -> the symbol's id on the API page
        self.api_ids = {url: nm for mod in syms.values() for nm, (url, _) in mod.items()}

    def convert(self, nb, stem, fname):
        "A processed (Quarto-flavoured) notebook -> a plain notebook for myst-nb."
        ids, cells = self.ids.setdefault(stem, set()), []
        self.stems[fname], self.titles[stem] = stem, stem
        nb["metadata"].pop("execution", None)  # nbdev writes floats here that nbformat rejects
        for c in nb["cells"]:
            c.pop("has_sd", None)  # nbdev's marker for auto-added show_doc cells; not nbformat
            c["metadata"].pop("execution", None)
            src = text(c["source"])
            if c["cell_type"] == "raw" and src.startswith("---"):  # front matter (always first)
                fm = front_matter(src)
                self.titles[stem] = fm.get("title", stem)
                md = f"# {self.titles[stem]}\n"
                if fm.get("description"):
                    md += f"\n:::{{container}} description\n{fm['description']}\n:::\n"
                cells.append(dict(cell_type="markdown", id=c["id"], metadata={}, source=md))
                continue
            if c["cell_type"] == "markdown": c["source"] = callouts(src)
            if c["cell_type"] != "code":
                cells.append(c)
                continue
            opts, c["source"] = split_options(src)
            if opts.get("output") == "asis":  # show_doc: its markdown output becomes page content
                md = md_outputs(c)
                if re.match(r"show_doc\(", c["source"]): md = fix_show_doc(md, ids)
                cells.append(dict(cell_type="markdown", id=c["id"], metadata={}, source=md))
                if opts.get("echo") == "false": continue
                c["outputs"] = []
            c["outputs"] = merge_streams(c.get("outputs", []))
            c["metadata"]["tags"] = cell_tags(opts)
            if not c["metadata"]["tags"]: del c["metadata"]["tags"]
            if opts.get("code-summary"):  # the fold's label, as Quarto's `code-summary` sets it
                c["metadata"]["mystnb"] = {"code_prompt_show": opts["code-summary"]}
            cells.append(c)
        nb["cells"] = cells
        return nb

    def fix_links(self, md):
        """nbdev's absolute doc links -> relative (to the API page where the chapter lacks the
        anchor); links to notebooks (`02_attention.ipynb`) -> their pages, as Quarto does."""
        def repl(m):
            page, frag = m[1], m[2] or ""
            if page.endswith(".ipynb"): page = self.stems.get(page, page[:-6]) + ".html"
            if frag and frag[1:] not in self.ids.get(page[:-5], ()) and page + frag in self.api_ids:
                page, frag = "api.html", "#" + self.api_ids[page + frag]
            return f"]({page}{frag})"
        return _re_link.sub(repl, md.replace("](" + self.base, "]("))

    def write(self, nb, stem):
        for c in nb["cells"]:
            if c["cell_type"] == "markdown": c["source"] = self.fix_links(c["source"])
            for o in c.get("outputs", []):   # markdown a code cell displays (e.g. a table of links)
                if "text/markdown" in o.get("data", {}):
                    o["data"]["text/markdown"] = self.fix_links(text(o["data"]["text/markdown"]))
        (SRC / f"{stem}.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False),
                                           encoding="utf-8")


LAZY_NAMES = {"v2": "torchvision.transforms.v2"}   # imported inside functions by every module that uses it


def show_doc_lazy(obj, syms):
    """show_doc's markdown for obj. show_doc evaluates the annotations of the signature in the
    module's globals; a module that imports a name inside its functions, to stay light at import
    (`-> TrainConfig`, `-> v2.Compose`), lacks it there. Such a name is borrowed, for this call only,
    from the library module that has it as a global, or else imported as `LAZY_NAMES` says."""
    from nbdev.showdoc import show_doc
    f = inspect.unwrap(obj.fget if isinstance(obj, property) else obj)
    glb = getattr(f, "__globals__", None) or vars(sys.modules[obj.__module__])
    added = []
    try:
        while True:
            try: return show_doc(obj)._repr_markdown_()
            except NameError as e:
                if e.name in glb or e.name in added: raise
                owners = [importlib.import_module(m) for m in syms]
                owner = next((m for m in owners if e.name in vars(m)), None)
                if owner is None and e.name not in LAZY_NAMES: raise
                glb[e.name] = (vars(owner)[e.name] if owner else
                               importlib.import_module(LAZY_NAMES[e.name]))
                added.append(e.name)
    finally:
        for nm in added: glb.pop(nm, None)


def api_page(syms, site):
    "The API reference's markdown: show_doc (signature, parameter docs, docstring) of every export."
    from nbdev.doclinks import NbdevLookup
    ids, lookup = site.ids.setdefault("api", set()), NbdevLookup()
    md = ["# API reference\n", "Every symbol exported by the library, grouped by module.\n"]
    for mod, entries in syms.items():
        if not entries: continue  # a module without functions or classes
        page = next(iter(entries.values()))[0].split("#")[0]
        md.append(f"## {mod}\n\nExplained in [{site.titles.get(page[:-5], page)}]({page}).\n")
        for nm in entries:
            obj = importlib.import_module(mod)
            for part in nm[len(mod) + 1:].split("."): obj = getattr(obj, part)
            # An undocumented `Foo.__init__` would only repeat Foo's entry (same signature and
            # parameter docs) under an inherited docstring: it gets an anchor on Foo's entry.
            if nm.endswith(".__init__") and obj.__doc__ is None: continue
            init = f"{nm}.__init__"
            doc = (f'<div id="{init}"></div>\n\n'
                   if init in entries and obj.__init__.__doc__ is None else "")
            doc += show_doc_lazy(obj, syms)
            # keep the signature, not a docstring inherited from e.g. nn.Module.forward
            if obj.__doc__ is None:
                doc = doc[:doc.index("\n```", doc.index("```python")) + 4]
            # nbdev finds the source line by the notebook-namespace name ('LSA'),
            # not 'vitsd_nbdev.attention.LSA'
            src = obj.fget if isinstance(obj, property) else inspect.unwrap(obj)
            doc = doc.replace("#LNone)", f"#L{inspect.getsourcelines(src)[1]})")
            md.append(fix_show_doc(lookup.linkify(doc), ids, anchor_id=nm))
    return site.fix_links("\n\n".join(md))


def front_matter(src):
    "The YAML of a raw front-matter cell (`---` lines around it)."
    return yaml.safe_load(src.strip().strip("-")) or {}


def repo_links(md):
    "Links to notebooks (`01_patches.ipynb`) -> to their files in the repository, as on GitHub."
    return re.sub(r"\]\(([\w.-]+\.ipynb)", r"](nbs/\1", md)


def readme(nb, cfg):
    "GitHub-flavoured README.md from the processed index notebook (front matter -> title, summary)."
    out = []
    for c in nb["cells"]:
        src = text(c["source"])
        if c["cell_type"] == "raw" and src.startswith("---"):
            fm = front_matter(src)
            out.append(f"# {fm.get('title', cfg.title)}")
            if fm.get("description"): out.append(f"> {fm['description']}")
        elif c["cell_type"] == "markdown": out.append(repo_links(src.strip()))
        elif c["cell_type"] == "code":
            opts, code = split_options(src)
            if opts.get("include") == "false": continue
            if opts.get("echo") != "false": out.append(f"```python\n{code.strip()}\n```")
            if opts.get("output") == "false": continue
            for o in c.get("outputs", []):  # text only: figures are left to the docs site
                d = o.get("data", {})
                if "text/markdown" in d: out.append(repo_links(text(d["text/markdown"]).strip()))
                elif o.get("output_type") == "stream":
                    out.append("```\n" + text(o["text"]).rstrip("\n") + "\n```")
                elif "text/plain" in d and not any(k.startswith("image/") for k in d):
                    out.append("```\n" + text(d["text/plain"]).rstrip("\n") + "\n```")
    return "\n\n".join(s for s in out if s) + "\n"


def main():
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    from sphinx.cmd.build import build_main

    t0 = time.time()
    cfg = get_config()
    # Writes _proc/*.ipynb. In this process, one notebook after another: 3x faster than nbdev's
    # default worker processes, which each import the library (and torch) again.
    proc = proc_nbs(force=True, n_workers=0)
    syms = (importlib.import_module(f"{cfg.lib_name}._modidx").d["syms"]
            if (cfg.lib_path / "_modidx.py").exists() else {})

    shutil.rmtree(BUILD, ignore_errors=True)
    SRC.mkdir(parents=True)
    site = Site(cfg, syms)
    # Chapters, in numeric order: every top-level notebook but index and _*.ipynb (nbdev skips)
    chapters = sorted((p for p in proc.glob("*.ipynb")
                       if p.name != "index.ipynb" and not p.name.startswith("_")),
                      key=chapter_order)
    pages, nbs = [], {}
    for p in chapters:
        nb = json.loads(p.read_text(encoding="utf-8"))
        fm = text(nb["cells"][0]["source"]) if nb["cells"] else ""
        stem = Path(front_matter(fm).get("output-file", p.name) if fm.startswith("---")
                    else p.name).stem
        if stem in nbs or stem in ("index", "api"):
            sys.exit(f"{p.name}: page name {stem!r} is already taken")
        nbs[stem] = site.convert(nb, stem, p.name)
        pages.append(stem)

    index = proc / "index.ipynb"
    if not index.exists():
        sys.exit(f"{cfg.nbs_path.name}/index.ipynb is missing: it is the home page and README")
    home = json.loads(index.read_text(encoding="utf-8"))
    (ROOT / "README.md").write_text(readme(home, cfg), encoding="utf-8")
    home = site.convert(home, "index", "index.ipynb")
    toc = "```{toctree}\n:hidden:\n:caption: %s\n\n%s\n```\n"
    home["cells"].append(dict(cell_type="markdown", id="toctree", metadata={},
                              source=toc % ("Chapters", "\n".join(pages)) + "\n"
                              + toc % ("Reference", "api")))
    nbs["index"] = home
    api = api_page(syms, site)  # after the chapters, so links go to their show_doc anchors
    (SRC / "api.md").write_text(api, encoding="utf-8")
    for stem, nb in nbs.items(): site.write(nb, stem)

    t1 = time.time()
    rc = build_main(["-q", "-b", "html", "-c", str(ROOT / "docs_src"),
                     "-d", str(BUILD / "doctrees"), str(SRC), str(OUT)])
    if rc: sys.exit(rc)
    shutil.rmtree(DOCS, ignore_errors=True)
    # built next to .sphinx_build/jupyter_execute so myst-nb's scratch files stay git-ignored
    OUT.rename(DOCS)
    print(f"docs/ built ({len(pages)} chapters + home + API) in {time.time() - t0:.1f}s "
          f"(nbdev {t1 - t0:.1f}s, sphinx {time.time() - t1:.1f}s); README.md regenerated")


if __name__ == "__main__":
    main()
    # At exit, each IPython shell nbdev started to run show_doc cells resets itself with a full
    # gc.collect(): ~0.3 s each with torch loaded. Frozen objects are skipped by the collector.
    gc.freeze()
