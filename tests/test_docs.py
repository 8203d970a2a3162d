"""The README and docs/ name only what exists (as sqlite-utils' docs tests do): every relative
link a real file, and a real heading when it has a #anchor; every quoted `kgsupervisor …`
command a real command with real options, taken from the click command tree itself."""
from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import click
import pytest

from kgsupervisor.ops.cli import main as kgsupervisor_cli

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MOST_LINES = 250  # the front page: the rest belongs on a docs/ page of its own subject

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# A shell block's every line is a command line; a console block's only those after "$ " (the
# rest is what they printed). Other blocks (python, toml, text) quote no command line.
SHELL_BLOCKS = {"", "sh", "shell", "bash", "zsh"}
CONSOLE_BLOCKS = {"console", "shell-session"}
# `kgsupervisor` as a program: alone or at the end of a path, followed by its arguments.
# `kgsupervisor_kg_up`, `kgsupervisor[postgres]` and `conf/kgsupervisor.service` are not.
INVOCATION = re.compile(r"(?:^|(?<=[\s/]))kgsupervisor(?=\s|$)(.*)")
SHELL_SEPARATOR = re.compile(r"\s(?:&&|\|\||[|;&])(?=\s|$)")
COMMENT = re.compile(r"(?:^|\s)#.*")
COMMAND_WORD = re.compile(r"[a-z][a-z0-9-]*")
VALUE_LOOKING_LIKE_AN_OPTION = re.compile(r"-\d|-+$")

CommandTree = dict[tuple[str, ...], set[str]]  # a command's path -> the option names it takes


# -- reading a page ------------------------------------------------------------------------------

def closes(line: str, fence: str) -> bool:
    """The line ends the block `fence` opened: the same character, at least as many, nothing else."""
    return re.fullmatch(re.escape(fence[0]) + "{%d,}" % len(fence), line.strip()) is not None


def split_fences(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The page's prose (fenced blocks blanked out) and its fenced blocks as (language, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence = None
    for line in text.splitlines():
        opening = FENCE.match(line) if fence is None else None
        if opening:
            fence = opening.group(1)
            blocks.append((opening.group(2).lower(), []))
        elif fence is None:
            prose.append(line)
            continue
        elif closes(line, fence):
            fence = None
        else:
            blocks[-1][1].append(line)
        prose.append("")  # a blank line for each line of a block: it never joins the prose around it
    return "\n".join(prose), blocks


def without_inline_code(prose: str) -> str:
    """Prose with its code spans removed, so a bracket in code is never read as a link."""
    return INLINE_CODE.sub("", prose)


def inline_code_spans(prose: str) -> list[str]:
    """The text of every code span, on one line; a table's escaped pipe is a plain one in code."""
    return [" ".join(m.group(2).replace("\\|", "|").split()) for m in INLINE_CODE.finditer(prose)]


# -- links and anchors ---------------------------------------------------------------------------

def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, the repeats numbered -1, -2 … as GitHub numbers them."""
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def link_targets(text: str) -> list[str]:
    """The target of every inline, image and reference link in the page's prose."""
    prose = without_inline_code(split_fences(text)[0])
    return LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def link_problems(page: pathlib.Path, text: str) -> list[str]:
    """What is wrong with the page's relative links: a missing file, or a heading it does not have."""
    problems = []
    for target in link_targets(text):
        if URL_SCHEME.match(target):
            continue  # http:, https:, mailto: are not this repository's to check
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists():
            problems.append(f"{page.name}: link to {target}: no such file {linked}")
        elif anchor and linked.suffix == ".md":
            linked_text = text if linked == page else linked.read_text(encoding="utf-8")
            if anchor not in anchors(linked_text):
                problems.append(f"{page.name}: link to {target}: {linked.name} has no heading #{anchor}")
    return problems


# -- quoted commands -----------------------------------------------------------------------------

def option_names(command: click.Command, ctx: click.Context) -> set[str]:
    """Every spelling of every option the command takes, its help option included."""
    return {name for param in command.get_params(ctx) if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)}


def command_tree(group: click.Group) -> CommandTree:
    """Command path -> its option names, for the group and every command below it."""
    tree: CommandTree = {}

    def walk(command: click.Command, path: tuple[str, ...], parent: click.Context | None) -> None:
        settings = command.context_settings if parent is None else {}
        ctx = click.Context(command, info_name=" ".join(path) or "kgsupervisor", parent=parent, **settings)
        tree[path] = option_names(command, ctx)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name), ctx)

    walk(group, (), None)
    return tree


def command_lines(text: str) -> Iterator[str]:
    """Every place the page quotes a command line: code spans, shell lines, console "$ " lines."""
    prose, blocks = split_fences(text)
    yield from inline_code_spans(prose)
    for language, lines in blocks:
        joined = "\n".join(lines).replace("\\\n", " ").splitlines()
        if language in SHELL_BLOCKS:
            yield from joined
        elif language in CONSOLE_BLOCKS:
            yield from (line.strip()[2:] for line in joined if line.strip().startswith("$ "))


def invocations(line: str) -> Iterator[list[str]]:
    """The argument words of each `kgsupervisor` invocation on a command line, brackets dropped."""
    for segment in SHELL_SEPARATOR.split(COMMENT.sub("", line)):
        match = INVOCATION.search(segment)
        if match:
            yield [word.strip("[]") for word in match.group(1).split() if word.strip("[]")]


def invocation_problems(words: list[str], tree: CommandTree) -> list[str]:
    """What in one invocation names no command, or an option its command does not take."""
    path: tuple[str, ...] = ()
    problems = []
    for word in words:
        if word == "--":
            break
        if word.startswith("-") and not VALUE_LOOKING_LIKE_AN_OPTION.match(word):
            option = word.split("=", 1)[0]
            if option not in tree[path]:
                problems.append(f"{' '.join(('kgsupervisor', *path))} has no option {option}")
        elif (*path, word) in tree:
            path = (*path, word)
        elif path == () and COMMAND_WORD.fullmatch(word):
            problems.append(f"no command kgsupervisor {word}")
            break
        elif path == ():
            break  # not an invocation: `kgsupervisor = 5` quotes a TOML key
    return problems


def command_problems(page_name: str, text: str, tree: CommandTree) -> list[str]:
    """What is wrong with the `kgsupervisor …` commands a page quotes, each with its line."""
    return [f"{page_name}: `{line}`: {problem}" for line in command_lines(text)
            for words in invocations(line) for problem in invocation_problems(words, tree)]


def quoted_commands(text: str, tree: CommandTree) -> set[tuple[str, ...]]:
    """The commands the page quotes (`kgsupervisor run …` -> ("run",))."""
    return {(words[0],) for line in command_lines(text) for words in invocations(line)
            if words and (words[0],) in tree}


# -- the tests -----------------------------------------------------------------------------------

TREE = command_tree(kgsupervisor_cli)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_names_a_real_file_and_heading(page):
    assert link_problems(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_quoted_command_names_a_real_command_and_real_options(page):
    assert command_problems(page.name, page.read_text(encoding="utf-8"), TREE) == []


def test_every_command_of_the_cli_is_documented_on_the_operating_page():
    documented = quoted_commands((ROOT / "docs" / "operating.md").read_text(encoding="utf-8"), TREE)
    assert {path for path in TREE if len(path) == 1} - documented == set()


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.partition("#")[0]).resolve()
              for target in link_targets((ROOT / "README.md").read_text(encoding="utf-8"))
              if not URL_SCHEME.match(target)}
    assert set(PAGES[1:]) - linked == set()


def test_the_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= README_MOST_LINES


def test_the_checker_reports_a_broken_link_an_unknown_command_and_an_unknown_option(tmp_path):
    (tmp_path / "real.md").write_text("# Real page\n\n## Its one section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    text = ("# Page\n\nSee [the real page](real.md#its-one-section), [gone](missing.md) and\n"
            "[a heading it lacks](real.md#no-such-section).\n\n"
            "Run `kgsupervisor frobnicate --db x` or:\n\n"
            "```sh\nkgsupervisor run --db crawl.db --no-such-flag   # a comment --not-checked\n```\n")
    page.write_text(text, encoding="utf-8")

    problems = link_problems(page, text) + command_problems(page.name, text, TREE)

    assert problems == [
        f"page.md: link to missing.md: no such file {tmp_path / 'missing.md'}",
        "page.md: link to real.md#no-such-section: real.md has no heading #no-such-section",
        "page.md: `kgsupervisor frobnicate --db x`: no command kgsupervisor frobnicate",
        "page.md: `kgsupervisor run --db crawl.db --no-such-flag   # a comment --not-checked`: "
        "kgsupervisor run has no option --no-such-flag",
    ]


def test_console_output_lines_and_other_programs_are_not_read_as_commands():
    text = ("```console\n$ kgsupervisor queue --db crawl.db --json\n"
            "kgsupervisor --bogus printed, not run\n```\n"
            "```sh\nsudo systemctl reload kgsupervisor   # HUP\npip install 'kgsupervisor[postgres]'\n"
            "kgsupervisor health && echo ok\n```\n"
            "TOML `kgsupervisor = 5`, a metric `kgsupervisor_kg_up`, `kgsupervisor dev-service "
            "[--health healthy\\|degraded] [--not-initialized]`\n")

    assert command_problems("page.md", text, TREE) == []
    assert quoted_commands(text, TREE) == {("queue",), ("health",), ("dev-service",)}


@pytest.mark.parametrize("heading, slug", [
    ("What happens to a document", "what-happens-to-a-document"),
    ("Signals (to `kgsupervisor run`)", "signals-to-kgsupervisor-run"),
    ("Several hosts: PostgreSQL", "several-hosts-postgresql"),
    ('"degraded" is up', "degraded-is-up"),
    ("The [Python API](python-api.md)", "the-python-api"),
])
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_a_repeated_heading_gets_a_numbered_anchor_and_a_commented_hash_is_no_heading():
    text = "# Notes\n\n## Setup\n\n## Setup\n\n```sh\n# Setup again\n```\n"
    assert anchors(text) == {"notes", "setup", "setup-1"}
