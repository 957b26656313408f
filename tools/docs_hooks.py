"""MkDocs hook (see `hooks:` in `mkdocs.yml`): relative links for the site.

The Markdown files link to each other by their paths in the repository, so
that the links work on GitHub: `docs/index.md` links
`../benchmarks/README.md`, the README links `docs/losses/kd.md`. In the
site, `docs/` is the root and the files from outside it are copies placed
by `tools/docs_pages.py` (the README as `getting_started.md`,
`benchmarks/` and `examples/` under the same names). Before each page is
rendered, every relative link is resolved against the page's file in the
repository and rewritten to the target's place in the site. A target that
has no place in the site is left as written, so that `mkdocs build
--strict` reports it as a broken link.
"""

import posixpath
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docs_pages  # noqa: E402

_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_FENCE = re.compile(r"^(```|~~~)")


def _site_paths():
    """`{repository path: site path}` for the files the site shows."""
    return docs_pages.mirrored_files()


def _repository_path(site_path, mirrored):
    """The repository file behind a page (None for generated pages)."""
    for repository, site in mirrored.items():
        if site == site_path:
            return repository
    if site_path.startswith(docs_pages.REFERENCE_DIR + "/"):
        return None
    return "docs/" + site_path


def _site_path(repository_path, mirrored):
    if repository_path in mirrored:
        return mirrored[repository_path]
    if repository_path.startswith("docs/"):
        return repository_path[len("docs/"):]
    return None


def rewrite_links(markdown, page_site_path, mirrored):
    """`markdown` with its relative links rewritten from repository paths to
    site paths, for the page at `page_site_path`. Fenced code is left
    alone."""
    source = _repository_path(page_site_path, mirrored)
    if source is None:
        return markdown
    page_dir = posixpath.dirname(page_site_path)
    source_dir = posixpath.dirname(source)

    def rewrite(match):
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(
            ("#", "/")
        ):
            return match.group(0)  # a URL, an anchor or an absolute path
        path, hash_, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(source_dir, path))
        site = _site_path(resolved, mirrored)
        if site is None:
            return match.group(0)
        relative = posixpath.relpath(site, page_dir or ".")
        return match.group(1) + relative + hash_ + anchor + match.group(3)

    lines = []
    fenced = False
    for line in markdown.split("\n"):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        lines.append(line if fenced else _LINK.sub(rewrite, line))
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    return rewrite_links(markdown, page.file.src_uri, _site_paths())
